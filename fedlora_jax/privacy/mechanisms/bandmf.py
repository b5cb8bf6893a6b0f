"""DP-FTRL with a banded matrix factorization (BandMF; Choquette-Choo et al. 2023), user level.

Each round the server adds noise to the sum of clipped updates x_t, as central DP does, but the noise
of round t is (C^-1 w)_t: a combination of this round's fresh draw w_t and the last band - 1
rounds' noise, with C an n x n lower-triangular, `dp.band`-banded strategy matrix with unit-norm
columns, optimized for the prefix sums of the run's n = fl.rounds rounds (jax-privacy's
matrix_factorization.banded). What the server releases, x + z C^-1 w, is post-processing of the
Gaussian mechanism C x + z w. Under cyclic participation (each client in one group, group t mod b in
round t, so a client's participations are at least b >= band rounds apart) the columns a client
touches have disjoint support: its sensitivity is sqrt(k) x clip, k = ceil(n / b) (jax-privacy's
minsep_sensitivity_squared), and the whole run is ONE Gaussian of multiplier z / sqrt(k) per unit
clip; a client that took part j times has the epsilon of z / sqrt(j). No amplification by sampling
is used, so the guarantee does not depend on who is available when.

Adaptive clipping (dp.adaptive_clip) composes: round t's noise is z_u x clip_t x (C^-1 w)_t with clip_t
a function of earlier releases, i.e. post-processing of C (x / clip) + z_u w, whose per-round
sensitivity is 1; the noisy count of clipped clients is one more Gaussian per participation
(sensitivity 1/2, std sigma_count). Per participation the two give z^-2 = z_u^-2 + (2 sigma_count)^-2,
central DP's split, so the ledger is unchanged.

The streaming inverse's state (the last band noise values, adapter-sized each) is the mechanism's
state in the round: checkpointed with it, so a resume continues the same noise. Its fresh draw is
round t's server_noise key (the same draw central DP adds): with band 1 (C = I) the run is DP-FedAvg
without amplification, bit for bit.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import TYPE_CHECKING, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from ...core.errors import UserError
from ...core.pytypes import Key, Tree
from ...federated import sampling
from . import central as modes_central  # noqa: F401  (registers first: the table's order)
from . import primitives as prim
from .base import register
from .central import CentralDP

if TYPE_CHECKING:
    from ...config.run_config import RunConfig


@functools.lru_cache(maxsize=8)
def strategy(rounds: int, band: int):
    """The optimized banded strategy (jax-privacy's ColumnNormalizedBanded) for `rounds` rounds; band
    1 is the identity."""
    from jax_privacy.matrix_factorization import banded

    if band == 1:
        return banded.ColumnNormalizedBanded(params=jnp.ones((rounds, 1), jnp.float32))
    logging.getLogger("fedlora_jax").info(
        "optimizing the BandMF strategy for %d rounds, band %d (seconds; about 20 s at 1,000 rounds on one CPU core)",
        rounds,
        band,
    )
    return banded.optimize(rounds, bands=band)


def sensitivity_squared(c, rounds: int, min_sep: int) -> int:
    """A client's squared sensitivity per unit clip under min_sep-separated participation, from
    jax-privacy (k = ceil(rounds / min_sep) for a column-normalized banded C with band <= min_sep)."""
    from jax_privacy.matrix_factorization import banded

    return banded.minsep_sensitivity_squared(c, min_sep=min_sep, n=rounds)


@register
class BandMF(CentralDP):
    """DP-FTRL / BandMF: central noise correlated over dp.band rounds, cyclic participation, no
    amplification by sampling; accounted as one Gaussian by the strategy's sensitivity."""

    name: ClassVar[str] = "bandmf"
    adaptive_clipping: ClassVar[bool] = True  # the clip scales each round's noise; the count noise composes
    correlated_noise: ClassVar[bool] = True

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        super().check_config(cfg)
        fl, dp = cfg.fl, cfg.dp
        if fl.sampling != "cyclic":
            raise UserError(
                f"dp.mode bandmf needs fl.sampling cyclic (its accounting needs every client's "
                f"participations dp.band rounds apart), not {fl.sampling}"
            )
        groups = sampling.min_separation(cfg)
        if dp.band > groups:
            raise UserError(
                f"dp.band = {dp.band} is more than the {groups} cyclic groups (ceil(fl.num_clients / "
                f"fl.clients_per_round)): a client would return before its noise has passed; lower dp.band "
                f"to at most {groups} or lower fl.clients_per_round"
            )
        if dp.band > fl.rounds:
            raise UserError(f"dp.band = {dp.band} is more than fl.rounds = {fl.rounds}; use dp.band <= fl.rounds")

    def calibrate(self) -> None:
        super().calibrate()  # central DP without amplification: z, z_eff per participation, the ledger
        dp, fl = self.cfg.dp, self.cfg.fl
        self.strategy = strategy(fl.rounds, dp.band)
        self.min_sep = sampling.min_separation(self.cfg)
        # jax-privacy's min-separation sensitivity is k for a column-normalized banded C with band <= the
        # separation (disjoint column supports); it does not read C, so check what it assumes: every column
        # is a finite, nonzero row of the parameters (normalized to norm 1), none above the band
        params = np.asarray(self.strategy.params, np.float64)
        if (
            params.shape != (fl.rounds, dp.band)
            or not np.isfinite(params).all()
            or not (np.linalg.norm(params, axis=1) > 0).all()
        ):
            raise AssertionError(f"BandMF strategy parameters are not a {fl.rounds} x {dp.band} finite banded C")
        sens2 = sensitivity_squared(self.strategy, fl.rounds, self.min_sep)
        if sens2 != self.planned:  # unit columns, disjoint supports: the sum of k unit norms
            raise AssertionError(f"BandMF sensitivity^2 {sens2} != participations {self.planned}")
        self.inverse = self.strategy.inverse_as_streaming_matrix()
        self.info["mechanism"] = (
            f"BandMF (DP-FTRL): Gaussian noise correlated over {dp.band} rounds by an optimized banded "
            f"strategy for {fl.rounds} rounds, sigma_A {self.sigma_a:.4g}, sigma_B {self.sigma_b:.4g} per "
            f"fresh draw on the sum, {self.neighbouring}, cyclic participation (min separation "
            f"{self.min_sep} rounds, at most {self.planned} participations): sensitivity sqrt({sens2}) x "
            f"clip by jax-privacy, ONE Gaussian of multiplier {self.z_eff / math.sqrt(self.planned):.4g} "
            f"per unit sensitivity, no amplification by sampling, exact"
        )
        self.info.update(band=dp.band, strategy_rounds=fl.rounds, sensitivity_squared=int(sens2))

    def strategy_matrix(self, rounds: int) -> np.ndarray:
        """The first `rounds` rows and columns of the strategy C (float64)."""
        with jax.numpy_rank_promotion("allow"):  # jax-privacy's materialize broadcasts by rank
            return np.asarray(self.strategy.materialize(), np.float64)[:rounds, :rounds]

    def init_state(self) -> dict:
        like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), self.lora)
        # the strategy's parameters travel in the state (checkpointed): a resume continues with the C
        # its noise state was built with, even where re-optimizing would give a slightly different one
        params = jnp.array(np.asarray(self.strategy.params), jnp.float32)  # a copy: the round donates its state
        return {**super().init_state(), "noise": self.inverse.init_multiply(like), "strategy": params}

    def finalize_sum_with_state(
        self, total: Tree, global_: Tree, key: Key, expected_cohort: int, mstate: dict
    ) -> tuple[Tree, dict]:
        fresh = prim.normal_like(total, key)  # round t's draw from its server_noise key, as central DP's
        inverse = type(self.strategy)(params=mstate["strategy"]).inverse_as_streaming_matrix()
        correlated, noise_state = inverse.multiply_next(fresh, mstate["noise"])
        clip_a, clip_b = self._clips(mstate)  # adaptive: round t's clip scales its noise (x_t / clip_t has
        noisy = prim.add_scaled(total, correlated, self.z_update * clip_a, self.z_update * clip_b)  # sensitivity 1)
        return jax.tree.map(lambda x, t: x + t / expected_cohort, global_, noisy), {**mstate, "noise": noise_state}

    def privacy_row(self, participations: np.ndarray) -> dict:
        return {"epsilon": self.ledger.worst(), "epsilon_mean": self.ledger.mean(), "delta": self.cfg.dp.delta}
