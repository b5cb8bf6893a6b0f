"""Run configuration: frozen dataclasses, YAML files, dotted `--set a.b=value` overrides.

Invalid values fail at load time with one sentence naming the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import numbers
import types
import typing
from pathlib import Path

import yaml

from .errors import UserError

SYNTHETIC_TASKS = ("arithmetic", "reverse", "sort", "copy")  # data.synthetic generates these


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


def _at_least(name, value, low):
    if value is not None and value < low:
        raise UserError(f"{name} must be >= {low}, got {value!r}")


def _in_unit(name, value):
    """A decay rate or momentum: [0, 1)."""
    if not 0 <= value < 1:
        raise UserError(f"{name} must be in [0, 1), got {value!r}")


def _strings(name, values, empty_ok=False):
    if not values and not empty_ok:
        raise UserError(f"{name} is empty; give at least one entry")
    for x in values:
        if not isinstance(x, str) or not x:
            raise UserError(f"{name} entries must be non-empty strings, got {x!r}")


def _unwrap(t):
    """(the type inside an optional annotation, whether None is allowed)."""
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(t) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(t))
    return t, False


def _check_types(obj, prefix: str) -> None:
    """Every field holds a value of its declared type (finite numbers; ints for int fields), also
    for configs built in Python rather than from YAML."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        t, optional = _unwrap(hints[f.name])
        v, name = getattr(obj, f.name), f"{prefix}{f.name}"
        if v is None:
            if not optional:
                raise UserError(f"{name} needs a value, got none")
            continue
        if t is bool and not isinstance(v, bool):
            raise UserError(f"{name} must be true or false, got {v!r}")
        if t in (int, float):
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise UserError(f"{name} must be a number, got {v!r}")
            if not math.isfinite(v):
                raise UserError(f"{name} must be a finite number, got {v!r}")
            if t is int and v != int(v):
                raise UserError(f"{name} must be an integer, got {v!r}")
        if t is str and not isinstance(v, str):
            raise UserError(f"{name} must be a string, got {v!r}")


