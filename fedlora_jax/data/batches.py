"""Static-shape round blocks [clients, local_steps, batch, seq].

Within a client, examples are drawn in order with wrap-around (local_steps * batch per round),
in a fresh permutation each epoch. The draw is a pure function of (seed, client, how many
examples the client drew before): with that count taken from the privacy ledger's
participations, blocks are reproducible after a resume and independent of chunking.
"""

from __future__ import annotations

import numpy as np

from .tokenize import TokenizedData


class RoundBatcher:
    def __init__(self, data: TokenizedData, parts: list[np.ndarray], local_steps: int, batch_size: int,
                 seed: int = 0):
        if any(len(p) == 0 for p in parts):
            raise ValueError("a client has no examples; every client needs at least one")
        self.data, self.parts = data, parts
        self.steps, self.batch, self.seed = local_steps, batch_size, seed
        self._perms = {}

    def _perm(self, client: int, epoch: int) -> np.ndarray:
        key = (client, epoch)
        if key not in self._perms:
            rng = np.random.default_rng([self.seed, client, epoch])
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

    def block(self, client_ids, participations) -> dict:
        """Arrays for the sampled clients; `participations[c]` = rounds client c took part in
        before this one. Shapes never change between rounds."""
        ids = np.asarray(client_ids, np.int64)
        idx = np.stack([self.indices(int(c), int(participations[c]) * self.steps * self.batch) for c in ids])
        shape = (len(ids), self.steps, self.batch, -1)
        return {"tokens": self.data.tokens[idx].reshape(shape),
                "attention_mask": self.data.attention_mask[idx].reshape(shape),
                "loss_mask": self.data.loss_mask[idx].reshape(shape),
                "num_examples": np.array([len(self.parts[c]) for c in ids], np.float32)}
