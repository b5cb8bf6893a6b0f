"""The audit's distinguishing games, one per DP mode (registry GAMES, keyed by the mechanism's name);
audit.py describes each game and plays them."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from .. import randomness
from ..errors import UserError
from ..numerics import DIVISION_FLOOR
from ..pytypes import Array, Key
from . import accounting as acc
from .audit_canary import (
    _CANARY,
    _OTHERS,
    OVERSHOOT,
    _canary_direction,
    _canary_like,
    _mech_state,
    _random_tree,
    _sampled_llr,
    _tree_vdot,
    _weights,
    _zeros,
)

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
    """Local DP: the canary client's P releases, each through mechanism.release with fresh noise."""

    mode: ClassVar[str] = "local"

    def setup(self) -> None:
        m, dp = self.mech, self.mech.cfg.dp
        self.g = _zeros(self.shapes)
        c = _canary_direction(m, self.shapes, self.seed, zero_a=m.cfg.lora.freeze_a)
        self.x_in = jax.tree.map(lambda x: OVERSHOOT * x, c)
        if dp.neighbouring == "replace-one":  # the neighbour releases the opposite canary
            self.x_out = jax.tree.map(lambda x: -x, self.x_in)
            delta = jax.tree.map(lambda x: 2 * x, c)
        else:  # add-remove: the neighbour's update is zero
            self.x_out = _zeros(self.shapes)
            delta = c
        self.w, self.mu_release = _weights(delta, m.sigma_a, m.sigma_b)
        self.gaussian = True
        self.mu_expected = self.mu_release * math.sqrt(self.compositions)
        self.per_trial_bytes = 6 * self._adapter_bytes()
        self.description = (
            f"local: canary client at the clip norm in each of {sum(m.blocks)} clipped block(s) vs "
            f"{'the opposite canary' if dp.neighbouring == 'replace-one' else 'a zero update'} "
            f"({dp.neighbouring}), {self.compositions} release(s) through mechanism.release"
        )

    def trial(self, key: Key, world: Array) -> Array:
        m, g, w = self.mech, self.g, self.w
        local = jax.tree.map(lambda a, b, g0: g0 + jnp.where(world == 1, a, b), self.x_in, self.x_out, g)
        mstate = _mech_state(m)

        def one(total: Array, p: Array) -> tuple[Array, None]:
            y = m.release(local, g, jax.random.fold_in(key, p), None, mstate)
            return total + _tree_vdot(jax.tree.map(jnp.subtract, y, g), w), None

        total, _ = jax.lax.scan(one, jnp.zeros((), jnp.float32), jnp.arange(self.compositions))
        return total / math.sqrt(self.compositions)

    def accountant_epsilon(self) -> float:
        return float(self.mech.ledger.epsilons(np.array([self.compositions]))[0])

    def paper_epsilon(self) -> tuple[float, float]:
        return acc.paper_epsilon(self.mech.z, self.mech.cfg.dp.delta, self.compositions)