@dataclasses.dataclass(frozen=True)
class ModelSection:
    source: str = "default"  # HF folder, hub id, GGUF path, 'default', or 'tiny' (random)
    dtype: str = "float32"
    # only for source: tiny (a random Llama for tests and benchmarks)
    vocab_size: int = 512
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128

    def __post_init__(self):
        _check_types(self, "model.")
        if not self.source.strip():
            raise UserError(
                "model.source is empty; give a Hugging Face folder, a hub id, a GGUF file, 'default' or 'tiny'"
            )
        _choice("model.dtype", self.dtype, ("float32", "bfloat16"))
        for k in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
            _at_least(f"model.{k}", getattr(self, k), 1)
        if self.hidden_size % self.num_heads:
            raise UserError(
                f"model.hidden_size {self.hidden_size} is not divisible by model.num_heads {self.num_heads}"
            )
        if (self.hidden_size // self.num_heads) % 2:
            raise UserError(
                f"model.hidden_size / model.num_heads = {self.hidden_size // self.num_heads} must be "
                "even (rotary position embeddings rotate pairs)"
            )
        if self.num_heads % self.num_kv_heads:
            raise UserError(
                f"model.num_heads {self.num_heads} is not a multiple of model.num_kv_heads {self.num_kv_heads}"
            )


@dataclasses.dataclass(frozen=True)
class LoRASection:
    r: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    use_rslora: bool = False
    freeze_a: bool = False  # FFA-LoRA: train B only
    client_ranks: tuple[int, ...] | None = None  # per-client ranks (<= r) for heterogeneous clients

    def to_lora_config(self):
        """The model's LoRAConfig (what the adapters look like): the one conversion from this section."""
        from .models import LoRAConfig

        return LoRAConfig(r=self.r, alpha=self.alpha, target_modules=self.target_modules, use_rslora=self.use_rslora)

    def __post_init__(self):
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if self.client_ranks is not None:
            object.__setattr__(self, "client_ranks", tuple(self.client_ranks))
        _check_types(self, "lora.")
        _at_least("lora.r", self.r, 1)
        _positive("lora.alpha", self.alpha)
        _strings("lora.target_modules", self.target_modules)
        if self.client_ranks is not None:
            if not self.client_ranks:
                raise UserError("lora.client_ranks is an empty list; give one rank per client or leave it out")
            for x in self.client_ranks:
                if isinstance(x, bool) or not isinstance(x, int):
                    raise UserError(f"lora.client_ranks entries must be integers, got {x!r}")
            bad = [x for x in self.client_ranks if not 1 <= x <= self.r]
            if bad:
                raise UserError(f"lora.client_ranks must be in [1, r={self.r}], got {bad[0]}")


@dataclasses.dataclass(frozen=True)
class DataSection:
    source: str = "chatterbot"  # chatterbot | synthetic | local json/jsonl/csv/parquet | hub id
    split: str = "train"
    columns: dict[str, str] | None = None  # our names (instruction, input, output | messages) -> dataset columns
    label_column: str | None = None  # for dirichlet / by_column partitions
    template: str = "alpaca"  # alpaca | chat | plain
    seq_len: int = 128
    max_examples: int | None = None
    eval_fraction: float = 0.1
    eval_per_client: bool = False
    partition: str = "iid"  # iid | dirichlet | by_column
    dirichlet_alpha: float = 0.5
    synthetic_tasks: tuple[str, ...] = ("arithmetic", "reverse", "sort", "copy")
    synthetic_examples: int = 2000
    # chat template: system turn of conversations without one; None = the template's default; "" = none
    system_prompt: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "synthetic_tasks", tuple(self.synthetic_tasks))
        if self.columns is not None:
            cols = self.columns
            if isinstance(cols, tuple):  # already normalised (a config built from another one)
                cols = dict(cols)
            if not isinstance(cols, dict):
                raise UserError(
                    f"data.columns must be a mapping such as {{instruction: question, output: answer}}, "
                    f"got {self.columns!r}"
                )
            for k, v in cols.items():
                if k not in ("instruction", "input", "output", "messages"):
                    raise UserError(
                        f"data.columns key {k!r} is not allowed; choose among: instruction, input, output, messages"
                    )
                if not isinstance(v, str) or not v:
                    raise UserError(f"data.columns.{k} must be a column name, got {v!r}")
            if "messages" in cols and len(cols) > 1:
                raise UserError(
                    "data.columns maps both messages and instruction/input/output; a dataset is either "
                    "conversations (messages) or instruction rows"
                )
            object.__setattr__(self, "columns", tuple(sorted(cols.items())))
        _check_types(self, "data.")
        for k in ("source", "split"):
            if not getattr(self, k).strip():
                raise UserError(f"data.{k} is empty")
        if self.label_column is not None and not self.label_column:
            raise UserError("data.label_column is empty; name a column or leave it out")
        _choice("data.template", self.template, ("alpaca", "chat", "plain"))
        _choice("data.partition", self.partition, ("iid", "dirichlet", "by_column"))
        if self.seq_len < 4:
            raise UserError(f"data.seq_len must be >= 4, got {self.seq_len}")
        _at_least("data.max_examples", self.max_examples, 1)
        if not 0 <= self.eval_fraction < 1:
            raise UserError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        _positive("data.dirichlet_alpha", self.dirichlet_alpha)
        _strings("data.synthetic_tasks", self.synthetic_tasks)
        for t in self.synthetic_tasks:
            _choice("data.synthetic_tasks entry", t, SYNTHETIC_TASKS)
        _at_least("data.synthetic_examples", self.synthetic_examples, 1)


