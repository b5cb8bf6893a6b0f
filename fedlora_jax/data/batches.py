"""Static-shape round blocks [clients, local_steps, batch, seq].

Within a client, examples are drawn in order with wrap-around (local_steps * batch per round),
in a fresh permutation each epoch. The draw is a pure function of (seed, client, how many
examples the client drew before): with that count taken from the privacy ledger's
participations, blocks are reproducible after a resume and independent of chunking.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from ..core import randomness
from ..core.errors import UserError
from .tokenize import TokenizedData

if TYPE_CHECKING:
    from collections.abc import Sequence


class RoundBatcher:
    def __init__(self, data: TokenizedData, parts: list[np.ndarray], local_steps: int, batch_size: int, seed: int = 0):
        if any(len(p) == 0 for p in parts):
            raise UserError("a client has no examples; every client needs at least one")
        self.data, self.parts = data, parts
        self.steps, self.batch, self.seed = local_steps, batch_size, seed
        self._perms = {}

    def _perm(self, client: int, epoch: int) -> np.ndarray:
        key = (client, epoch)
        if key not in self._perms:
            rng = randomness.np_rng(self.seed, "data_order", client, epoch)
            self._perms[key] = self.parts[client][rng.permutation(len(self.parts[client]))]
        return self._perms[key]

    def indices(self, client: int, drawn_before: int) -> np.ndarray:
        n = len(self.parts[client])
        j = drawn_before + np.arange(self.steps * self.batch)
        epochs, pos = j // n, j % n
        out = np.empty(len(j), np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self._perm(client, int(e))[pos[sel]]
        return out

    def block(self, client_ids: Sequence[int] | np.ndarray, participations: np.ndarray) -> dict:
        """Arrays for the sampled clients; `participations[c]` = rounds client c took part in
        before this one. Shapes never change between rounds."""
        ids = np.asarray(client_ids, np.int64)
        idx = np.stack([self.indices(int(c), int(participations[c]) * self.steps * self.batch) for c in ids])
        shape = (len(ids), self.steps, self.batch, -1)
        return {
            "tokens": self.data.tokens[idx].reshape(shape),
            "attention_mask": self.data.attention_mask[idx].reshape(shape),
            "loss_mask": self.data.loss_mask[idx].reshape(shape),
            "num_examples": np.array([len(self.parts[c]) for c in ids], np.float32),
        }


# ----------------------------------------------------------------------------- DP-SGD batches


def binomial_tail(n: int, q: float, c: int) -> float:
    """P(Binomial(n, q) > c), summed exactly in log space."""
    if c >= n or q <= 0:
        return 0.0
    if q >= 1:
        return 1.0
    lq, l1q = math.log(q), math.log1p(-q)
    terms = [
        math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * lq + (n - k) * l1q
        for k in range(c + 1, n + 1)
    ]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


BATCH_TAIL = 1e-15  # per-step probability that a DP-SGD batch overflows its static capacity (at most)


def poisson_capacity(sizes: Sequence[int] | np.ndarray, batch_size: int, tail: float = BATCH_TAIL) -> tuple[int, float]:
    """(capacity, worst per-step overflow probability): the smallest static batch capacity c >=
    batch_size such that a client of n examples sampled at rate min(1, batch_size / n) overflows
    c with probability <= tail (c = the largest client's size if that is smaller)."""
    sizes = [int(n) for n in sizes]
    cap = min(batch_size, max(sizes))
    while cap < max(sizes) and max(binomial_tail(n, min(1.0, batch_size / n), cap) for n in sizes) > tail:
        cap += 1
    return cap, max(binomial_tail(n, min(1.0, batch_size / n), cap) for n in sizes)


def poisson_capacity_bound(batch_size: int, tail: float = BATCH_TAIL) -> int:
    """A capacity that poisson_capacity never exceeds, whatever the client sizes: the smallest c
    with P(Poisson(batch_size) > c) <= tail (a Binomial(n, B/n) upper tail is at most the
    Poisson(B) one; Anderson and Samuels 1967). For memory planning without the data."""
    lam, c = float(batch_size), int(batch_size)
    while True:
        # P(X > c) = 1 - sum_{k<=c} e^-lam lam^k / k!, summed from the top for accuracy
        terms = [k * math.log(lam) - lam - math.lgamma(k + 1) for k in range(c + 1, c + 400)]
        if math.fsum(math.exp(t) for t in terms) <= tail:
            return c
        c += 1


class PoissonBatcher(RoundBatcher):
    """DP-SGD batches: at each local step every example of the client is taken independently
    with probability q = min(1, batch_size / n_client) (Poisson sampling, what the record-level
    accountant assumes), padded to a static `capacity` with loss_mask 0. A draw larger than the
    capacity keeps a random `capacity` of its examples; that event has probability at most
    `overflow` per step and is accounted for in the run's delta (see runner.resolve_noise).
    The draw is a pure function of (seed, client, participation)."""

    def __init__(
        self,
        data: TokenizedData,
        parts: list[np.ndarray],
        local_steps: int,
        batch_size: int,
        seed: int = 0,
        tail: float = BATCH_TAIL,
    ):
        super().__init__(data, parts, local_steps, batch_size, seed)
        self.capacity, self.overflow = poisson_capacity([len(p) for p in parts], batch_size, tail)
        self.rates = np.minimum(1.0, batch_size / np.array([len(p) for p in parts], np.float64))

    def poisson_indices(self, client: int, participation: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices [steps, capacity], taken [steps, capacity]) of one participation."""
        part = self.parts[client]
        rng = randomness.np_rng(self.seed, "dpsgd_batches", client, participation)
        take = rng.random((self.steps, len(part))) < self.rates[client]
        idx = np.zeros((self.steps, self.capacity), np.int64)
        ok = np.zeros((self.steps, self.capacity), bool)
        for s in range(self.steps):
            sel = np.flatnonzero(take[s])
            if len(sel) > self.capacity:
                sel = np.sort(rng.choice(sel, self.capacity, replace=False))
            idx[s, : len(sel)] = part[sel]
            idx[s, len(sel) :] = part[0]
            ok[s, : len(sel)] = True
        return idx, ok

    def block(self, client_ids: Sequence[int] | np.ndarray, participations: np.ndarray) -> dict:
        ids = np.asarray(client_ids, np.int64)
        pairs = [self.poisson_indices(int(c), int(participations[c])) for c in ids]
        idx = np.stack([p[0] for p in pairs])
        ok = np.stack([p[1] for p in pairs])
        shape = (len(ids), self.steps, self.capacity, -1)
        loss_mask = self.data.loss_mask[idx].reshape(shape) * ok[..., None]
        return {
            "tokens": self.data.tokens[idx].reshape(shape),
            "attention_mask": self.data.attention_mask[idx].reshape(shape),
            "loss_mask": loss_mask.astype(self.data.loss_mask.dtype),
            "num_examples": np.array([len(self.parts[c]) for c in ids], np.float32),
        }