@register
class CentralGame(Game):
    """Central DP: T rounds; in each, every client of the federation is Poisson-sampled at rate q
    (the canary only in world 1), releases through mechanism.release (clip), the kept releases are
    summed as the round sums them, and mechanism.finalize_sum noises the sum (every round)."""

    mode: ClassVar[str] = "central"

    def setup(self) -> None:
        m, fl = self.mech, self.mech.cfg.fl
        self.g = _zeros(self.shapes)
        c = _canary_direction(m, self.shapes, self.seed)
        self.q = fl.clients_per_round / fl.num_clients
        self.expected = float(fl.clients_per_round)
        n = fl.num_clients
        canary_local = jax.tree.map(lambda x: OVERSHOOT * x[None], c)
        if self.others == "zero":  # clients whose update is zero: the adversary's worst case
            others = jax.tree.map(lambda x: jnp.zeros((n - 1,) + x.shape, jnp.float32), self.shapes)
        elif self.others == "orthogonal":
            others = self._orthogonal(c, n - 1)
        else:
            raise UserError(f"others = {self.others!r} is not allowed; choose zero or orthogonal")
        self.locals = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), canary_local, others)
        self.w, self.mu_round = _weights(c, m.sigma_a, m.sigma_b)
        self.gaussian = self.q >= 1
        self.mu_expected = self.mu_round * math.sqrt(self.compositions) if self.gaussian else None
        self.per_trial_bytes = (3 * n + 6) * self._adapter_bytes()
        self.description = (
            f"central: canary client (update at the clip norm) Poisson-sampled at q={self.q:g} among "
            f"{n - 1} other client(s) ({self.others} updates), every client through "
            f"mechanism.release, the sum through mechanism.finalize_sum, {self.compositions} round(s)"
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

        def one(i):
            r = _random_tree(randomness.key(self.seed, "audit", _OTHERS, i), self.shapes)
            return jax.tree.map(lambda x: OVERSHOOT * x, _canary_like(self.mech, jax.tree.map(project, r, c)))

        return jax.jit(jax.vmap(one))(jnp.arange(n))

    def trial(self, key: Key, world: Array) -> Array:
        m, g = self.mech, self.g
        n = self.mech.cfg.fl.num_clients
        member = (jnp.arange(n) > 0) | (world == 1)
        stateful = bool(_mech_state(m))  # e.g. an adaptive clip, updated after every round

        def one_round(carry: tuple[Array, dict], t: Array) -> tuple[tuple[Array, dict], None]:
            total, mstate = carry
            kt = jax.random.fold_in(key, t)
            sampled = jax.random.bernoulli(jax.random.fold_in(kt, 0), self.q, (n,)) & member
            keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(kt, 1), i))(jnp.arange(n))
            released = jax.vmap(lambda lo, k: m.release(lo, g, k, None, mstate))(self.locals, keys)
            kept = jax.vmap(lambda r: m.kept(r, jnp.zeros((), jnp.float32)))(released) & sampled
            f = kept.astype(jnp.float32)
            s = jax.tree.map(lambda r, x: jnp.tensordot(f, r - x[None], axes=1), released, g)
            agg = m.finalize_sum(s, g, jax.random.fold_in(kt, 2), self.expected, mstate)
            score = _tree_vdot(jax.tree.map(lambda a, x: (a - x) * self.expected, agg, g), self.w)
            if stateful:  # the next round's state, as the round computes it
                stats = jax.vmap(lambda lo: m.client_stat(lo, g, mstate))(self.locals)
                mstate = m.update_state(mstate, jnp.sum(f * stats), jax.random.fold_in(kt, 3), self.expected)
            return (total + _sampled_llr(score, self.mu_round, self.q), mstate), None

        init = (jnp.zeros((), jnp.float32), _mech_state(m))
        (total, _), _ = jax.lax.scan(one_round, init, jnp.arange(self.compositions))
        return total

    def accountant_epsilon(self) -> float:
        return float(self.mech.ledger.epsilons(np.zeros(1, np.int64), self.compositions)[0])


@register
class DPSGDGame(Game):
    """Record-level DP-SGD: one client's batch holds the canary record, taken with probability q
    (the client's batch rate) at each of local_steps x P steps; each step's noisy gradient comes
    from client.dpsgd_grads with the mechanism's dpsgd_args. The other records are the adversary's
    choice: none (zero gradient), the worst case."""

    mode: ClassVar[str] = "dpsgd"

    def setup(self) -> None:
        from ..client import dpsgd_grads
        from ..models.factory import build_model

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

    def trial(self, key: Key, world: Array) -> Array:
        m, cfg = self.mech, self.mech.cfg
        clip, sigma, dkey, expected = m.dpsgd_args(jax.random.fold_in(key, 0))

        def one_step(total: Array, t: Array) -> tuple[Array, None]:
            taken = jax.random.bernoulli(jax.random.fold_in(jax.random.fold_in(key, 1), t), self.q) & (world == 1)
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
                jax.random.fold_in(dkey, t),
                expected,
                freeze_a=cfg.lora.freeze_a,
            )
            score = _tree_vdot(jax.tree.map(lambda x: x * expected, noisy), self.u)
            return total + _sampled_llr(score, self.mu_step, self.q), None

        total, _ = jax.lax.scan(one_step, jnp.zeros((), jnp.float32), jnp.arange(self.steps))
        return total

    def accountant_epsilon(self) -> float:
        return float(self.mech.ledger.epsilons(np.array([self.compositions]))[0])
