"""Local DP (the paper): each client clips and noises its own release."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import jax.numpy as jnp

from ...adapters import lora as lora_lib
from ...core.pytypes import Array, Key, Tree
from ...federated import sampling
from .. import accounting as acc
from . import primitives as prim
from .base import _DP, register

if TYPE_CHECKING:
    import numpy as np


@register
class LocalDP(_DP):
    """The paper: each client clips its factors (or update) and adds Gaussian noise before sending.
    A client's releases compose over its participations; who takes part is public (no amplification)."""

    name: ClassVar[str] = "local"
    controls_private: ClassVar[bool] = False
    default_neighbouring: ClassVar[str] = "replace-one"

    def calibrate(self) -> None:
        cfg = self.cfg
        dp, fl = cfg.dp, cfg.fl
        global_scope = dp.scope == "global"
        self.clip_b = dp.clip_a if global_scope else dp.clip_b
        n_a, n_b, ca, cb = prim.clip_blocks(self.lora, dp.scope, dp.clip_a, dp.clip_b)
        if cfg.lora.freeze_a:  # A is frozen, shared and public: only B is released (and clipped)
            n_a, n_b, ca, cb = (0, 1, dp.clip_a, dp.clip_a) if global_scope else (0, n_b, ca, cb)
        neighbouring = self.neighbouring
        factor = 1.0 / prim.effective_noise_multiplier(n_a, n_b, ca, cb, ca, cb if n_b else 1.0, neighbouring)
        self.planned = int(sampling.config_counts(cfg).max())
        if dp.noise == "classical":
            z = prim.classical_noise_multiplier(dp.epsilon, dp.delta)
        elif dp.noise == "analytic":
            z = acc.gaussian_multiplier_for(dp.epsilon, 1, dp.delta) * factor
        elif dp.noise == "multiplier":
            z = dp.noise_multiplier
        else:  # calibrate: the most-sampled client of the seeded schedule ends at the target
            z = acc.gaussian_multiplier_for(dp.epsilon, self.planned, dp.delta) * factor
        self.z, self.z_eff = z, z / factor
        self.sigma_a = z * dp.clip_a
        self.sigma_b = z * self.clip_b
        self.blocks = (n_a, n_b)
        self.ledger = acc.Ledger(
            "local",
            fl.num_clients,
            self.z_eff,
            dp.delta,
            neighbouring,
            sampling_rate=fl.clients_per_round / fl.num_clients,
        )
        self.info = {
            **self.noise_info(z, n_a, n_b, "worst client (its whole data)"),
            "mechanism": (
                f"local DP: Gaussian, {n_a} A and {n_b} B blocks clipped ({dp.scope}), "
                f"sigma_A {self.sigma_a:.4g}, sigma_B {self.sigma_b:.4g}, {neighbouring}, "
                f"composed over each client's participations, no amplification"
            ),
        }

    def release(
        self, local: Tree, global_: Tree, key: Key, rank: Array | None = None, mstate: dict | None = None
    ) -> Tree:
        dp, freeze_a = self.cfg.dp, self.cfg.lora.freeze_a
        if freeze_a:  # clip and noise B alone; A is the public frozen A
            local = lora_lib.map_modules(lambda a, b: (jnp.zeros_like(a), b), local)
            global_in = lora_lib.map_modules(lambda a, b: (jnp.zeros_like(a), b), global_)
        else:
            global_in = global_
        released = prim.privatize(
            local,
            global_in,
            key,
            clip_a=dp.clip_a,
            clip_b=self.clip_b,
            sigma_a=self.sigma_a,
            sigma_b=self.sigma_b,
            scope=dp.scope,
            target=dp.target,
        )
        if rank is not None:  # post-processing: keep the padded entries of a low-rank client at zero
            released = lora_lib.rank_mask(released, rank)
        if freeze_a:
            released = lora_lib.map_modules(lambda a, a0, b, b0: (a0, b), released, global_)
        return released

    def privacy_row(self, participations: np.ndarray) -> dict:
        p = int(participations.max())
        per_release, tracker = acc.paper_epsilon(self.z, self.cfg.dp.delta, p)
        return {
            "epsilon": self.ledger.worst(),
            "epsilon_mean": self.ledger.mean(),
            "delta": self.cfg.dp.delta,
            "epsilon_rdp": acc.gaussian_epsilon_rdp(self.z_eff, p, self.cfg.dp.delta),
            "epsilon_paper": per_release,
            "epsilon_paper_tracker": tracker,
        }
