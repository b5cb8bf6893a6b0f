"""The audit's distinguishing games, one per DP mode (registry GAMES, keyed by the mechanism's name);
audit.py describes each game and plays them."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from ...core import randomness
from ...core.errors import UserError
from ...core.numerics import DIVISION_FLOOR
from ...core.pytypes import Array, Key
from .. import accounting as acc
from .canary import (
    _CANARY,
    _OTHERS,
    OVERSHOOT,
    _canary_direction,
    _canary_like,
    _random_tree,
    _sampled_llr,
    _tree_vdot,
    _weights,
    _zeros,
)
from .round import _SAMPLE, AuditRound, root_of

CHUNK_BYTES = 256 * 2**20  # memory of one vmapped chunk of trials (lax.map batch)

GAMES: dict[str, type[Game]] = {}


def register(cls: type[Game]) -> type[Game]:
    GAMES[cls.mode] = cls
    return cls


# ----------------------------------------------------------------------------- games


@dataclasses.dataclass
class Game:
    """A distinguishing game: `trial(key, world)` -> one score (world 1: canary in, 0: out), jittable
    and vmappable; plus the accountant's epsilon for exactly this game."""

    mode: ClassVar[str] = ""
    mech: Any
    shapes: Any
    compositions: int
    seed: int
    others: str = "zero"
    client_sizes: Any = None

    gaussian: bool = dataclasses.field(default=False, init=False)  # scores Gaussian by construction
    mu_expected: float | None = dataclasses.field(default=None, init=False)
    description: str = dataclasses.field(default="", init=False)
    per_trial_bytes: int = dataclasses.field(default=0, init=False)

    def setup(self) -> None:
        raise NotImplementedError

    def trial(self, key: Key, world: Array) -> Array:
        raise NotImplementedError

    def accountant_epsilon(self) -> float:
        raise NotImplementedError

    def paper_epsilon(self) -> tuple[float | None, float | None]:
        return None, None

    def _adapter_bytes(self) -> int:
        return sum(int(np.prod(x.shape)) * 4 for x in jax.tree.leaves(self.shapes))


@register
class LocalGame(Game):
    """Local DP: the canary client alone in its cohort, P rounds of the real round (audit_round): its
    release through the round's keys, mechanism and aggregator, observed as the aggregate."""

    mode: ClassVar[str] = "local"

    def setup(self) -> None:
        m = self.mech
        c = _canary_direction(m, self.shapes, self.seed, zero_a=m.cfg.lora.freeze_a)
        x_in = jax.tree.map(lambda x: OVERSHOOT * x, c)
        if m.neighbouring == "replace-one":  # the neighbour releases the opposite canary
            x_out = jax.tree.map(lambda x: -x, x_in)
            delta = jax.tree.map(lambda x: 2 * x, c)
        else:  # add-remove: the neighbour's update is zero
            x_out = _zeros(self.shapes)
            delta = c
        # updates[sel]: sel 0 = the neighbour, 1 = the canary
        updates = jax.tree.map(lambda a, b: jnp.stack([a, b]), x_out, x_in)
        self.harness = AuditRound(m, updates, 1, 1, m.cfg.fl.clients_per_chunk)
        self.w, self.mu_release = _weights(delta, m.sigma_a, m.sigma_b)
        self.gaussian = True
        self.mu_expected = self.mu_release * math.sqrt(self.compositions)
        self.per_trial_bytes = 8 * self._adapter_bytes()
        self.description = (
            f"local: canary client at the clip norm in each of {sum(m.blocks)} clipped block(s) vs "
            f"{'the opposite canary' if m.neighbouring == 'replace-one' else 'a zero update'} "
            f"({m.neighbouring}), {self.compositions} round(s) of the real round (its keys, mechanism, "
            f"aggregator), a fresh 64-bit noise root per trial"
        )

    def trial(self, words: Array, world: Array) -> Array:
        t = self.compositions
        sel = jnp.broadcast_to(world.astype(jnp.int32), (t, 1))
        obs, _ = self.harness.run(words, sel, jnp.ones((t, 1), bool))
        return _tree_vdot(jax.tree.map(lambda x: jnp.sum(x, axis=0), obs), self.w) / math.sqrt(t)

    def accountant_epsilon(self) -> float:
        return float(self.mech.ledger.epsilons(np.array([self.compositions]))[0])

    def paper_epsilon(self) -> tuple[float, float]:
        return acc.paper_epsilon(self.mech.z, self.mech.cfg.dp.delta, self.compositions)


