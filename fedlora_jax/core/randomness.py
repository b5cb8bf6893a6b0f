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

The root carries the whole seed: `root(seed)` packs a seed in [0, 2**64) into the two 32-bit words
of a threefry2x32 key (high word, low word), so a 64-bit secret noise root stays a 64-bit secret in
every JAX draw. (`jax.random.key(seed)` with 64-bit mode off keeps the low 32 bits: a search over
2**32 candidate roots recovered a run's noise.) For seeds below 2**32 the root equals
`jax.random.key(seed)`, so runs with small seeds are unchanged.
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
    "availability",  # fl.availability diurnal: each client's phase and window
    "cyclic_groups",  # fl.sampling cyclic: each client's group
    "dropout",  # fl.availability dropout: which picked clients fail to report (round)
)


def domain_id(name: str) -> int:
    """A stable 31-bit id of a domain name."""
    if name not in DOMAINS:
        raise KeyError(f"unknown randomness domain {name!r}; known: {', '.join(DOMAINS)}")
    return int.from_bytes(hashlib.sha256(f"fedlora_jax/{name}".encode()).digest()[:4], "little") & 0x7FFFFFFF


_IDS = {d: domain_id(d) for d in DOMAINS}
assert len(set(_IDS.values())) == len(DOMAINS), "two randomness domains hash to one id"


ROOT_BITS = 64  # the bits of a seed that reach every key (a threefry2x32 key holds 64)


def root_words(seed: int) -> np.ndarray:
    """The key data of root(seed): [high 32 bits, low 32 bits] as uint32."""
    s = int(seed)
    if not 0 <= s < 2**ROOT_BITS:
        raise ValueError(f"a root seed must be in [0, 2**{ROOT_BITS}), got {s}")
    return np.array([s >> 32, s & 0xFFFFFFFF], np.uint32)


def root(seed: int) -> Key:
    """The root key of a seed, all of its 64 bits kept (see the module's docstring)."""
    return jax.random.wrap_key_data(root_words(seed), impl="threefry2x32")


def derive(parent: Key, domain: str, *ids: ArrayLike) -> Key:
    """The key of one use under a root key (typed, possibly traced): parent -> domain -> ids."""
    k = jax.random.fold_in(parent, _IDS[domain] if domain in _IDS else domain_id(domain))
    for i in ids:
        k = jax.random.fold_in(k, i)
    return k


def key(seed: int, domain: str, *ids: ArrayLike) -> Key:
    """The JAX key of one use: root(seed) -> domain -> ids (ints or traced int scalars)."""
    return derive(root(seed), domain, *ids)


def client_key(parent: Key, client: ArrayLike) -> Key:
    """A client's key under a round's domain key (round_keys(...)[domain]): one per client id."""
    return jax.random.fold_in(parent, client)


def np_rng(seed: int, domain: str, *ids: int) -> np.random.Generator:
    """The numpy Generator of one host-side use (sampling, partitions, data order)."""
    return np.random.default_rng(
        [_IDS[domain] if domain in _IDS else domain_id(domain), len(ids), int(seed), *(int(i) for i in ids)]
    )


def np_seed(seed: int, domain: str, *ids: int) -> int:
    """A 32-bit integer seed for a library that takes one (datasets' shuffle)."""
    return int(np_rng(seed, domain, *ids).integers(0, 2**32 - 1))


ROUND_DOMAINS = ("client_noise", "server_noise", "clip_count_noise", "dpsgd_noise", "lora_reinit")


def round_keys(seed: int, round_index: ArrayLike) -> dict:
    """The keys the jitted round draws from in round `round_index` (a pytree of typed keys)."""
    return round_keys_of(root(seed), round_index)


def round_keys_of(root_key: Key, round_index: ArrayLike) -> dict:
    """round_keys under a root key (typed; may be traced, e.g. one root per audit trial)."""
    return {d: derive(root_key, d, round_index) for d in ROUND_DOMAINS}
