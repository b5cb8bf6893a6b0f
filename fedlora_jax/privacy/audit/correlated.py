"""The audit game of a mechanism whose noise is correlated across rounds (dp.mode bandmf).

The canary client is alone in its cyclic group: it takes part in rounds 0, b, 2b, ... of T rounds
of the real round (its keys, the mechanism's streamed noise state, chunked sums); every round adds
noise, empty ones included. The observer sees each round's aggregate y_t = x_t + sigma (C^-1 w)_t
and whitens it with the strategy: C y = C x + sigma w, iid noise. The canary's signal in the
whitened rounds is (C u)_t c, u the indicator of its rounds, so the likelihood-ratio score is
sum_t (C u)_t <(C y)_t, w_c> / ||C u||: Gaussian, unit variance, mean shift mu_release x ||C u||
(= sqrt(k) per unit clip: the sensitivity the accountant uses)."""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from .canary import OVERSHOOT, _canary_direction, _tree_vdot, _weights, _zeros
from .games import Game, register
from .round import AuditRound


@register
class BandMFGame(Game):
    mode: ClassVar[str] = "bandmf"

    def setup(self) -> None:
        m = self.mech
        t = min(self.compositions, m.cfg.fl.rounds)  # the strategy has fl.rounds rows
        self.rounds = t
        c = _canary_direction(m, self.shapes, self.seed)
        x_in = jax.tree.map(lambda x: OVERSHOOT * x, c)
        if m.neighbouring == "replace-one":  # the neighbour sends the opposite canary
            x_out, delta = jax.tree.map(jnp.negative, x_in), jax.tree.map(lambda x: 2 * x, c)
        else:  # add-remove: the neighbour's update is zero
            x_out, delta = _zeros(self.shapes), c
        updates = jax.tree.map(lambda a, b: jnp.stack([a, b]), x_out, x_in)
        self.expected = float(m.cfg.fl.clients_per_round)
        self.harness = AuditRound(m, updates, 1, m.cfg.fl.clients_per_round, 1)
        self.w, self.mu_release = _weights(delta, m.sigma_a, m.sigma_b)
        self.sep = m.min_sep
        u = (np.arange(t) % self.sep == 0).astype(np.float64)
        self.participations = int(u.sum())
        self.c = jnp.asarray(m.strategy_matrix(t), jnp.float32)
        a = m.strategy_matrix(t) @ u
        self.a = jnp.asarray(a / np.linalg.norm(a), jnp.float32)
        self.gaussian = True
        self.mu_expected = self.mu_release * float(np.linalg.norm(a))
        self.per_trial_bytes = (4 + 2 * t) * self._adapter_bytes()
        self.description = (
            f"bandmf: canary client alone in its cyclic group (rounds 0, {self.sep}, ...: "
            f"{self.participations} participation(s)) vs "
            f"{'the opposite canary' if m.neighbouring == 'replace-one' else 'absent'} "
            f"({m.neighbouring}), {t} round(s) of the real round with its streamed correlated noise, "
            f"whitened by the strategy matrix; a fresh 64-bit noise root per trial"
        )

    def trial(self, words, world):
        t = self.rounds
        present = jnp.asarray(np.arange(t) % self.sep == 0)
        sel = jnp.broadcast_to(world.astype(jnp.int32), (t, 1))
        valid = present[:, None] & ((world == 1) | (self.mech.neighbouring == "replace-one"))
        obs, mstates = self.harness.run(words, sel, valid)
        if "clip" in mstates:  # adaptive: round t's release is at clip_t; back to the initial clip's scale
            scale = mstates["clip"] / self.mech.cfg.dp.clip_a
            obs = jax.tree.map(lambda x: x / scale.reshape((-1,) + (1,) * (x.ndim - 1)), obs)
        white = jax.tree.map(lambda x: jnp.tensordot(self.c, x * self.expected, axes=1), obs)  # C y
        scores = jax.vmap(lambda o: _tree_vdot(o, self.w))(white)  # [T]
        return jnp.sum(self.a * scores)

    def accountant_epsilon(self) -> float:
        return float(self.mech.ledger.epsilons(np.array([self.participations]))[0])