@register
class CentralGame(Game):
    """Central DP: T rounds of the real round (audit_round) over the federation's n clients, each
    Poisson-sampled at rate q (the canary only in world 1); the round clips every kept update, sums
    them over its chunks and noises the sum (every round, empty cohorts included)."""

    mode: ClassVar[str] = "central"

    def setup(self) -> None:
        m, fl = self.mech, self.mech.cfg.fl
        c = _canary_direction(m, self.shapes, self.seed)
        # without amplification (cyclic, diurnal) the accountant composes every participation: the canary
        # takes part in every round of the game (q = 1), each round a plain Gaussian
        self.amplified = getattr(m, "amplified", True)
        self.q = fl.clients_per_round / fl.num_clients if self.amplified else 1.0
        self.expected = float(fl.clients_per_round)
        n = fl.num_clients
        canary = jax.tree.map(lambda x: OVERSHOOT * x[None], c)
        zero = jax.tree.map(lambda x: jnp.zeros((1,) + x.shape, jnp.float32), self.shapes)
        if self.others == "zero":  # clients whose update is zero: the adversary's worst case
            updates = jax.tree.map(lambda z, a: jnp.concatenate([z, a]), zero, canary)
            self.sel_others = jnp.zeros((n - 1,), jnp.int32)
        elif self.others == "orthogonal":
            updates = jax.tree.map(lambda z, a, o: jnp.concatenate([z, a, o]), zero, canary, self._orthogonal(c, n - 1))
            self.sel_others = jnp.arange(2, n + 1, dtype=jnp.int32)
        else:
            raise UserError(f"others = {self.others!r} is not allowed; choose zero or orthogonal")
        self.harness = AuditRound(m, updates, n, fl.clients_per_round, fl.clients_per_chunk)
        self.w, self.mu_round = _weights(c, m.sigma_a, m.sigma_b)
        self.gaussian = self.q >= 1
        self.mu_expected = self.mu_round * math.sqrt(self.compositions) if self.gaussian else None
        self.per_trial_bytes = (3 * n + 8) * self._adapter_bytes()
        self.description = (
            f"central: canary client (update at the clip norm) Poisson-sampled at q={self.q:g} among "
            f"{n - 1} other client(s) ({self.others} updates), {self.compositions} round(s) of the real "
            f"round (its keys, mechanism, chunked sums and noise), a fresh 64-bit noise root per trial"
        )

    def _orthogonal(self, c, n):
        """n other clients' updates (stacked): random, orthogonal to the canary in every clipped
        block (so the release's clipping keeps them orthogonal), OVERSHOOT clip norms long."""

        def project(x, cx):
            axes = tuple(range(1, x.ndim))
            coef = jnp.sum(x * cx, axis=axes, keepdims=True) / jnp.maximum(
                jnp.sum(cx * cx, axis=axes, keepdims=True), DIVISION_FLOOR
            )
            return x - coef * cx

        def one(r):
            return jax.tree.map(lambda x: OVERSHOOT * x, _canary_like(self.mech, jax.tree.map(project, r, c)))

        rs = jax.tree.map(
            lambda *xs: jnp.stack(xs), *[_random_tree(self.seed, self.shapes, _OTHERS, i) for i in range(n)]
        )
        return jax.jit(jax.vmap(one))(rs)

    def trial(self, words: Array, world: Array) -> Array:
        n, t = self.mech.cfg.fl.num_clients, self.compositions
        member = (jnp.arange(n) > 0) | (world == 1)
        sample_key = randomness.derive(root_of(words), "audit", _SAMPLE)
        sampled = jax.vmap(lambda r: jax.random.bernoulli(jax.random.fold_in(sample_key, r), self.q, (n,)))(
            jnp.arange(t)
        )
        sel = jnp.broadcast_to(jnp.concatenate([jnp.ones((1,), jnp.int32), self.sel_others]), (t, n))
        obs, _ = self.harness.run(words, sel, sampled & member[None])
        scores = jax.vmap(lambda o: _tree_vdot(jax.tree.map(lambda x: x * self.expected, o), self.w))(obs)
        return jnp.sum(_sampled_llr(scores, self.mu_round, self.q))

    def accountant_epsilon(self) -> float:
        if not self.amplified:  # per client: the canary's participations, one per round of the game
            return float(self.mech.ledger.epsilons(np.array([self.compositions]))[0])
        return float(self.mech.ledger.epsilons(np.zeros(1, np.int64), self.compositions)[0])


