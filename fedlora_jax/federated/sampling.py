"""Which clients take part in each round: a pure function of (seed, round), independent of the data.

`uniform`: a fixed-size cohort of K clients drawn without replacement (the paper). `cyclic`: each
client in one of b = ceil(N/K) fixed groups (its own seeded draw), group t mod b in round t (a client takes
part at most once every b rounds: the participation BandMF's accounting assumes). `poisson`: every
client independently with probability q = K/N (central DP's amplification assumes it, and assumes
the draw is secret: in a deployment the server's sampling randomness must not be known to an
observer). A Poisson cohort has no fixed size; the round has static shapes, so the cohort is padded
to a capacity C chosen so that it overflows with probability <= a tail per round: the round
costs C client slots (about K + 7 sqrt(K)), not N. An overflowing draw keeps a random C of its
clients; central DP accounts that event in its delta, as (1 + e^epsilon) x rounds x tail, so it
picks the tail from its epsilon (`capacity_tail`): the term stays within 1% of dp.delta.

Availability (`fl.availability`): `diurnal` clients are available in a window of every period
(phase and width per client, seeded): the cohort is drawn among the available ones. `dropout`: a
picked client fails to report with probability p (`reports`); it stays picked, and is charged, for
privacy. Both are functions of (seed, round), never of the training.
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
    """Client slots of every round's static shape: K (uniform), the Poisson or the cyclic capacity."""
    if sampling == "cyclic":
        return cyclic_capacity(num_clients, clients_per_round, tail)
    if sampling == "poisson":
        return poisson_capacity(num_clients, clients_per_round, tail)[0]
    return clients_per_round


def available(seed: int, num_clients: int, round_index: int, period: int, window: float) -> np.ndarray:
    """Diurnal availability of every client in a round: client i is available when (round + phase_i)
    mod period < width_i, phase_i uniform in [0, period), width_i = window x period x U(0.5, 1.5)
    (at least one round, at most the period)."""
    phase, width = _diurnal(seed, num_clients, period, window)
    return (round_index + phase) % period < width


@functools.lru_cache(maxsize=8)
def _diurnal(seed: int, num_clients: int, period: int, window: float) -> tuple[np.ndarray, np.ndarray]:
    u = randomness.np_rng(seed, "availability").random((num_clients, 2))  # row i: client i's draws alone
    phase = np.minimum((u[:, 0] * period).astype(np.int64), period - 1)
    width = np.clip(np.round(window * period * (0.5 + u[:, 1])), 1, period)
    return phase, width


