"""Numerical constants and checks shared across the package: one home, so a guard means the same everywhere."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# The floor a divisor is raised to before dividing: a zero norm (a zero gradient or update, which
# clipping leaves as it is), a zero weight sum (nothing kept in a round) or a zero noise scale
# never divides by zero. Far below any norm, weight or sigma a run produces, so it changes nothing else.
DIVISION_FLOOR = 1e-30

# The smallest probability a capacity's overflow tail is taken to: below it (a huge epsilon) a Poisson
# cohort or batch is padded to its whole population, so it never overflows (sampling.capacity_tail).
SMALLEST_TAIL = 1e-300

# exp() of a larger epsilon overflows a float64: the terms (1 + e^epsilon) x ... are capped there
MAX_EXP_EPSILON = 700.0


def all_finite(tree: object) -> jax.Array:
    """One boolean: every element of every leaf of `tree` is finite (jittable)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


# the most rounds a run or the privacy calculator takes: the seeded sampling schedule and the
# accountants are linear in the rounds (about 35 s per million rounds), and no federated run comes
# near it; more would sit for minutes or hours without a word
MAX_ROUNDS = 100_000


def refuse_non_finite(values: dict, where: str, hint: str) -> None:
    """The one finite check between user input and a float output (summary.json, metrics, the
    console): the first value of `values` (nested dicts and lists; numbers only) that is NaN or
    infinite is a UserError naming it, `where` it comes from and `hint`."""
    import math

    from .errors import UserError

    def walk(x, key):
        if isinstance(x, dict):
            for k, v in x.items():
                yield from walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                yield from walk(v, f"{key}[{i}]")
        elif isinstance(x, (int, float)) and not isinstance(x, bool) or hasattr(x, "item"):
            yield key, x

    for key, v in walk(values, ""):
        try:
            v = float(v)
        except (TypeError, ValueError):
            continue
        if not math.isfinite(v):
            raise UserError(f"{where}: {key} would be {v} (not finite); {hint}")


def check_mechanism_finite(cfg, mechanism) -> None:
    """A DP mechanism whose noise or epsilon is not finite (a noise multiplier of 0, dp.epsilon or
    dp.delta so small that the multiplier overflows), or whose accountants fail on one round (a
    multiplier so large or small that they overflow or do not converge), is refused before the run
    starts: it would train, then crash or publish inf (or an epsilon of 0 for infinite noise)."""
    import numpy as np

    from .errors import UserError

    if not mechanism.private:
        return
    dp = cfg.dp
    settings = f"dp.noise {dp.noise}, dp.noise_multiplier {dp.noise_multiplier:g}, dp.epsilon {dp.epsilon:g}, "
    settings += f"dp.delta {dp.delta:g}"
    values = {k: v for k, v in mechanism.info.items() if k != "delta"}
    try:  # what the first round publishes: the epsilon of one participation, the row's privacy figures
        if mechanism.ledger is not None:
            values["epsilon of one participation"] = mechanism.ledger.worst_after(np.zeros(1, np.int64))
        values["privacy row"] = mechanism.privacy_row(np.ones(cfg.fl.num_clients, np.int64))
    except UserError:
        raise
    except (ZeroDivisionError, OverflowError, FloatingPointError, ValueError, RuntimeError) as e:
        raise UserError(
            f"dp.mode {dp.mode}: the accountant cannot compute the privacy of one round with {settings} "
            f"({type(e).__name__}: {' '.join(str(e).split())[:120]}); choose a less extreme noise, epsilon or delta"
        ) from None
    refuse_non_finite(
        values,
        f"dp.mode {dp.mode}",
        f"with {settings} the noise or the privacy spent is infinite; choose a multiplier > 0 (dp.mode none for "
        "no noise) or an epsilon and delta whose noise is finite",
    )
