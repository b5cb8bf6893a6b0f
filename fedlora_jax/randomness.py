"""The key tree: every random draw of a run comes from its own named domain.

    root(seed) ──fold_in(domain id)──► domain key ──fold_in(ids...)──► the key of one use

A domain id is a 31-bit hash of the domain's name (distinct for every name below, checked at
import), folded into the root once; within a domain the ids are always the same kind and number
(round, client, step, leaf ...), so no two uses can share a key whatever the ids, rounds or layer
counts. (Before this module, `fold_in(key(seed), r)` was a round key and `fold_in(key(seed), 1)`
also fed model init: client noise equalled init weights.)

numpy draws on the host follow the same rule: `np_rng(seed, domain, *ids)` seeds a Generator with
[domain id, number of ids, seed, *ids]. The count matters: numpy's SeedSequence pads entropy with
zeros, so [s, 1] and [s, 1, 0] would be the same stream.
"""

from __future__ import annotations

import hashlib

import jax
import numpy as np

from .pytypes import ArrayLike, Key

# every domain a run draws from; add a name here to add a use of randomness
DOMAINS = (
    "model_init",  # the random base model (source: tiny) and its LoRA factors
    "lora_init",  # LoRA factors of a loaded base model
    "lora_reinit",  # adapters restarted each round under stacking (round)
    "client_sampling",  # which clients take part (round)
    "data_split",  # held-out split
    "subsample",  # data.max_examples: which examples are kept
    "partition",  # examples -> clients
    "data_order",  # a client's epoch permutations (client, epoch)
    "dpsgd_batches",  # a client's Poisson batches (client, participation)
    "synthetic_data",  # the synthetic training tasks
    "synthetic_eval",  # the synthetic multiple-choice questions
    "eval_sample",  # which held-out examples an evaluation scores
    "client_noise",  # local DP release noise (round, client, leaf)
    "server_noise",  # central DP noise on the sum (round, leaf)
    "clip_count_noise",  # adaptive clipping: noise on the count of unclipped clients (round)
    "dpsgd_noise",  # DP-SGD step noise (round, client, step, leaf)
    "noise_stats",  # Monte-Carlo noise statistics (dp.stats_every) (round, matrix)
    "audit",  # empirical privacy audits
    "generation",  # temperature sampling of `generate` (token index)
)


def domain_id(name: str) -> int:
    """A stable 31-bit id of a domain name."""
    if name not in DOMAINS:
        raise KeyError(f"unknown randomness domain {name!r}; known: {', '.join(DOMAINS)}")
    return int.from_bytes(hashlib.sha256(f"fedlora_jax/{name}".encode()).digest()[:4], "little") & 0x7FFFFFFF


_IDS = {d: domain_id(d) for d in DOMAINS}
assert len(set(_IDS.values())) == len(DOMAINS), "two randomness domains hash to one id"


def key(seed: int, domain: str, *ids: ArrayLike) -> Key:
    """The JAX key of one use: root(seed) -> domain -> ids (ints or traced int scalars)."""
    k = jax.random.fold_in(jax.random.key(seed), _IDS[domain] if domain in _IDS else domain_id(domain))
    for i in ids:
        k = jax.random.fold_in(k, i)
    return k


def np_rng(seed: int, domain: str, *ids: int) -> np.random.Generator:
    """The numpy Generator of one host-side use (sampling, partitions, data order)."""
    return np.random.default_rng(
        [_IDS[domain] if domain in _IDS else domain_id(domain), len(ids), int(seed), *(int(i) for i in ids)]
    )


def np_seed(seed: int, domain: str, *ids: int) -> int:
    """A 32-bit integer seed for a library that takes one (datasets' shuffle)."""
    return int(np_rng(seed, domain, *ids).integers(0, 2**32 - 1))


def round_keys(seed: int, round_index: int) -> dict:
    """The keys the jitted round draws from in round `round_index` (a pytree of typed keys)."""
    return {
        d: key(seed, d, round_index)
        for d in ("client_noise", "server_noise", "clip_count_noise", "dpsgd_noise", "lora_reinit")
    }