@register
class DPSGDGame(Game):
    """Record-level DP-SGD: one client's batch holds the canary record, taken with probability q
    (the client's batch rate) at each of local_steps x P steps; each step's noisy gradient comes
    from client.dpsgd_grads with the mechanism's dpsgd_args. The other records are the adversary's
    choice: none (zero gradient), the worst case."""

    mode: ClassVar[str] = "dpsgd"

    def setup(self) -> None:
        from ...federated.client import dpsgd_grads
        from ...models.factory import build_model

        m, cfg = self.mech, self.mech.cfg
        self.definition, self.base, self.lora, _, _ = build_model(cfg)
        seq = cfg.data.seq_len
        self.tokens = jax.random.randint(
            randomness.key(self.seed, "audit", _CANARY, 1), (1, seq), 0, cfg.model.vocab_size, jnp.int32
        )
        self.attn = jnp.ones((1, seq), jnp.int32)
        batch = {"tokens": self.tokens, "attention_mask": self.attn, "loss_mask": self.attn}
        # the canary's own gradient, through the same function with no clip and no noise
        _, grad = jax.jit(
            lambda b: dpsgd_grads(
                self.definition, self.base, self.lora, b, 1e30, 0.0, jax.random.key(0), 1.0, freeze_a=cfg.lora.freeze_a
            )
        )(batch)
        norm = float(jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(grad))))
        if not norm > 0:
            raise UserError("the audit's canary record has a zero gradient under this model; nothing to audit")
        self.grad_norm = norm
        clip = cfg.dp.clip_a
        self.sigma = m.sigma_a
        self.u = jax.tree.map(lambda x: x / norm / max(self.sigma, DIVISION_FLOOR), grad)
        self.mu_step = min(norm, clip) / max(self.sigma, DIVISION_FLOOR)
        self.q = float(m.batch_rate)
        self.steps = cfg.fl.local_steps * self.compositions
        self.gaussian = self.q >= 1
        self.mu_expected = self.mu_step * math.sqrt(self.steps) if self.gaussian else None
        # per-example gradients and activations of one record: a generous guess
        self.per_trial_bytes = max(64 * self._adapter_bytes(), CHUNK_BYTES // 256)
        self.description = (
            f"dpsgd: canary record (gradient norm {norm:.3g}, clip {clip:g}) Poisson-sampled at "
            f"q={self.q:.4g} at each of {self.steps} step(s) ({cfg.fl.local_steps} x "
            f"{self.compositions} participation(s)) through client.dpsgd_grads with "
            f"mechanism.dpsgd_args; no other records"
        )
        self._grads = dpsgd_grads

    def trial(self, words: Array, world: Array) -> Array:
        """A step's noise key is the one a run uses: round p's dpsgd_noise key, client 0's key under it
        (randomness.client_key), the mechanism's dpsgd_args, the step folded in (client.client_update)."""
        m, cfg = self.mech, self.mech.cfg
        root = root_of(words)
        sample_key = randomness.derive(root, "audit", _SAMPLE)
        local_steps = cfg.fl.local_steps

        def one_step(total: Array, s: Array) -> tuple[Array, None]:
            p, i = s // local_steps, s % local_steps
            keys = randomness.round_keys_of(root, p)
            clip, sigma, dkey, expected = m.dpsgd_args(randomness.client_key(keys["dpsgd_noise"], 0))
            taken = jax.random.bernoulli(jax.random.fold_in(sample_key, s), self.q) & (world == 1)
            batch = {
                "tokens": self.tokens,
                "attention_mask": self.attn,
                "loss_mask": self.attn * taken.astype(jnp.int32),
            }
            _, noisy = self._grads(
                self.definition,
                self.base,
                self.lora,
                batch,
                clip,
                sigma,
                jax.random.fold_in(dkey, i),
                expected,
                freeze_a=cfg.lora.freeze_a,
            )
            score = _tree_vdot(jax.tree.map(lambda x: x * expected, noisy), self.u)
            return total + _sampled_llr(score, self.mu_step, self.q), None

        total, _ = jax.lax.scan(one_step, jnp.zeros((), jnp.float32), jnp.arange(self.steps))
        return total

    def accountant_epsilon(self) -> float:
        return float(self.mech.ledger.epsilons(np.array([self.compositions]))[0])