@functools.lru_cache(maxsize=8)  # drawn once per run, not once per round (callers do not modify it)
def cyclic_groups(seed: int, num_clients: int, clients_per_round: int) -> list[np.ndarray]:
    """The b = ceil(N/K) fixed groups of cyclic sampling: client i is in group floor(b u_i), u_i its own
    seeded uniform draw. N and K are public (config.yaml): the neighbouring relation keeps the
    population's slots (a removed client's slot takes part with nothing to send), so its group and
    every other client's stay where they are. Groups hold N/b on average."""
    b = -(-num_clients // clients_per_round)
    group = np.minimum((randomness.np_rng(seed, "cyclic_groups").random(num_clients) * b).astype(np.int64), b - 1)
    return [np.flatnonzero(group == g) for g in range(b)]


@functools.lru_cache(maxsize=64)
def cyclic_capacity(num_clients: int, clients_per_round: int, tail: float = POISSON_TAIL) -> int:
    """Slots of a cyclic round: a group's size is Binomial(N, 1/b); the smallest C it exceeds with
    probability <= tail (an overflowing group sends a random C of its clients)."""
    from scipy import stats

    b = -(-num_clients // clients_per_round)
    if b == 1 or tail <= 0:
        return num_clients
    return int(min(num_clients, max(1, stats.binom.isf(tail, num_clients, 1.0 / b) + 1)))


def _padded(taken: np.ndarray, slots: int, num_clients: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full(slots, num_clients, np.int64)
    ids[: len(taken)] = taken
    return ids, np.arange(slots) < len(taken)


def sample_round(
    seed: int,
    num_clients: int,
    clients_per_round: int,
    sampling: str,
    round_index: int,
    tail: float = POISSON_TAIL,
    avail: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(client slots, valid mask) of one round. uniform: K sorted ids, all valid; poisson: the
    sampled ids, sorted, padded to the capacity with the out-of-range id N (valid False there);
    cyclic: the round's group, padded to its capacity. avail: who can be picked (None: everyone)."""
    rng = randomness.np_rng(seed, "client_sampling", round_index)
    if sampling == "uniform":
        if avail is None:
            ids = np.sort(rng.choice(num_clients, clients_per_round, replace=False))
            return ids, np.ones(len(ids), bool)
        pool = np.flatnonzero(avail)
        taken = np.sort(rng.choice(pool, min(clients_per_round, len(pool)), replace=False))
        return _padded(taken, clients_per_round, num_clients)
    if sampling == "poisson":
        drawn = rng.random(num_clients) < clients_per_round / num_clients
        taken = np.flatnonzero(drawn if avail is None else drawn & avail)
        cap = poisson_capacity(num_clients, clients_per_round, tail)[0]
        if len(taken) > cap:  # probability <= tail: keep a random `cap` of them
            taken = np.sort(rng.choice(taken, cap, replace=False))
        return _padded(taken, cap, num_clients)
    if sampling == "cyclic":
        groups = cyclic_groups(seed, num_clients, clients_per_round)
        taken = groups[round_index % len(groups)]
        if avail is not None:
            taken = taken[avail[taken]]
        cap = cyclic_capacity(num_clients, clients_per_round, tail)
        if len(taken) > cap:  # probability <= tail: a random `cap` of them
            taken = np.sort(rng.choice(taken, cap, replace=False))
        return _padded(taken, cap, num_clients)
    raise ValueError(f"unknown sampling {sampling!r}")  # the config validates it: a bug if reached


def reports(
    seed: int,
    ids: np.ndarray,
    valid: np.ndarray,
    round_index: int,
    p: float,
    sizes: np.ndarray | None = None,
    reference: int = 1,
) -> np.ndarray:
    """Which picked clients report back (dropout): each fails with probability p, or, given `sizes`,
    with p x reference / sizes[id] capped at 1 (a client holding `reference` examples drops with
    probability p, one holding twice as many with p / 2). A client's probability depends on its own
    data and public constants only, never on the other clients' data."""
    u = randomness.np_rng(seed, "dropout", round_index).random(len(ids))
    if sizes is None:
        p_i = np.full(len(ids), p)
    else:
        sizes = np.asarray(sizes, np.float64)
        p_i = np.minimum(1.0, p * reference / np.maximum(sizes[np.minimum(ids, len(sizes) - 1)], 1.0))
    return valid & (u >= p_i)


def reports_for(
    cfg: RunConfig, ids: np.ndarray, valid: np.ndarray, round_index: int, seed: int, sizes=None
) -> np.ndarray:
    """The picked clients that report in this round: `valid` unless fl.availability is dropout."""
    fl = cfg.fl
    if fl.availability != "dropout":
        return valid
    if fl.dropout_by_size and sizes is None:
        raise ValueError("fl.dropout_by_size needs the clients' example counts")  # the runner passes them
    by_size = sizes if fl.dropout_by_size else None
    return reports(seed, ids, valid, round_index, fl.dropout, by_size, fl.batch_size * fl.local_steps)


def _avail(fl, seed: int, round_index: int) -> np.ndarray | None:
    if fl.availability != "diurnal":
        return None
    return available(seed, fl.num_clients, round_index, fl.availability_period, fl.availability_window)


def participation_counts(
    seed: int, num_clients: int, clients_per_round: int, sampling: str, rounds: int, start: int = 0, fl=None
) -> np.ndarray:
    """Rounds each client takes part in (is picked), over rounds [start, rounds) of the seeded
    schedule; fl: the config's fl section, for its availability."""
    counts = np.zeros(num_clients, np.int64)
    for r in range(start, rounds):
        avail = _avail(fl, seed, r) if fl is not None else None
        ids, valid = sample_round(seed, num_clients, clients_per_round, sampling, r, avail=avail)
        np.add.at(counts, ids[valid], 1)
    return counts


def for_config(
    cfg: RunConfig, round_index: int, seed: int | None = None, tail: float = POISSON_TAIL
) -> tuple[np.ndarray, np.ndarray]:
    """A round's cohort (the picked clients: dropouts included, see `reports`); seed: the sampling
    seed when it must stay secret (central DP), else cfg.seed; tail: the Poisson capacity's overflow
    probability (the mechanism's `cohort_tail`)."""
    fl = cfg.fl
    seed = cfg.seed if seed is None else seed
    return sample_round(
        seed, fl.num_clients, fl.clients_per_round, fl.sampling, round_index, tail, _avail(fl, seed, round_index)
    )


def config_counts(cfg: RunConfig) -> np.ndarray:
    fl = cfg.fl
    return participation_counts(cfg.seed, fl.num_clients, fl.clients_per_round, fl.sampling, fl.rounds, fl=fl)


def min_separation(cfg: RunConfig) -> int:
    """The fewest rounds between two participations of one client that the sampling guarantees
    (cyclic: b = ceil(N/K); otherwise 1)."""
    fl = cfg.fl
    return -(-fl.num_clients // fl.clients_per_round) if fl.sampling == "cyclic" else 1


def cohort_distribution(cfg: RunConfig, max_rounds: int = 2000) -> dict:
    """The realised cohorts of the seeded schedule (cfg.seed; central DP draws with its secret root:
    the same distribution, other draws) over the first min(rounds, max_rounds) rounds: clients
    picked and clients reporting (dropout) per round, and the share of the population available."""
    fl = cfg.fl
    rounds = min(fl.rounds, max_rounds)
    picked, came, avail = [], [], []
    for r in range(rounds):
        ids, valid = for_config(cfg, r)
        picked.append(int(valid.sum()))
        if not fl.dropout_by_size:  # by size needs the clients' data, which plan does not load
            came.append(int(reports_for(cfg, ids, valid, r, cfg.seed).sum()))
        a = _avail(fl, cfg.seed, r)
        avail.append(1.0 if a is None else float(a.mean()))

    def spread(x):
        return {"min": int(min(x)), "median": float(np.median(x)), "mean": float(np.mean(x)), "max": int(max(x))}

    return {
        "rounds": rounds,
        "picked": spread(picked),
        "reporting": spread(came) if came else None,
        "available_share": {k: float(v) for k, v in spread(avail).items()},
    }
