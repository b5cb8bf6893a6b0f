"""Central DP (DP-FedAvg, user level): the server noises the sum of clipped updates; optional
adaptive clipping."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import jax
import jax.numpy as jnp

from ...core.errors import UserError
from ...core.pytypes import Array, Key, Tree
from ...federated import sampling
from .. import accounting as acc
from . import local as modes_local  # noqa: F401  (registers first, whichever module is imported first: the table's order)
from . import primitives as prim
from .base import _DP, register

if TYPE_CHECKING:
    import numpy as np

    from ...config.run_config import RunConfig


@register
class CentralDP(_DP):
    """DP-FedAvg (user level): each client's update is clipped to C; the trusted server adds
    N(0, (zC)^2) to the sum in EVERY round (empty or all-dropped cohorts included) and divides by
    the expected cohort; Poisson client sampling at rate q amplifies (the draw must be secret)."""

    name: ClassVar[str] = "central"
    sums_updates: ClassVar[bool] = True
    participation_public: ClassVar[bool] = False
    controls_private: ClassVar[bool] = False
    adaptive_clipping: ClassVar[bool] = True
    sampling_secret: ClassVar[bool] = True

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        super().check_config(cfg)
        fl = cfg.fl
        if cfg.dp.adaptive_clip and cfg.dp.scope != "global":
            raise UserError(
                f"dp.adaptive_clip clips each update as one vector: it needs dp.scope global, not {cfg.dp.scope}"
            )
        if fl.sampling not in ("poisson", "cyclic"):
            raise UserError(
                f"dp.mode {cls.name} needs fl.sampling poisson (amplified by sampling) or cyclic (accounted "
                f"without amplification), not {fl.sampling}"
            )
        if fl.aggregation == "stack":
            raise UserError(
                "dp.mode central with fl.aggregation stack is not supported: central noise is "
                "added to the sum of clipped adapter updates, which stacking does not release; use "
                "fl.aggregation mean, or dp.mode local with stack"
            )

    def calibrate(self) -> None:
        dp, fl = self.cfg.dp, self.cfg.fl
        self.clip_b = dp.clip_a if dp.scope == "global" else dp.clip_b
        n_a, n_b, ca, cb = prim.clip_blocks(self.lora, dp.scope, dp.clip_a, dp.clip_b)
        # the sum's sensitivity over the clipped blocks, C sqrt(L) (add-remove: a client's update moves it
        # by at most that; dp-accounting's replace-one relation takes the same per-client bound and
        # doubles the distance itself)
        factor = 1.0 / prim.effective_noise_multiplier(n_a, n_b, ca, cb, ca, cb if n_b else 1.0, "add-remove")
        neighbouring = self.neighbouring
        # amplification by sampling needs every client present and drawn independently each round: not
        # under cyclic groups, nor under diurnal availability (the server cannot sample uniformly)
        self.amplified = fl.sampling == "poisson" and fl.availability != "diurnal"
        q = fl.clients_per_round / fl.num_clients if self.amplified else 1.0
        # without amplification a client's releases compose as Gaussians: the most it can take part in
        self.planned = -(-fl.rounds // sampling.min_separation(self.cfg))
        # classical / analytic: one release (no sampling) meets dp.epsilon over all L clipped blocks,
        # a replaced client moving the sum twice as far as an added one
        one_release = factor * (2.0 if neighbouring == "replace-one" else 1.0)
        if dp.noise == "classical":
            z = prim.classical_noise_multiplier(dp.epsilon, dp.delta) * one_release
        elif dp.noise == "analytic":
            z = acc.gaussian_multiplier_for(dp.epsilon, 1, dp.delta) * one_release
        elif dp.noise == "multiplier":
            z = dp.noise_multiplier
        elif self.amplified:
            z = acc.sampled_multiplier_for(dp.epsilon, q, fl.rounds, dp.delta, neighbouring) * factor
        else:
            z = acc.gaussian_multiplier_for(dp.epsilon, self.planned, dp.delta) * one_release
        self.z, self.z_eff = z, z / factor
        acc.check_sampled_noise(self.z_eff, "dp.mode central")
        self.adaptive = dp.adaptive_clip
        self.z_update = z
        if self.adaptive:  # Andrew et al. 2021: z^-2 = z_update^-2 + (2 sigma_count)^-2
            self.count_noise = dp.clip_count_noise or fl.clients_per_round / 20.0
            if z >= 2 * self.count_noise:
                raise UserError(
                    f"dp.adaptive_clip: the noise multiplier {z:.4g} leaves nothing for the update once "
                    f"the count noise {self.count_noise:.4g} is paid (needs multiplier < 2 x "
                    f"dp.clip_count_noise); raise dp.clip_count_noise (default K/20) or lower the noise"
                )
            self.z_update = (z**-2 - (2 * self.count_noise) ** -2) ** -0.5
        self.sigma_a, self.sigma_b = self.z_update * dp.clip_a, self.z_update * self.clip_b
        self.blocks = (n_a, n_b)
        self._ledger(q)
        self.info = {
            **self.noise_info(z, n_a, n_b, "every client (its whole data)"),
            "mechanism": (
                f"central DP: Gaussian, {n_a} A and {n_b} B blocks clipped ({dp.scope}), "
                f"sigma_A {self.sigma_a:.4g}, sigma_B {self.sigma_b:.4g} on the sum in every "
                f"round, {neighbouring}, " + self._sampling_text(q)
            ),
        }
        if self.adaptive:
            self.info.update(
                adaptive_clip=True,
                update_noise_multiplier=self.z_update,
                clip_count_noise=self.count_noise,
                target_quantile=dp.target_quantile,
                clip_lr=dp.clip_lr,
                initial_clip=dp.clip_a,
            )
            self.info["mechanism"] += (
                f"; adaptive clipping toward the {dp.target_quantile:g} quantile (initial "
                f"{dp.clip_a:g}, lr {dp.clip_lr:g}): update noise multiplier "
                f"{self.z_update:.4g} x clip and count noise {self.count_noise:.4g}, "
                f"accounted together as one Gaussian of multiplier {z:.4g}"
            )

    def _ledger(self, q: float) -> None:
        dp, fl = self.cfg.dp, self.cfg.fl
        self.capacity, self.overflow = fl.clients_per_round, 0.0
        if not self.amplified:  # per client: its participations compose (a replaced client moves twice as far)
            z_gauss = self.z_eff / (2.0 if self.neighbouring == "replace-one" else 1.0)
            self.ledger = acc.Ledger("local", fl.num_clients, z_gauss, dp.delta, self.neighbouring)
            if fl.sampling == "poisson":  # an overflow only leaves clients out: no term in delta without amplification
                self.capacity = sampling.poisson_capacity(fl.num_clients, fl.clients_per_round, self.cohort_tail)[0]
            return
        self.ledger = acc.Ledger("central", fl.num_clients, self.z_eff, dp.delta, self.neighbouring, sampling_rate=q)
        # the capacity's overflow adds (1 + e^eps) x rounds x tail to delta: the tail is chosen from the
        # run's planned epsilon so that the term stays within sampling.OVERFLOW_SHARE of dp.delta
        planned = (
            dp.epsilon
            if dp.noise == "calibrate"
            else acc.sampled_epsilon(self.z_eff, q, fl.rounds, dp.delta, self.neighbouring)[0]
        )
        self.cohort_tail = sampling.capacity_tail(planned, dp.delta, fl.rounds)
        self.capacity, self.overflow = sampling.poisson_capacity(fl.num_clients, fl.clients_per_round, self.cohort_tail)

    def _sampling_text(self, q: float) -> str:
        fl = self.cfg.fl
        if self.amplified:
            return (
                f"Poisson client sampling q={q:g}, PLD; cohorts padded to {self.capacity} slots (overflow "
                f"probability {self.overflow:.2g} per round, added to delta)"
            )
        why = "cyclic participation" if fl.sampling == "cyclic" else "diurnal availability"
        return (
            f"NO amplification by sampling ({why}): each client's participations compose as Gaussian "
            f"releases (at most {self.planned}), exact"
        )

    def init_state(self) -> dict:
        return {"clip": jnp.asarray(self.cfg.dp.clip_a, jnp.float32)} if self.adaptive else {}

    def _clips(self, mstate: dict | None) -> tuple[Array | float, Array | float]:
        if self.adaptive:
            return mstate["clip"], mstate["clip"]
        return self.cfg.dp.clip_a, self.clip_b

    def release(
        self, local: Tree, global_: Tree, key: Key, rank: Array | None = None, mstate: dict | None = None
    ) -> Tree:
        clip_a, clip_b = self._clips(mstate)
        upd, _ = prim.clip(jax.tree.map(jnp.subtract, local, global_), clip_a, clip_b, self.cfg.dp.scope)
        return jax.tree.map(jnp.add, global_, upd)

    def client_stat(self, local: Tree, global_: Tree, mstate: dict) -> Array:
        if not self.adaptive:
            return jnp.zeros((), jnp.float32)
        upd = jax.tree.map(jnp.subtract, local, global_)
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(upd)))
        # centred: b - 1/2, so adding or removing a client moves the sum by 1/2 (the sensitivity the
        # combined multiplier z^-2 = z_u^-2 + (2 sigma_count)^-2 assumes)
        return (norm <= mstate["clip"]).astype(jnp.float32) - 0.5

    def update_state(self, mstate: dict, stat_sum: Array, key: Key, expected_cohort: int) -> dict:
        """C <- C exp(-lr (b - gamma)), b = (sum of (b_i - 1/2) + N(0, sigma_count^2)) / K + 1/2, an unbiased
        estimate of the fraction of clients within the clip."""
        if not self.adaptive:
            return mstate
        dp = self.cfg.dp
        noisy = (stat_sum + self.count_noise * jax.random.normal(key, (), jnp.float32)) / expected_cohort + 0.5
        return {**mstate, "clip": mstate["clip"] * jnp.exp(-dp.clip_lr * (noisy - dp.target_quantile))}

    def round_values(self, mstate: dict) -> dict:
        return {"clip": mstate["clip"]} if self.adaptive else {}

    def weight(self, num_examples: Array) -> Array:
        return jnp.ones_like(num_examples)  # the sum's sensitivity is C only if every client counts once

    def finalize_sum(
        self, total: Tree, global_: Tree, key: Key, expected_cohort: int, mstate: dict | None = None
    ) -> Tree:
        clip_a, clip_b = self._clips(mstate)  # the noise scales with the clip of this round
        noisy = prim.add_noise(total, key, self.z_update * clip_a, self.z_update * clip_b)
        return jax.tree.map(lambda x, t: x + t / expected_cohort, global_, noisy)

    def privacy_row(self, participations: np.ndarray) -> dict:
        eps = self.ledger.worst()
        # a capped cohort is within total-variation distance rounds x overflow of the analysed one
        delta = self.cfg.dp.delta + acc.tv_delta(eps, self.ledger.rounds * self.overflow)
        return {"epsilon": eps, "epsilon_mean": self.ledger.mean(), "delta": delta}
