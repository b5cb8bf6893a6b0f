"""What the commands share: strict JSON output, option domain checks, and the OSErrors that are
the user's environment rather than a bug."""

from __future__ import annotations

import errno
import json
import math

from ..core.errors import UserError

# OSErrors that are the user's environment, not a bug: reported as one sentence naming the path
_ENV_ERRNOS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.ENAMETOOLONG,
}


def _plain(x):
    """x with NaN and infinities as None (and numpy scalars as Python numbers), for strict JSON."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if hasattr(x, "item") and getattr(x, "ndim", None) == 0:  # numpy / jax scalar
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def dumps(obj: object) -> str:
    """Strict JSON (RFC 8259): NaN and infinities become null."""
    return json.dumps(_plain(obj), allow_nan=False)


def _finite(flag: str, value, low=None, high=None, low_open=False, high_open=False, what=None):
    """A numeric option in its domain, or a UserError naming the flag (and `what` it is)."""
    if value is None:
        return
    if what:
        flag = f"{flag}: {what}"
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{flag} must be a finite number, got {value}")
    bad = (low is not None and (value <= low if low_open else value < low)) or (
        high is not None and (value >= high if high_open else value > high)
    )
    if bad:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
        hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
        allowed = (
            f"in {lo}, {hi}"
            if low is not None and high is not None
            else f"{'>' if low_open else '>='} {low:g}"
            if low is not None
            else f"{'<' if high_open else '<='} {high:g}"
        )
        raise UserError(f"{flag} must be {allowed}, got {value:g}")


SEED_LIMIT = 2**32  # as the config's seed


def _seed(flag: str, value) -> None:
    """A seed option: an integer in [0, 2**32), or a UserError naming the flag."""
    if value is not None and not 0 <= value < SEED_LIMIT:
        raise UserError(f"{flag} must be an integer in [0, 2**32) (as the config's seed), got {value}")


def _rounds(flag: str, value) -> None:
    """A number of rounds: at least 1 and at most numerics.MAX_ROUNDS (more would sit for minutes or hours)."""
    from ..core.numerics import MAX_ROUNDS

    _finite(flag, value, low=1)
    if value is not None and value > MAX_ROUNDS:
        raise UserError(
            f"{flag} = {value} is above the most this tool accounts for ({MAX_ROUNDS:,} rounds): the sampling "
            "schedule and the accountants would run for hours"
        )


CONFIG_DOCS = "README.md: 'Config sections', in the section '`run`: the federated simulation' of 'Command line'"


def presets_epilog() -> str:
    """The packaged presets, each with the first sentence of its leading comment, and where keys are documented."""
    import importlib.resources
    import textwrap

    from ..config.run_config import preset_names

    folder = importlib.resources.files("fedlora_jax.config") / "presets"
    lines = ["presets (fedlora_jax/config/presets/):"]
    for name in preset_names():
        comment = []
        for line in (folder / f"{name}.yaml").read_text().splitlines():
            if not line.startswith("#"):
                break
            comment.append(line.lstrip("#").strip())
        about = " ".join(comment)
        about = about[: about.find(". ") + 1] if ". " in about else about
        lines += textwrap.wrap(about, 100, initial_indent=f"  {name:8s} ", subsequent_indent=" " * 11) or [f"  {name}"]
    lines += [""] + textwrap.wrap(
        f"config keys are documented in {CONFIG_DOCS} (and in fedlora_jax/config/); 'fedlora-jax config "
        "[CONFIG] [--set KEY=VALUE ...]' prints every key of a config with its default.",
        100,
        break_on_hyphens=False,
    )
    return "\n".join(lines)
