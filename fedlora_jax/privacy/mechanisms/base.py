"""The mechanism base class and the table it registers in (see modes.py, the registry's front door).

`Mechanism` is mode `none` (no DP) and defines every hook a round, the run loop, the planner and the
CLI call; `_DP` holds what the DP modes share (accounted values only, uniform weights). The DP modes
themselves live in modes_local.py, modes_central.py and modes_dpsgd.py.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, ClassVar

import jax.numpy as jnp
import numpy as np

from ...core import choices, randomness
from ...core.errors import UserError
from ...core.numerics import all_finite as _all_finite
from ...core.pytypes import Array, Key, Tree
from ...data.batches import BATCH_TAIL
from ...federated import algorithms, sampling
from .. import accounting as acc

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ...config.run_config import RunConfig

MECHANISMS: dict[str, type[Mechanism]] = choices.table("dp.mode")  # the config's dp.mode choices

# values of a metrics row that come from the clients' un-noised training (outside any guarantee)
CLIENT_FIELDS = ("loss", "first_loss", "update_norm", "dropped")
UNPROTECTED_PREFIX = "unprotected_"


def register(cls: type[Mechanism]) -> type[Mechanism]:
    """Class decorator: add a mechanism to the table under cls.name."""
    MECHANISMS[cls.name] = cls
    return cls


@dataclasses.dataclass
class Mechanism:
    """No DP (`none`): the release is the local adapter, aggregation weights are example counts,
    every value may be published."""

    name: ClassVar[str] = "none"
    private: ClassVar[bool] = False
    sums_updates: ClassVar[bool] = False  # True: the server sums clipped updates and noises the sum
    participation_public: ClassVar[bool] = True  # who takes part may be published
    controls_private: ClassVar[bool] = True  # SCAFFOLD controls are covered by the guarantee
    record_level: ClassVar[bool] = False  # True: Poisson batches and per-example noise (DP-SGD)
    adaptive_clipping: ClassVar[bool] = False  # dp.adaptive_clip is defined for this mode
    sampling_secret: ClassVar[bool] = False  # the client draw must stay secret (amplification by sampling)
    default_neighbouring: ClassVar[str] = "add-remove"  # the relation when dp.neighbouring is unset

    cfg: RunConfig
    lora: Tree  # the adapter: arrays, or shapes (jax.ShapeDtypeStruct) for planning
    client_sizes: Sequence[int] | np.ndarray | None = None  # examples per client (None: shape-only planning)
    ledger: acc.Ledger | None = dataclasses.field(default=None, init=False)
    info: dict = dataclasses.field(default_factory=dict, init=False)
    sigma_a: float = dataclasses.field(default=0.0, init=False)
    sigma_b: float = dataclasses.field(default=0.0, init=False)
    # the Poisson cohort's per-round overflow probability (central DP sets it from its epsilon)
    cohort_tail: float = dataclasses.field(default=sampling.POISSON_TAIL, init=False)
    # DP-SGD's per-step batch overflow probability (dpsgd sets it from its epsilon)
    batch_tail: float = dataclasses.field(default=BATCH_TAIL, init=False)

    def __post_init__(self) -> None:
        self.check_config(self.cfg)
        self.calibrate()

    @property
    def neighbouring(self) -> str:
        """The neighbouring relation every epsilon of this mechanism is for (dp.neighbouring or the mode's)."""
        return self.cfg.dp.neighbouring or self.default_neighbouring

    # ------------------------------------------------------------------ host side
    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        """Cross-field checks of the config against what this mechanism can account for (no model,
        no calibration: experiments run them on every config before their first run)."""
        fl = cfg.fl
        if cls.private and algorithms.client_hook(fl).keeps_client_state and not cls.controls_private:
            raise UserError(
                f"fl.algorithm {fl.algorithm} with dp.mode {cls.name}: its per-client state (for "
                f"SCAFFOLD, the control variates) is computed from the clients' un-noised updates, "
                f"which this mode's guarantee does not cover; use another algorithm, dp.mode dpsgd, "
                f"or dp.mode none"
            )
        if cfg.dp.adaptive_clip and not cls.adaptive_clipping:
            raise UserError(f"dp.adaptive_clip is defined for dp.mode central, not {cls.name}")
        if cls.private and cfg.data.eval_per_client:
            raise UserError(
                f"data.eval_per_client evaluates on held-out shares of the clients' own data, which "
                f"dp.mode {cls.name}'s guarantee does not cover (the published eval loss would "
                f"leak them); use the shared held-out split (data.eval_per_client false)"
            )

    def calibrate(self) -> None:
        self.info = {"mechanism": "no DP"}

    @property
    def publish_client_metrics(self) -> bool:
        return not self.private or self.cfg.dp.publish_client_metrics

    def published_name(self, field: str) -> str | None:
        """The name under which a client-derived metric is published (None: not published).
        Outside the guarantee in a DP mode, the name carries UNPROTECTED_PREFIX."""
        if not self.private:
            return field
        if not self.cfg.dp.publish_client_metrics:
            return None
        return UNPROTECTED_PREFIX + field

    def publishes_cohort(self) -> bool:
        return self.participation_public or self.publish_client_metrics

    def privacy_row(self, participations: np.ndarray) -> dict:
        """The privacy columns of a metrics row after a round (empty without DP)."""
        return {}

    def budget_exceeded(self, next_ids: np.ndarray) -> bool:
        budget = self.cfg.dp.budget
        return self.ledger is not None and budget is not None and self.ledger.worst_after(next_ids) > budget

    def summary(self, participations: np.ndarray, last_row: dict | None) -> dict:
        out = dict(self.info)
        out["outside_guarantee"] = []
        return out

    # ------------------------------------------------------------------ jitted, per client
    def dpsgd_args(self, key: Key) -> tuple[float, float, Key, float] | None:
        """(clip, sigma, key, expected batch) for record-level DP-SGD inside local training, or None."""
        return None

    def init_state(self) -> dict:
        """The mechanism's own server state (arrays), carried in the round's state (e.g. the clip)."""
        return {}

    def release(
        self, local: Tree, global_: Tree, key: Key, rank: Array | None = None, mstate: dict | None = None
    ) -> Tree:
        """What one client sends (its adapter, in weight space)."""
        return local

    def client_stat(self, local: Tree, global_: Tree, mstate: dict) -> Array:
        """A per-client scalar the server sums (adaptive clipping: was the update within the clip?)."""
        return jnp.zeros((), jnp.float32)

    def update_state(self, mstate: dict, stat_sum: Array, key: Key, expected_cohort: int) -> dict:
        """The mechanism's state for the next round (from privatized quantities only)."""
        return mstate

    def round_values(self, mstate: dict) -> dict:
        """Accounted values of the round that a run may publish (e.g. the clip used)."""
        return {}

    def kept(self, released: Tree, loss: Array) -> Array:
        """Which clients the server aggregates: finite releases (and, without DP, finite losses)."""
        return _all_finite(released) & jnp.isfinite(loss)

    def weight(self, num_examples: Array) -> Array:
        """Aggregation weight of a kept client."""
        return num_examples

    # ------------------------------------------------------------------ jitted, server
    def finalize_sum(
        self, total: Tree, global_: Tree, key: Key, expected_cohort: int, mstate: dict | None = None
    ) -> Tree:
        """Central-style aggregate from the sum of clipped updates (only when sums_updates)."""
        raise NotImplementedError

    def finalize_sum_with_state(
        self, total: Tree, global_: Tree, key: Key, expected_cohort: int, mstate: dict
    ) -> tuple[Tree, dict]:
        """finalize_sum, and the mechanism's state after it (correlated noise keeps its past draws)."""
        return self.finalize_sum(total, global_, key, expected_cohort, mstate), mstate


register(Mechanism)


class _DP(Mechanism):
    """Shared by the DP modes: publishes only accounted values by default; uniform weights unless
    the example counts are declared public."""

    private: ClassVar[bool] = True

    def noise_info(self, z: float, n_a: int, n_b: int, epsilon_of: str) -> dict:
        """The noise fields of summary.json's privacy block that every Gaussian mode states."""
        return {
            "noise_multiplier": z,
            "effective_noise_multiplier": self.z_eff,
            "sigma_a": self.sigma_a,
            "sigma_b": self.sigma_b,
            "clipped_blocks": [n_a, n_b],
            "neighbouring": self.neighbouring,
            "delta": self.cfg.dp.delta,
            "epsilon_of": epsilon_of,
        }

    def kept(self, released: Tree, loss: Array) -> Array:
        # a function of the release only (post-processing); the un-noised loss plays no part
        return _all_finite(released)

    def weight(self, num_examples: Array) -> Array:
        if self.cfg.dp.public_counts:
            return num_examples
        return jnp.ones_like(num_examples)

    def summary(self, participations: np.ndarray, last_row: dict | None) -> dict:
        out = dict(self.info)
        led = self.ledger
        out.update(
            epsilon=led.worst(),
            epsilon_mean=led.mean(),
            rounds_accounted=led.rounds,  # every round whose release anything published depends on
            epsilon_paper=(last_row or {}).get("epsilon_paper"),
            epsilon_paper_tracker=(last_row or {}).get("epsilon_paper_tracker"),
            delta=(last_row or {}).get("delta", self.cfg.dp.delta),
            aggregation_weights=(
                "example counts (dp.public_counts: the counts are assumed public)"
                if self.cfg.dp.public_counts
                else "uniform over kept clients"
            ),
        )
        if self.participation_public:
            out["max_participations"] = int(participations.max())
        elif self.publish_client_metrics:
            out[UNPROTECTED_PREFIX + "max_participations"] = int(participations.max())
        out["outside_guarantee"] = (
            [UNPROTECTED_PREFIX + f for f in CLIENT_FIELDS]
            + ([] if self.participation_public else [UNPROTECTED_PREFIX + "clients"])
            if self.cfg.dp.publish_client_metrics
            else []
        )
        # wall-clock times are published in every run (metrics rows, summary): they depend on the machine
        # and, weakly, on the data (e.g. how many clients a round really had), and no epsilon covers them
        out["outside_guarantee"].append(
            "seconds and wall_seconds (wall-clock times of each round and of the run: no epsilon covers them)"
        )
        if self.cfg.dp.noise_seed is not None:
            out["noise_seed"] = (
                "fixed by dp.noise_seed in config.yaml: anyone with the config can reproduce and "
                "remove the noise, so the guarantee does NOT hold against them"
            )
            out["outside_guarantee"].append("noise (dp.noise_seed is published in config.yaml)")
        else:
            out["noise_seed"] = (
                f"secret: {randomness.ROOT_BITS} bits drawn from OS entropy, all of them in every JAX key "
                "(a threefry key holds 64 bits) and every numpy draw, kept only in checkpoints/ (the simulated "
                "server's private state, with the participation counts): do not publish checkpoints/"
            )
        out["noise_root_bits"] = randomness.ROOT_BITS
        if self.record_level and not self.cfg.dp.public_counts:
            out["outside_guarantee"].append(
                "batch_sampling_rate, noise_multiplier and epsilon are functions of the "
                "smallest client's example count (dp.public_counts: false)"
            )
        out["published"] = (
            "held-out evaluation on the shared held-out split (server data, not any client's), "
            "privatized aggregates, epsilon/delta"
            + (
                "; client training metrics marked 'unprotected_' are OUTSIDE the guarantee"
                if self.cfg.dp.publish_client_metrics
                else ""
            )
        )
        return out
