"""The run-time privacy ledger: per-client participations and the epsilon they have spent."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from .gaussian import _check, gaussian_epsilon, sampled_epsilon

if TYPE_CHECKING:
    from collections.abc import Sequence


@dataclasses.dataclass
class Ledger:
    """Per-client privacy of a run. For `local`, epsilon depends only on a client's participation
    count; `central` is one figure for every client (user level, sampled); `dpsgd` per client.

    z_eff: local: the effective multiplier of one release (sensitivity folded in); central and
    dpsgd: the noise multiplier relative to the clip norm.
    """

    mode: str
    num_clients: int
    z_eff: float
    delta: float
    neighbouring: str = "replace-one"
    sampling_rate: float = 1.0  # central: client rate; dpsgd: batch rate
    local_steps: int = 1  # dpsgd
    participations: np.ndarray = None
    rounds: int = 0

    def __post_init__(self):
        _check(delta=self.delta, z=self.z_eff, neighbouring=self.neighbouring, mode=self.mode)
        if self.participations is None:
            self.participations = np.zeros(self.num_clients, np.int64)
        self._cache = {}

    def _eps(self, count: int) -> float:
        if count not in self._cache:
            if self.mode == "local":
                self._cache[count] = gaussian_epsilon(self.z_eff, count, self.delta)
            elif self.mode == "central":
                self._cache[count] = sampled_epsilon(
                    self.z_eff, self.sampling_rate, count, self.delta, self.neighbouring, with_rdp=False
                )[0]
            else:
                self._cache[count] = sampled_epsilon(
                    self.z_eff,
                    self.sampling_rate,
                    count * self.local_steps,
                    self.delta,
                    self.neighbouring,
                    with_rdp=False,
                )[0]
        return self._cache[count]

    def record(self, client_ids: Sequence[int] | np.ndarray) -> None:
        self.rounds += 1
        np.add.at(self.participations, np.asarray(client_ids, np.int64), 1)

    def epsilons(self, participations: np.ndarray | None = None, rounds: int | None = None) -> np.ndarray:
        parts = self.participations if participations is None else participations
        if self.mode == "central":
            e = self._eps(self.rounds if rounds is None else rounds)
            return np.full(self.num_clients, e)
        return np.array([self._eps(int(c)) for c in parts])

    def worst(self) -> float:
        return float(self.epsilons().max())

    def mean(self) -> float:
        return float(self.epsilons().mean())

    def worst_after(self, client_ids: Sequence[int] | np.ndarray) -> float:
        """The worst client's epsilon if these clients took part in one more round."""
        parts = self.participations.copy()
        np.add.at(parts, np.asarray(client_ids, np.int64), 1)
        return float(self.epsilons(parts, self.rounds + 1).max())

    def state_dict(self) -> dict:
        return {"participations": self.participations.tolist(), "rounds": self.rounds}

    def load_state_dict(self, state: dict) -> None:
        self.participations = np.asarray(state["participations"], np.int64)
        self.rounds = int(state["rounds"])
