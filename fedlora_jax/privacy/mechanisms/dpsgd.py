"""Record-level DP-SGD inside each client: Poisson batches, per-example clip and noise."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from ...core.errors import UserError
from ...core.pytypes import Key
from ...federated import sampling
from .. import accounting as acc
from . import central as modes_central  # noqa: F401  (registers first, whichever module is imported first: the table's order)
from .base import _DP, register

if TYPE_CHECKING:
    import numpy as np


@register
class DPSGD(_DP):
    """Record-level DP-SGD inside each client: Poisson batches at rate q_c = min(1, B / n_c) (accounted
    at the largest rate; the rates use the clients' example counts), per-example clip dp.clip_a,
    N(0, (z C)^2) on each step's clipped sum. Everything a client sends is post-processing of noisy
    steps, so SCAFFOLD's controls are covered."""

    name: ClassVar[str] = "dpsgd"
    record_level: ClassVar[bool] = True

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        if cfg.dp.public_counts and cfg.dp.neighbouring == "add-remove":
            raise UserError(
                "dp.mode dpsgd with dp.public_counts true declares the clients' example counts public, which adding "
                "or removing a record would change: set dp.neighbouring replace-one (or leave it unset)"
            )

    @property
    def neighbouring(self) -> str:
        """replace-one where the counts are public (a record can only be replaced), else add-remove."""
        return self.cfg.dp.neighbouring or ("replace-one" if self.cfg.dp.public_counts else "add-remove")

    def calibrate(self) -> None:
        from ...data.batches import BATCH_TAIL, poisson_capacity, poisson_capacity_bound

        dp, fl = self.cfg.dp, self.cfg.fl
        sizes = None
        if self.client_sizes is None:  # shape-only planning: rate 1 (the capacity bound needs no data)
            q = 1.0
        else:
            sizes = sorted({int(n) for n in self.client_sizes})
            if not sizes or sizes[0] < 1:
                raise UserError("dp.mode dpsgd: a client holds no training examples; use fewer clients or more data")
            q = min(1.0, fl.batch_size / sizes[0])
        planned = int(sampling.config_counts(self.cfg).max())
        steps = fl.local_steps * planned
        if dp.noise == "multiplier":
            z = dp.noise_multiplier
        elif dp.noise == "calibrate":
            z = acc.sampled_multiplier_for(dp.epsilon, q, steps, dp.delta, self.neighbouring)
        else:
            raise UserError(f"dp.noise = {dp.noise!r} is not defined for dp.mode dpsgd; choose calibrate or multiplier")
        self.z = self.z_eff = z
        acc.check_sampled_noise(z, "dp.mode dpsgd")
        # padded batches add (1 + e^eps) x steps x tail to delta: the tail follows the planned epsilon
        eps_plan = (
            dp.epsilon if dp.noise == "calibrate" else acc.sampled_epsilon(z, q, steps, dp.delta, self.neighbouring)[0]
        )
        self.batch_tail = sampling.capacity_tail(eps_plan, dp.delta, steps, ceiling=BATCH_TAIL)
        if sizes is None:
            capacity, overflow = poisson_capacity_bound(fl.batch_size, self.batch_tail or sampling.SMALLEST_TAIL), 0.0
        else:
            capacity, overflow = poisson_capacity(sizes, fl.batch_size, self.batch_tail)
        self.sigma_a = self.sigma_b = z * dp.clip_a
        self.batch_rate, self.capacity, self.overflow = q, capacity, overflow
        self.ledger = acc.Ledger(
            "dpsgd", fl.num_clients, z, dp.delta, self.neighbouring, sampling_rate=q, local_steps=fl.local_steps
        )
        self.info = {
            "noise_multiplier": z,
            "effective_noise_multiplier": z,
            "sigma_a": self.sigma_a,
            "sigma_b": self.sigma_b,
            "clipped_blocks": [0, 0],
            "neighbouring": self.neighbouring,
            "delta": dp.delta,
            "batch_sampling_rate": q,
            "batch_capacity": capacity,
            "overflow_probability": overflow,
            "epsilon_of": "a record of the worst client",
            "mechanism": (
                f"dpsgd (record level): Poisson-sampled Gaussian per local step, rate q={q:.4g} "
                f"(largest client rate; the rates use the clients' example counts), "
                f"per-example clip {dp.clip_a:g}, sigma {self.sigma_a:.4g} on the clipped sum, "
                f"{self.neighbouring}, {fl.local_steps} steps per participation, PLD; batches padded to "
                f"{capacity} (overflow probability {overflow:.2g} per step, added to delta)"
            ),
        }

    def dpsgd_args(self, key: Key) -> tuple[float, float, Key, float]:
        return (self.cfg.dp.clip_a, self.sigma_a, key, float(self.cfg.fl.batch_size))

    def truncation_delta(self, epsilon: float, steps: int) -> float:
        """The delta padded batches add: total-variation distance <= a record's sampled steps x the
        per-step overflow probability (accounting.tv_delta)."""
        return acc.tv_delta(epsilon, steps * self.overflow)

    def privacy_row(self, participations: np.ndarray) -> dict:
        eps = self.ledger.worst()
        return {
            "epsilon": eps,
            "epsilon_mean": self.ledger.mean(),
            "delta": self.cfg.dp.delta
            + self.truncation_delta(eps, self.cfg.fl.local_steps * int(participations.max())),
        }
