"""Run configuration: frozen dataclasses, YAML files, dotted `--set a.b=value` overrides.

Invalid values fail at load time with one sentence naming the key, the value and what is allowed.
"""

from __future__ import annotations

from .errors import UserError
import dataclasses
import importlib.resources
import typing
from pathlib import Path
from typing import Any

import yaml


def _presets() -> dict:
    """Preset name -> YAML text, from the package data in fedlora_jax/configs (works from a wheel)."""
    folder = importlib.resources.files("fedlora_jax") / "configs"
    return {f.name[:-5]: f for f in folder.iterdir() if f.name.endswith(".yaml")}


def preset_names() -> list[str]:
    return sorted(_presets())


def _choice(name, value, allowed):
    if value not in allowed:
        raise UserError(f"{name} = {value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")


def _positive(name, value, strict=True):
    if value is None or (value <= 0 if strict else value < 0):
        raise UserError(f"{name} must be {'> 0' if strict else '>= 0'}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ModelSection:
    source: str = "default"          # HF folder, hub id, GGUF path, 'default', or 'tiny' (random)
    dtype: str = "float32"
    # only for source: tiny (a random Llama for tests and benchmarks)
    vocab_size: int = 512
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128

    def __post_init__(self):
        _choice("model.dtype", self.dtype, ("float32", "bfloat16"))


@dataclasses.dataclass(frozen=True)
class LoRASection:
    r: int = 8
    alpha: float = 16.0
    target_modules: tuple = ("q_proj", "v_proj")
    use_rslora: bool = False
    freeze_a: bool = False           # FFA-LoRA: train B only
    client_ranks: tuple | None = None  # per-client ranks (<= r) for heterogeneous clients

    def __post_init__(self):
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if self.client_ranks is not None:
            object.__setattr__(self, "client_ranks", tuple(int(x) for x in self.client_ranks))
            bad = [x for x in self.client_ranks if not 1 <= x <= self.r]
            if bad:
                raise UserError(f"lora.client_ranks must be in [1, r={self.r}], got {bad[0]}")


@dataclasses.dataclass(frozen=True)
class DataSection:
    source: str = "chatterbot"       # chatterbot | synthetic | local json/jsonl/csv/parquet | hub id
    split: str = "train"
    columns: dict | None = None      # map of our names (instruction, input, output) -> dataset columns
    label_column: str | None = None  # for dirichlet / by_column partitions
    template: str = "alpaca"         # alpaca | chat | plain
    seq_len: int = 128
    max_examples: int | None = None
    eval_fraction: float = 0.1
    eval_per_client: bool = False
    partition: str = "iid"           # iid | dirichlet | by_column
    dirichlet_alpha: float = 0.5
    synthetic_tasks: tuple = ("arithmetic", "reverse", "sort", "copy")
    synthetic_examples: int = 2000

    def __post_init__(self):
        _choice("data.template", self.template, ("alpaca", "chat", "plain"))
        _choice("data.partition", self.partition, ("iid", "dirichlet", "by_column"))
        if self.seq_len < 4:
            raise UserError(f"data.seq_len must be >= 4, got {self.seq_len}")
        if not 0 <= self.eval_fraction < 1:
            raise UserError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        _positive("data.dirichlet_alpha", self.dirichlet_alpha)
        object.__setattr__(self, "synthetic_tasks", tuple(self.synthetic_tasks))
        if self.columns is not None:
            object.__setattr__(self, "columns", tuple(sorted(dict(self.columns).items())))


@dataclasses.dataclass(frozen=True)
class FLSection:
    num_clients: int = 20
    clients_per_round: int = 2
    rounds: int = 200
    local_steps: int = 10
    batch_size: int = 16
    sampling: str = "uniform"        # uniform (fixed size, the paper) | poisson (central DP)
    algorithm: str = "fedavg"        # fedavg fedprox scaffold fedavgm fedadagrad fedyogi fedadam
    aggregation: str = "mean"        # mean | stack
    lr: float = 5e-5
    lr_min: float = 1e-6
    weight_decay: float = 0.0
    prox_mu: float = 0.01
    server_lr: float = 1.0
    server_momentum: float = 0.9
    server_b1: float = 0.9
    server_b2: float = 0.99
    server_tau: float = 1e-3
    clients_per_chunk: int | None = None  # run clients in chunks of this size (memory ~ chunk)
    devices: int = 1                 # spread each chunk's clients over this many devices ('clients' mesh axis)

    def __post_init__(self):
        _choice("fl.algorithm", self.algorithm,
                ("fedavg", "fedprox", "scaffold", "fedavgm", "fedadagrad", "fedyogi", "fedadam"))
        _choice("fl.aggregation", self.aggregation, ("mean", "stack"))
        _choice("fl.sampling", self.sampling, ("uniform", "poisson"))
        for k in ("num_clients", "clients_per_round", "rounds", "local_steps", "batch_size"):
            if getattr(self, k) < 1:
                raise UserError(f"fl.{k} must be >= 1, got {getattr(self, k)}")
        if self.clients_per_chunk is not None and self.clients_per_chunk < 1:
            raise UserError(f"fl.clients_per_chunk must be >= 1, got {self.clients_per_chunk}")
        if self.devices < 1:
            raise UserError(f"fl.devices must be >= 1, got {self.devices}")
        if self.clients_per_round > self.num_clients:
            raise UserError(f"fl.clients_per_round ({self.clients_per_round}) is larger than "
                             f"fl.num_clients ({self.num_clients})")


@dataclasses.dataclass(frozen=True)
class DPSection:
    mode: str = "none"               # none | local (the paper) | central (DP-FedAvg) | dpsgd (record level)
    clip_a: float = 0.1              # dpsgd: the per-example gradient clip (whole adapter)
    clip_b: float = 0.1
    scope: str = "per_matrix"        # per_matrix | per_factor | global
    target: str = "weights"          # weights | update
    noise: str = "classical"         # classical | analytic | multiplier | calibrate
    epsilon: float = 25.0            # classical/analytic: per release; calibrate: total
    delta: float = 1e-5
    noise_multiplier: float = 1.0    # noise: multiplier (sigma / C)
    neighbouring: str = "replace-one"
    budget: float | None = None      # stop before the worst client's epsilon would exceed it
    stats_every: int = 0             # write the paper's noise statistics CSV every k rounds (0: never)
    stats_samples: int = 100         # Monte-Carlo draws per matrix for those statistics
    # outside the guarantee, only on request: client training loss / update norm, realised cohort
    # sizes and drop counts (published marked as such in metrics, progress bar and summary)
    publish_client_metrics: bool = False
    # the clients' example counts are public: aggregation may weight by them (else uniform weights)
    public_counts: bool = False

    def __post_init__(self):
        _choice("dp.mode", self.mode, ("none", "local", "central", "dpsgd"))
        _choice("dp.scope", self.scope, ("per_matrix", "per_factor", "global"))
        _choice("dp.target", self.target, ("weights", "update"))
        _choice("dp.noise", self.noise, ("classical", "analytic", "multiplier", "calibrate"))
        _choice("dp.neighbouring", self.neighbouring, ("replace-one", "add-remove"))
        _positive("dp.clip_a", self.clip_a)
        _positive("dp.clip_b", self.clip_b)
        _positive("dp.epsilon", self.epsilon)
        _positive("dp.noise_multiplier", self.noise_multiplier, strict=False)
        if self.stats_samples < 2:
            raise UserError(f"dp.stats_samples must be >= 2, got {self.stats_samples}")
        if not 0 < self.delta < 1:
            raise UserError(f"dp.delta must be in (0, 1), got {self.delta}")


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
    eval_batches: int = 4
    eval_tasks: tuple = ("loss",)    # evaluated every eval_every rounds: loss | exact_match | multiple_choice
    eval_limit: int = 64             # examples per exact_match / multiple_choice evaluation
    eval_choices: str = "synthetic"  # multiple_choice data: question/choices/answer file or hub id, or synthetic
    checkpoint_every: int = 10
    log_every: int = 1

    def __post_init__(self):
        object.__setattr__(self, "eval_tasks", tuple(self.eval_tasks))
        for t in self.eval_tasks:
            _choice("eval_tasks entry", t, ("loss", "exact_match", "multiple_choice"))
        if self.eval_limit < 1:
            raise UserError(f"eval_limit must be >= 1, got {self.eval_limit}")

    def to_dict(self) -> dict:
        def conv(x):
            if dataclasses.is_dataclass(x):
                return {f.name: conv(getattr(x, f.name)) for f in dataclasses.fields(x)}
            if isinstance(x, tuple):
                if x and all(isinstance(p, tuple) and len(p) == 2 for p in x):
                    return {k: conv(v) for k, v in x}
                return [conv(v) for v in x]
            return x
        return conv(self)


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise UserError(f"{prefix or 'config'} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kw = {}
    for k, v in data.items():
        if k not in fields:
            raise UserError(f"unknown config key '{prefix}{k}'; allowed: {', '.join(fields)}")
        t = hints[k]
        if dataclasses.is_dataclass(t):
            kw[k] = _build(t, v or {}, f"{prefix}{k}.")
        else:
            kw[k] = _coerce(v, t, f"{prefix}{k}")
    return cls(**kw)


def _coerce(v, t, name):
    if v is None:
        return None
    base = [a for a in typing.get_args(t) if a is not type(None)] or [t]
    target = base[0]
    if target in (int, float) and isinstance(v, str):
        try:  # YAML 1.1 reads 3e-2 (no dot) as a string
            v = float(v)
        except ValueError:
            raise UserError(f"{name} must be a number, got {v!r}") from None
    if target in (int, float) and isinstance(v, (int, float)) and not isinstance(v, bool):
        if target is int and float(v) != int(v):
            raise UserError(f"{name} must be an integer, got {v!r}")
        return target(v)
    if target is bool and not isinstance(v, bool):
        raise UserError(f"{name} must be true or false, got {v!r}")
    if target in (int, float) and not isinstance(v, (int, float)):
        raise UserError(f"{name} must be a number, got {v!r}")
    if target is tuple and isinstance(v, (list, tuple)):
        return tuple(v)
    if target is tuple and isinstance(v, str):
        return tuple(s.strip() for s in v.split(",") if s.strip())
    return v


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path_or_preset: str | None = None, overrides: list[str] = ()) -> RunConfig:
    """A RunConfig from a YAML file or a preset name in fedlora_jax/configs (default: 'default'),
    with `a.b=value` overrides (values parsed as YAML)."""
    name = path_or_preset or "default"
    path = Path(name)
    if path.exists():
        text = path.read_text()
    else:
        presets = _presets()
        if name not in presets:
            raise UserError(f"config {name!r} is neither a file nor a preset; presets: {', '.join(sorted(presets))}")
        text = presets[name].read_text()
    data = yaml.safe_load(text) or {}
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} must look like key.sub=value")
        key, value = item.split("=", 1)
        node: dict = {}
        cur = node
        parts = key.strip().split(".")
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        cur[parts[-1]] = yaml.safe_load(value)
        data = _merge(data, node)
    return _build(RunConfig, data, "")


def config_diff(a: RunConfig, b: RunConfig, ignore=("fl.rounds",)) -> list[str]:
    """Dotted keys whose values differ between two configs (for resume checks)."""
    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict) and not (k == "columns"):
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v
    fa, fb = dict(flat(a.to_dict())), dict(flat(b.to_dict()))
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k) and k not in ignore)