@dataclasses.dataclass(frozen=True)
class FLSection:
    num_clients: int = 20
    clients_per_round: int = 2
    rounds: int = 200
    local_steps: int = 10
    batch_size: int = 16
    sampling: str = "uniform"  # uniform (fixed size, the paper) | poisson (central DP)
    algorithm: str = "fedavg"  # fedavg fedprox scaffold fedavgm fedadagrad fedyogi fedadam
    aggregation: str = "mean"  # mean | stack
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
    # the device mesh: N (each chunk's clients over N devices) or [clients, model] (the base also
    # split over 'model' devices: for bases that do not fit one chip); see fedlora_jax.mesh
    devices: tuple[int, ...] = (1,)
    distributed: bool = False  # multi-host: jax.distributed.initialize() before the mesh is built

    def __post_init__(self):
        _check_types(self, "fl.")
        from .algorithms import names as algorithms  # the registry of algorithms

        _choice("fl.algorithm", self.algorithm, algorithms())
        from .aggregation import names as aggregations  # the registry of aggregators

        _choice("fl.aggregation", self.aggregation, aggregations())
        from .sampling import SAMPLINGS

        _choice("fl.sampling", self.sampling, SAMPLINGS)
        for k in ("num_clients", "clients_per_round", "rounds", "local_steps", "batch_size"):
            if getattr(self, k) < 1:
                raise UserError(f"fl.{k} must be >= 1, got {getattr(self, k)}")
        if self.clients_per_chunk is not None and self.clients_per_chunk < 1:
            raise UserError(f"fl.clients_per_chunk must be >= 1, got {self.clients_per_chunk}")
        if isinstance(self.devices, int) and not isinstance(self.devices, bool):  # built in Python: fl.devices=4
            object.__setattr__(self, "devices", (self.devices,))
        if (
            not isinstance(self.devices, tuple)
            or len(self.devices) not in (1, 2)
            or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in self.devices)
        ):
            shown = list(self.devices) if isinstance(self.devices, (tuple, list)) else self.devices
            raise UserError(f"fl.devices must be N or [clients, model] (integers >= 1), got {shown!r}")
        if self.clients_per_round > self.num_clients:
            raise UserError(
                f"fl.clients_per_round ({self.clients_per_round}) is larger than fl.num_clients ({self.num_clients})"
            )
        _positive("fl.lr", self.lr, strict=False)
        if not 0 <= self.lr_min <= self.lr:
            raise UserError(f"fl.lr_min must be in [0, fl.lr={self.lr:g}], got {self.lr_min!r}")
        _positive("fl.weight_decay", self.weight_decay, strict=False)
        _positive("fl.prox_mu", self.prox_mu, strict=False)
        _positive("fl.server_lr", self.server_lr)
        for k in ("server_momentum", "server_b1", "server_b2"):
            _in_unit(f"fl.{k}", getattr(self, k))
        _positive("fl.server_tau", self.server_tau)


