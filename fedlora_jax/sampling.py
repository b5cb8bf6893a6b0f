"""Which clients take part in each round: a pure function of (seed, round), independent of the data.

`uniform`: a fixed-size cohort of K clients drawn without replacement (the paper). `poisson`: every
client independently with probability K/N (central DP's amplification assumes it, and assumes the
draw is secret: in a deployment the server's sampling randomness must not be known to an observer).
"""

from __future__ import annotations

import numpy as np

from . import randomness

SAMPLINGS = ("uniform", "poisson")


def sample_round(seed: int, num_clients: int, clients_per_round: int, sampling: str, round_index: int):
    """(client slots, valid mask) of one round. uniform: K sorted ids, all valid; poisson: all N
    ids, valid where sampled."""
    rng = randomness.np_rng(seed, "client_sampling", round_index)
    if sampling == "uniform":
        ids = np.sort(rng.choice(num_clients, clients_per_round, replace=False))
        return ids, np.ones(len(ids), bool)
    if sampling == "poisson":
        return np.arange(num_clients), rng.random(num_clients) < clients_per_round / num_clients
    raise ValueError(f"unknown sampling {sampling!r}")  # the config validates it: a bug if reached


def participation_counts(seed: int, num_clients: int, clients_per_round: int, sampling: str, rounds: int,
                         start: int = 0) -> np.ndarray:
    """Rounds each client takes part in, over rounds [start, rounds) of the seeded schedule."""
    counts = np.zeros(num_clients, np.int64)
    for r in range(start, rounds):
        ids, valid = sample_round(seed, num_clients, clients_per_round, sampling, r)
        np.add.at(counts, ids[valid], 1)
    return counts


def for_config(cfg, round_index: int):
    fl = cfg.fl
    return sample_round(cfg.seed, fl.num_clients, fl.clients_per_round, fl.sampling, round_index)


def config_counts(cfg) -> np.ndarray:
    fl = cfg.fl
    return participation_counts(cfg.seed, fl.num_clients, fl.clients_per_round, fl.sampling, fl.rounds)
