"""Which clients take part in each round: a pure function of (seed, round), independent of the data.

`uniform`: a fixed-size cohort of K clients drawn without replacement (the paper). `poisson`: every
client independently with probability q = K/N (central DP's amplification assumes it, and assumes
the draw is secret: in a deployment the server's sampling randomness must not be known to an
observer). A Poisson cohort has no fixed size; the round has static shapes, so the cohort is padded
to a capacity C chosen so that it overflows with probability <= a tail per round: the round
costs C client slots (about K + 7 sqrt(K)), not N. An overflowing draw keeps a random C of its
clients; central DP accounts that event in its delta, as (1 + e^epsilon) x rounds x tail, so it
picks the tail from its epsilon (`capacity_tail`): the term stays within 1% of dp.delta.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import numpy as np

from ..core import randomness
from ..core.numerics import MAX_EXP_EPSILON, SMALLEST_TAIL

if TYPE_CHECKING:
    from ..config.run_config import RunConfig

from ..core.choices import SAMPLINGS  # noqa: E402,F401  (the config's choices)

POISSON_TAIL = 1e-12  # per-round probability that a Poisson cohort overflows its static capacity (at most)
OVERFLOW_SHARE = 0.01  # the share of delta an overflowing cohort may add (central DP)


def capacity_tail(epsilon: float, delta: float, draws: int, ceiling: float = POISSON_TAIL) -> float:
    """The per-draw overflow probability that keeps (1 + e^epsilon) x draws x tail, the delta a capped
    cohort (or batch) adds to an (epsilon, delta) guarantee, within OVERFLOW_SHARE x delta (and <= ceiling).
    0.0 when that is below SMALLEST_TAIL (a huge epsilon): the capacity is then everything, nothing overflows."""
    log_bound = math.log(OVERFLOW_SHARE * delta / max(draws, 1)) - math.log1p(math.exp(min(epsilon, MAX_EXP_EPSILON)))
    if log_bound < math.log(SMALLEST_TAIL):
        return 0.0
    return min(ceiling, math.exp(log_bound))


@functools.lru_cache(maxsize=64)
def poisson_capacity(num_clients: int, clients_per_round: int, tail: float = POISSON_TAIL) -> tuple[int, float]:
    """(capacity C, overflow probability P(Binomial(N, K/N) > C)): the smallest C with overflow <= tail
    (tail 0: C = N)."""
    from scipy import stats

    q = clients_per_round / num_clients
    if q >= 1 or tail <= 0:
        return num_clients, 0.0
    c = min(num_clients, max(clients_per_round, int(stats.binom.isf(tail, num_clients, q))))
    while c < num_clients and stats.binom.sf(c, num_clients, q) > tail:  # isf is a float estimate:
        c += 1  # settle on the smallest C whose overflow is within the tail
    while c > clients_per_round and stats.binom.sf(c - 1, num_clients, q) <= tail:
        c -= 1
    return int(c), float(stats.binom.sf(c, num_clients, q)) if c < num_clients else 0.0


def cohort_slots(num_clients: int, clients_per_round: int, sampling: str, tail: float = POISSON_TAIL) -> int:
    """Client slots of every round's static shape: K (uniform) or the Poisson capacity."""
    if sampling == "poisson":
        return poisson_capacity(num_clients, clients_per_round, tail)[0]
    return clients_per_round


def sample_round(
    seed: int, num_clients: int, clients_per_round: int, sampling: str, round_index: int, tail: float = POISSON_TAIL
) -> tuple[np.ndarray, np.ndarray]:
    """(client slots, valid mask) of one round. uniform: K sorted ids, all valid; poisson: the
    sampled ids, sorted, padded to the capacity with the out-of-range id N (valid False there)."""
    rng = randomness.np_rng(seed, "client_sampling", round_index)
    if sampling == "uniform":
        ids = np.sort(rng.choice(num_clients, clients_per_round, replace=False))
        return ids, np.ones(len(ids), bool)
    if sampling == "poisson":
        taken = np.flatnonzero(rng.random(num_clients) < clients_per_round / num_clients)
        cap = poisson_capacity(num_clients, clients_per_round, tail)[0]
        if len(taken) > cap:  # probability <= tail: keep a random `cap` of them
            taken = np.sort(rng.choice(taken, cap, replace=False))
        ids = np.full(cap, num_clients, np.int64)
        ids[: len(taken)] = taken
        return ids, np.arange(cap) < len(taken)
    raise ValueError(f"unknown sampling {sampling!r}")  # the config validates it: a bug if reached


def participation_counts(
    seed: int, num_clients: int, clients_per_round: int, sampling: str, rounds: int, start: int = 0
) -> np.ndarray:
    """Rounds each client takes part in, over rounds [start, rounds) of the seeded schedule."""
    counts = np.zeros(num_clients, np.int64)
    for r in range(start, rounds):
        ids, valid = sample_round(seed, num_clients, clients_per_round, sampling, r)
        np.add.at(counts, ids[valid], 1)
    return counts


def for_config(
    cfg: RunConfig, round_index: int, seed: int | None = None, tail: float = POISSON_TAIL
) -> tuple[np.ndarray, np.ndarray]:
    """A round's cohort; seed: the sampling seed when it must stay secret (central DP), else cfg.seed;
    tail: the Poisson capacity's overflow probability (the mechanism's `cohort_tail`)."""
    fl = cfg.fl
    return sample_round(
        cfg.seed if seed is None else seed, fl.num_clients, fl.clients_per_round, fl.sampling, round_index, tail
    )


def config_counts(cfg: RunConfig) -> np.ndarray:
    fl = cfg.fl
    return participation_counts(cfg.seed, fl.num_clients, fl.clients_per_round, fl.sampling, fl.rounds)