@dataclasses.dataclass(frozen=True)
class DPSection:
    mode: str = "none"  # none | local (the paper) | central (DP-FedAvg) | dpsgd (record level)
    clip_a: float = 0.1  # dpsgd: the per-example gradient clip (whole adapter)
    clip_b: float = 0.1
    scope: str = "per_matrix"  # per_matrix | per_factor | global
    target: str = "weights"  # weights | update
    noise: str = "classical"  # classical | analytic | multiplier | calibrate
    epsilon: float = 25.0  # classical/analytic: per release; calibrate: total
    delta: float = 1e-5
    noise_multiplier: float = 1.0  # noise: multiplier (sigma / C)
    neighbouring: str = "replace-one"
    budget: float | None = None  # stop before the worst client's epsilon would exceed it
    stats_every: int = 0  # write the paper's noise statistics CSV every k rounds (0: never)
    stats_samples: int = 100  # Monte-Carlo draws per matrix for those statistics
    # outside the guarantee, only on request: client training loss / update norm, realised cohort
    # sizes and drop counts (published marked as such in metrics, progress bar and summary)
    publish_client_metrics: bool = False
    # the clients' example counts are public: aggregation may weight by them (else uniform weights)
    public_counts: bool = False
    # central DP: adaptive clipping (Andrew et al. 2021): the clip (starting at dp.clip_a) moves
    # geometrically toward the target quantile of the clients' update norms, estimated from a noisy
    # count; the two noises are accounted as one Gaussian of multiplier dp.noise_multiplier (or the
    # calibrated one). Needs dp.scope global.
    adaptive_clip: bool = False
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    clip_count_noise: float | None = None  # std of the noise on the clipped-client count (default K/20)
    # the root of the DP noise (and of central DP's client draws and DP-SGD's batch draws). None: drawn
    # from OS entropy at the start of a run and kept only in checkpoints/ (the server's private
    # state). Set it only to reproduce a run's noise: anyone with config.yaml can then remove it.
    noise_seed: int | None = None

    def __post_init__(self):
        _check_types(self, "dp.")
        from .privacy.modes import names as dp_modes  # the registry of mechanisms is the list of modes

        _choice("dp.mode", self.mode, dp_modes())
        _choice("dp.scope", self.scope, ("per_matrix", "per_factor", "global"))
        _choice("dp.target", self.target, ("weights", "update"))
        _choice("dp.noise", self.noise, ("classical", "analytic", "multiplier", "calibrate"))
        _choice("dp.neighbouring", self.neighbouring, ("replace-one", "add-remove"))
        _positive("dp.clip_a", self.clip_a)
        _positive("dp.clip_b", self.clip_b)
        _positive("dp.epsilon", self.epsilon)
        _positive("dp.noise_multiplier", self.noise_multiplier, strict=False)
        if self.budget is not None:
            _positive("dp.budget", self.budget)
        if not 0 < self.target_quantile < 1:
            raise UserError(f"dp.target_quantile must be in (0, 1), got {self.target_quantile!r}")
        _positive("dp.clip_lr", self.clip_lr)
        if self.clip_count_noise is not None:
            _positive("dp.clip_count_noise", self.clip_count_noise)
        _at_least("dp.stats_every", self.stats_every, 0)
        if self.stats_samples < 2:
            raise UserError(f"dp.stats_samples must be >= 2, got {self.stats_samples}")
        if not 0 < self.delta < 1:
            raise UserError(f"dp.delta must be in (0, 1), got {self.delta}")


WRITERS = ("tensorboard", "wandb")  # logging.writers: optional writers besides metrics.jsonl/.csv


