"""The run config's sections as frozen dataclasses (every key, its default, its checks); RunConfig in
run_config.py holds one of each. The model's and LoRA's sections are in model_sections.py."""

from __future__ import annotations

import dataclasses

from ..core import choices  # the names a config may choose (the ground floor: no implementation)
from ..core.choices import PARTITIONS
from ..core.errors import UserError
from ..core.numerics import MAX_ROUNDS
from .checks import _at_least, _check_types, _choice, _in_unit, _positive, _strings
from .model_sections import TINY_SHAPE, LoRASection, ModelSection  # noqa: F401  (re-exported)

SYNTHETIC_TASKS = ("arithmetic", "reverse", "sort", "copy")  # data.synthetic generates these


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
    partition: str = "iid"  # iid | dirichlet | dirichlet_balanced | by_column
    dirichlet_alpha: float = 0.5
    synthetic_tasks: tuple[str, ...] = SYNTHETIC_TASKS
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

        _choice("data.template", self.template, choices.TEMPLATES)
        _choice("data.partition", self.partition, PARTITIONS)
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
    # uniform (fixed size, the paper) | poisson (central DP) | cyclic (ceil(N/K) fixed groups, group
    # t mod b in round t: a client takes part at most once every b rounds; BandMF's participation)
    sampling: str = "uniform"
    # who can take part: always | diurnal (each client in a window of every availability_period rounds,
    # its phase and window width drawn per client) | dropout (a picked client fails to report with
    # probability fl.dropout; it still counts as picked for privacy)
    availability: str = "always"
    availability_period: int = 24
    availability_window: float = 0.5  # diurnal: mean share of the period a client is available
    dropout: float = 0.1
    # dropout: p x (examples one round reads, batch_size x local_steps) / the client's examples, capped at 1
    dropout_by_size: bool = False
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
    clients_per_chunk: int | None = None  # clients vmapped at once (memory ~ chunk); unset: plan.auto_chunk
    # the device mesh: N (each chunk's clients over N devices) or [clients, model] (the base also
    # split over 'model' devices: for bases that do not fit one chip); see fedlora_jax.federated.mesh
    devices: tuple[int, ...] = (1,)
    distributed: bool = False  # multi-host: jax.distributed.initialize() before the mesh is built

    def __post_init__(self):
        _check_types(self, "fl.")
        _choice("fl.algorithm", self.algorithm, choices.names("fl.algorithm"))
        _choice("fl.aggregation", self.aggregation, choices.names("fl.aggregation"))
        _choice("fl.sampling", self.sampling, choices.SAMPLINGS)
        _choice("fl.availability", self.availability, choices.AVAILABILITIES)
        if self.availability_period < 1:
            raise UserError(f"fl.availability_period must be >= 1 round, got {self.availability_period}")
        if not 0 < self.availability_window <= 1:
            raise UserError(f"fl.availability_window must be in (0, 1], got {self.availability_window!r}")
        if not 0 <= self.dropout < 1:
            raise UserError(f"fl.dropout must be in [0, 1), got {self.dropout!r}")
        for k in ("num_clients", "clients_per_round", "rounds", "local_steps", "batch_size"):
            if getattr(self, k) < 1:
                raise UserError(f"fl.{k} must be >= 1, got {getattr(self, k)}")
        if self.rounds > MAX_ROUNDS:
            raise UserError(
                f"fl.rounds = {self.rounds} is above the most this tool runs ({MAX_ROUNDS:,}): its sampling "
                "schedule and accountants would run for hours before the first round"
            )
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
    # none | local (the paper) | central (DP-FedAvg) | dpsgd (record level) | bandmf (DP-FTRL with a
    # banded matrix factorization: noise correlated over dp.band rounds; needs fl.sampling cyclic)
    mode: str = "none"
    band: int = 4  # bandmf: rounds a noise draw reaches (1: independent noise, DP-FedAvg unamplified)
    clip_a: float = 0.1  # dpsgd: the per-example gradient clip (whole adapter)
    clip_b: float = 0.1
    scope: str = "per_matrix"  # per_matrix | per_factor | global
    target: str = "weights"  # weights | update
    noise: str = "classical"  # classical | analytic | multiplier | calibrate
    epsilon: float = 25.0  # classical/analytic: per release; calibrate: total
    delta: float = 1e-5
    noise_multiplier: float = 1.0  # noise: multiplier (sigma / C)
    # the neighbouring relation the epsilon is for; None: the mode's own (local: replace-one; central:
    # add-remove; dpsgd: add-remove, or replace-one with dp.public_counts, whose counts a record cannot change)
    neighbouring: str | None = None
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
        _choice("dp.mode", self.mode, choices.names("dp.mode"))
        _choice("dp.scope", self.scope, choices.SCOPES)
        _choice("dp.target", self.target, choices.TARGETS)
        _choice("dp.noise", self.noise, choices.NOISE)
        if self.neighbouring is not None:
            _choice("dp.neighbouring", self.neighbouring, choices.NEIGHBOURING)
        _positive("dp.clip_a", self.clip_a)
        if isinstance(self.band, bool) or self.band < 1:
            raise UserError(f"dp.band must be an integer >= 1 (rounds a noise draw reaches), got {self.band!r}")
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
        if self.noise_seed is not None and not 0 <= self.noise_seed < 2**64:
            raise UserError(
                f"dp.noise_seed must be an integer in [0, 2**64) (its 64 bits are all used), got {self.noise_seed}"
            )


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
