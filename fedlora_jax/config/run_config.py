"""Run configuration: frozen dataclasses, YAML files, dotted `--set a.b=value` overrides.

Invalid values fail at load time with one sentence naming the key, the value and what is allowed.

The sections are in config_sections.py (their field checks in config_checks.py), YAML reading and
coercion in config_yaml.py; this module holds RunConfig, presets, load_config and config_diff.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
from collections.abc import Iterator
from pathlib import Path

import yaml

from ..core.errors import UserError
from .checks import _at_least, _check_types, _choice, _strings
from .sections import (  # noqa: F401  (re-exported)
    SYNTHETIC_TASKS,
    WRITERS,
    DataSection,
    DPSection,
    FLSection,
    LoggingSection,
    LoRASection,
    ModelSection,
)
from .yaml_io import _build, _merge, _read_yaml, _yaml_problem


def _presets() -> dict:
    """Preset name -> YAML text, from the package data in fedlora_jax/config/presets (works from a wheel)."""
    folder = importlib.resources.files("fedlora_jax.config") / "presets"
    return {f.name[:-5]: f for f in folder.iterdir() if f.name.endswith(".yaml")}


def preset_names() -> list[str]:
    return sorted(_presets())


@dataclasses.dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    seed: int = 0
    model: ModelSection = ModelSection()
    lora: LoRASection = LoRASection()
    data: DataSection = DataSection()
    fl: FLSection = FLSection()
    dp: DPSection = DPSection()
    eval_every: int = 5
    # the held-out loss scores every held-out example up to this cap, in batches of eval_batch_size
    # (the last one padded and masked), whatever fl.batch_size is
    eval_examples: int = 2000
    eval_batch_size: int = 16
    eval_tasks: tuple[str, ...] = ("loss",)  # evaluated every eval_every rounds: loss | exact_match | multiple_choice
    eval_limit: int = 64  # examples per exact_match / multiple_choice evaluation
    eval_choices: str = "synthetic"  # multiple_choice data: question/choices/answer file or hub id, or synthetic
    checkpoint_every: int = 10
    logging: LoggingSection = LoggingSection()

    def __post_init__(self):
        object.__setattr__(self, "eval_tasks", tuple(self.eval_tasks))
        _check_types(self, "")
        for k, cls in (
            ("model", ModelSection),
            ("lora", LoRASection),
            ("data", DataSection),
            ("fl", FLSection),
            ("dp", DPSection),
            ("logging", LoggingSection),
        ):
            if not isinstance(getattr(self, k), cls):
                raise UserError(f"{k} must be a mapping of its keys, got {getattr(self, k)!r}")
        if not self.name or self.name in (".", "..") or any(c in self.name for c in "/\\\0"):
            raise UserError(
                f"name {self.name!r} names the run folder runs/NAME: it must be non-empty, not '.' "
                "or '..', and hold no '/' or '\\'"
            )
        if not 0 <= self.seed < 2**32:
            raise UserError(f"seed must be an integer in [0, 2**32), got {self.seed}")
        from ..core.choices import EVAL_TASKS

        _strings("eval_tasks", self.eval_tasks, empty_ok=True)
        for t in self.eval_tasks:
            _choice("eval_tasks entry", t, EVAL_TASKS)
        _at_least("eval_every", self.eval_every, 0)
        _at_least("eval_examples", self.eval_examples, 1)
        _at_least("eval_batch_size", self.eval_batch_size, 1)
        _at_least("checkpoint_every", self.checkpoint_every, 0)
        if self.eval_limit < 1:
            raise UserError(f"eval_limit must be >= 1, got {self.eval_limit}")
        if not self.eval_choices.strip():
            raise UserError("eval_choices is empty; give 'synthetic', a local file or a hub id")

    def to_dict(self) -> dict:
        def conv(x: object) -> object:
            if dataclasses.is_dataclass(x):
                return {f.name: conv(getattr(x, f.name)) for f in dataclasses.fields(x)}
            if isinstance(x, tuple):
                if x and all(isinstance(p, tuple) and len(p) == 2 for p in x):
                    return {k: conv(v) for k, v in x}
                return [conv(v) for v in x]
            return x

        return conv(self)

    def to_yaml(self) -> str:
        """Every key with its value or default, as YAML: RUN/config.yaml and `fedlora-jax config`. The
        model shape keys, which only the random `tiny` model reads, are marked unused for other sources."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if self.model.source == "tiny":
            return text
        lines, section = [], None
        for line in text.splitlines():
            if not line.startswith(" "):
                section = line.rstrip(":")
            key = line.strip().split(":", 1)[0]
            if section == "model" and line.startswith("  ") and key in tiny_shape_keys():
                line += "  # unused: only model.source tiny reads it (other models bring their own shape)"
            lines.append(line)
        return "\n".join(lines) + "\n"


def tiny_shape_keys() -> tuple[str, ...]:
    """The model keys that only the random `tiny` model reads (its shape)."""
    from .sections import TINY_SHAPE

    return TINY_SHAPE


def load_config(path_or_preset: str | None = None, overrides: list[str] = ()) -> RunConfig:
    """A RunConfig from a YAML file or a preset name in fedlora_jax/config/presets (default: 'default'),
    with `a.b=value` overrides (values parsed as YAML)."""
    name = path_or_preset or "default"
    path = Path(name)
    if path.exists():
        if not path.is_file():
            raise UserError(f"config {name!r} is a folder, not a YAML file")
        label = f"config file {name!r}"
        data = _read_yaml(path, label)
    else:
        presets = _presets()
        if name not in presets:
            raise UserError(f"config {name!r} is neither a file nor a preset; presets: {', '.join(sorted(presets))}")
        label = f"preset {name!r}"
        data = yaml.safe_load(presets[name].read_text())
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(
            f"{label} must be a YAML mapping of config keys (name, model, fl, ...), got a {type(data).__name__}"
        )
    file_data = data
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} must look like key.sub=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(p.strip() for p in parts):
            raise UserError(f"override {item!r}: {key.strip()!r} is not a dotted config key such as fl.rounds")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise UserError(
                f"override {item!r}: the value is not valid YAML ({_yaml_problem(e)}); quote a string, close brackets"
            ) from None
        except RecursionError:
            raise UserError(f"override {item!r}: the value nests too deeply") from None
        node: dict = {}
        cur = node
        for p in parts[:-1]:
            cur = cur.setdefault(p.strip(), {})
        cur[parts[-1].strip()] = parsed
        data = _merge(data, node)
    try:
        return _build(RunConfig, data, "")
    except UserError as e:
        if overrides and path.is_file():  # name the file when the mistake is in it, not in an override
            try:
                _build(RunConfig, file_data, "")
            except UserError as e2:
                if str(e2) == str(e):
                    raise UserError(f"{label}: {e}") from None
            raise
        if path.is_file():
            raise UserError(f"{label}: {e}") from None
        raise


def config_diff(a: RunConfig, b: RunConfig, ignore: tuple[str, ...] = ("fl.rounds",)) -> list[str]:
    """Dotted keys whose values differ between two configs (for resume checks)."""

    def flat(d: dict, prefix: str = "") -> Iterator[tuple[str, object]]:
        for k, v in d.items():
            if isinstance(v, dict) and not (k == "columns"):
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    fa, fb = dict(flat(a.to_dict())), dict(flat(b.to_dict()))
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k) and k not in ignore)