@dataclasses.dataclass(frozen=True)
class LoggingSection:
    """Where a run's metrics rows go. metrics.jsonl and metrics.csv always get EVERY round (resume and
    the summary read them); log_every thins only the optional writers and the progress bar."""

    # write a row to the writers below and the progress bar every k rounds; evaluation rounds, the
    # last round and the round where a run stops (budget, Ctrl-C, stop_after) are always written
    log_every: int = 1
    # optional writers, each writes the metrics.jsonl rows (same names, step = round), nothing more:
    # tensorboard (RUN/tensorboard; pip extra fedlora-jax[tensorboard]) | wandb (RUN/wandb; fedlora-jax[wandb])
    writers: tuple[str, ...] = ()
    wandb_project: str = "fedlora-jax"
    wandb_mode: str = "offline"  # offline (upload later: wandb sync RUN/wandb/offline-run-*) | online

    def __post_init__(self):
        object.__setattr__(self, "writers", tuple(self.writers))
        _check_types(self, "logging.")
        _at_least("logging.log_every", self.log_every, 1)
        _strings("logging.writers", self.writers, empty_ok=True)
        for w in self.writers:
            _choice("logging.writers entry", w, WRITERS)
        if len(set(self.writers)) < len(self.writers):
            raise UserError(f"logging.writers lists a writer twice ({', '.join(self.writers)}); name each once")
        if not self.wandb_project.strip():
            raise UserError("logging.wandb_project is empty; give the W&B project name")
        _choice("logging.wandb_mode", self.wandb_mode, ("offline", "online"))


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
        _strings("eval_tasks", self.eval_tasks, empty_ok=True)
        for t in self.eval_tasks:
            _choice("eval_tasks entry", t, ("loss", "exact_match", "multiple_choice"))
        _at_least("eval_every", self.eval_every, 0)
        _at_least("eval_batches", self.eval_batches, 1)
        _at_least("checkpoint_every", self.checkpoint_every, 0)
        if self.eval_limit < 1:
            raise UserError(f"eval_limit must be >= 1, got {self.eval_limit}")
        if not self.eval_choices.strip():
            raise UserError("eval_choices is empty; give 'synthetic', a local file or a hub id")

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

    def to_yaml(self) -> str:
        """Every key with its value or default, as YAML: RUN/config.yaml and `fedlora-jax config`."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _build(cls, data, prefix: str):
    where = prefix[:-1] or "the config"
    if data is None:
        raise UserError(f"{where} is empty; give its keys (e.g. {prefix}KEY: VALUE) or leave it out")
    if not isinstance(data, dict):
        raise UserError(f"{where} must be a mapping of keys to values, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kw = {}
    for k, v in data.items():
        if k not in fields:
            raise UserError(f"unknown config key {prefix + str(k)!r}; allowed: {', '.join(fields)}")
        t = hints[k]
        if dataclasses.is_dataclass(t):
            kw[k] = _build(t, v, f"{prefix}{k}.")
        else:
            kw[k] = _coerce(v, t, f"{prefix}{k}")
    return cls(**kw)


def _number(v, target, name):
    if isinstance(v, str):
        try:  # YAML 1.1 reads 3e-2 (no dot) as a string
            v = float(v)
        except ValueError:
            raise UserError(f"{name} must be a number, got {v!r}") from None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise UserError(f"{name} must be a number, got {v!r}")
    if not math.isfinite(v):
        raise UserError(f"{name} must be a finite number, got {v!r}")
    if target is int:
        if v != int(v):
            raise UserError(f"{name} must be an integer, got {v!r}")
        return int(v)
    return float(v)


def _coerce(v, t, name):
    """A YAML value as the field's type, or a UserError naming the key."""
    target, optional = _unwrap(t)
    if v is None:
        if optional:
            return None
        raise UserError(f"{name} needs a value, got an empty one")
    origin = typing.get_origin(target) or target
    if target is bool:
        if not isinstance(v, bool):
            raise UserError(f"{name} must be true or false, got {v!r}")
        return v
    if target in (int, float):
        return _number(v, target, name)
    if target is str:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            return str(v)  # name: 2024
        if not isinstance(v, str):
            raise UserError(f"{name} must be a string, got {v!r}")
        return v
    if origin is tuple:
        item = (typing.get_args(target) or (str,))[0]
        if isinstance(v, str):  # q_proj,v_proj
            v = [s.strip() for s in v.split(",") if s.strip()]
        elif not isinstance(v, (list, tuple)):
            if isinstance(v, dict):
                raise UserError(f"{name} must be a list, got {v!r}")
            v = [v]
        return tuple(_coerce(x, item, f"{name} entry") for x in v)
    if origin is dict:
        if not isinstance(v, dict):
            raise UserError(f"{name} must be a mapping, got {v!r}")
        return {k: _coerce(x, str, f"{name}.{k}") for k, x in v.items()}
    return v


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error in a few words on one line, with its line and column when known."""
    mark, what = getattr(e, "problem_mark", None), getattr(e, "problem", None)
    ctx, ctx_mark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if what is None:
        what, mark, ctx = ctx or str(e), ctx_mark, None
    text = (f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else "") + str(what)
    if ctx and ctx_mark is not None:
        text += f" ({ctx} started at line {ctx_mark.line + 1}, column {ctx_mark.column + 1})"
    return " ".join(text.split())


def _read_yaml(path: Path, label: str):
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{label} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None
    except OSError as e:
        raise UserError(f"cannot read {label}: {e.strerror or e}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{label} is not valid YAML ({_yaml_problem(e)})") from None
    except RecursionError:
        raise UserError(f"{label} nests too deeply to be a config") from None


def load_config(path_or_preset: str | None = None, overrides: list[str] = ()) -> RunConfig:
    """A RunConfig from a YAML file or a preset name in fedlora_jax/configs (default: 'default'),
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
