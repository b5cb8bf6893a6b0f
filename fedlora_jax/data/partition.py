"""Client partitions, deterministic by seed: iid, dirichlet over a label (label-wise, or balanced:
iid client sizes with a Dirichlet label mix per client), by_column (natural)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..core import randomness
from ..core.errors import UserError

if TYPE_CHECKING:
    from collections.abc import Sequence

from ..core.choices import PARTITIONS  # noqa: E402,F401  (the config's choices)


def partition(
    n: int,
    num_clients: int,
    method: str = "iid",
    labels: Sequence | np.ndarray | None = None,
    alpha: float = 0.5,
    seed: int = 0,
) -> list[np.ndarray]:
    """Index arrays, one per client; every example lands in exactly one client."""
    if method not in PARTITIONS:
        raise UserError(f"unknown partition {method!r}; allowed: {', '.join(PARTITIONS)}")
    if num_clients < 1:
        raise UserError(f"num_clients must be >= 1, got {num_clients}")
    if num_clients > n:
        raise UserError(f"{num_clients} clients but only {n} examples; lower fl.num_clients")
    rng = randomness.np_rng(seed, "partition")
    if method == "iid":  # shuffle and split, as OpenFedLLM does
        return [np.sort(p) for p in np.array_split(rng.permutation(n), num_clients)]
    if labels is None:
        raise UserError(f"partition {method!r} needs a label column (data.label_column)")
    labels = np.asarray(labels)
    values, inverse = np.unique(labels, return_inverse=True)
    if method.startswith("dirichlet") and alpha <= 0:
        raise UserError(f"dirichlet alpha must be > 0, got {alpha}")
    if method == "dirichlet_balanced":
        return _dirichlet_balanced(inverse, len(values), num_clients, alpha, rng)
    if method == "dirichlet":
        for _ in range(100):  # redraw until every client has at least one example
            parts = [[] for _ in range(num_clients)]
            for v in range(len(values)):
                idx = rng.permutation(np.nonzero(inverse == v)[0])
                props = rng.dirichlet(np.full(num_clients, alpha))
                cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
                for c, chunk in enumerate(np.split(idx, cuts)):
                    parts[c].extend(chunk.tolist())
            if min(len(p) for p in parts) > 0:
                return [np.sort(np.asarray(p, np.int64)) for p in parts]
        # raising alpha helps only if even shares (its limit) give every client an example
        counts = np.bincount(inverse, minlength=len(values))
        covered = np.zeros(num_clients, bool)
        for m in counts:
            sizes = np.diff(np.floor(np.arange(num_clients + 1) / num_clients * m).astype(int))
            covered |= sizes > 0
        advice = "raise alpha, lower num_clients," if covered.all() else "lower num_clients"
        raise UserError(
            f"dirichlet alpha {alpha} leaves some of {num_clients} clients empty in 100 draws; "
            f"{advice} or use partition dirichlet_balanced (every client keeps its iid share of the examples)"
        )
    # by_column: one group per value, then merge the smallest or split the largest
    groups = [np.nonzero(inverse == v)[0] for v in range(len(values))]
    while len(groups) > num_clients:
        groups.sort(key=len)
        groups = [np.sort(np.concatenate(groups[:2]))] + groups[2:]
    while len(groups) < num_clients:
        groups.sort(key=len)
        big = groups.pop()
        if len(big) < 2:
            raise UserError(f"cannot split {n} examples into {num_clients} non-empty clients")
        groups += [big[: len(big) // 2], big[len(big) // 2 :]]
    order = np.argsort([g.min() for g in groups])  # stable, seed-free order of clients
    return [np.sort(groups[i]) for i in order]


def _dirichlet_balanced(inverse: np.ndarray, num_labels: int, num_clients: int, alpha: float, rng) -> list:
    """Client-wise Dirichlet (Hsu et al., 2019): client sizes as iid (n / num_clients, +-1), and
    each client's label mix q ~ Dirichlet(alpha x labels x prior), its labels drawn from q without
    replacement from what the clients before it left. A label that runs out under a client
    passes its share to the client's other labels in proportion to q (or, where q left nothing
    available, to a fresh mix over the labels that remain). Every client is non-empty whenever
    n >= num_clients, however few examples each holds; the label skew is the Dirichlet's."""
    pools = [rng.permutation(np.nonzero(inverse == v)[0]) for v in range(num_labels)]
    left = np.array([len(p) for p in pools], np.int64)
    prior = left / left.sum()
    sizes = [len(p) for p in np.array_split(np.arange(int(left.sum())), num_clients)]
    parts: list = [None] * num_clients
    for c in rng.permutation(num_clients):  # a random order: no client id is always served last
        q = rng.dirichlet(alpha * num_labels * prior)
        counts = np.minimum(rng.multinomial(sizes[c], q), left)
        while (deficit := sizes[c] - counts.sum()) > 0:
            avail = left - counts
            w = q * (avail > 0)
            if not w.sum() > 0:  # q (numerically) on exhausted labels only: a fresh mix
                w = np.zeros(num_labels)
                w[avail > 0] = rng.dirichlet(alpha * num_labels * prior[avail > 0])
                if not w.sum() > 0:
                    w = avail.astype(float)
            counts += np.minimum(rng.multinomial(deficit, w / w.sum()), avail)
        picked = []
        for v in np.nonzero(counts)[0]:
            start = len(pools[v]) - left[v]
            picked.append(pools[v][start : start + counts[v]])
        left -= counts
        parts[c] = np.sort(np.concatenate(picked)).astype(np.int64)
    return parts


def partition_summary(
    parts: list[np.ndarray], attention_mask: np.ndarray, labels: Sequence | np.ndarray | None = None
) -> list[dict]:
    """Examples, tokens and label counts per client."""
    out = []
    lengths = attention_mask.sum(axis=1)
    labels = None if labels is None else np.asarray(labels)  # once, not per client
    for c, idx in enumerate(parts):
        row = {"client": c, "examples": int(len(idx)), "tokens": int(lengths[idx].sum())}
        if labels is not None:
            vals, counts = np.unique(labels[idx], return_counts=True)
            row["labels"] = {str(v): int(k) for v, k in zip(vals, counts)}
        out.append(row)
    return out
