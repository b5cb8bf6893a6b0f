"""Audit games played through the real round (simulation.make_round), not a copy of it.

A trial is a run of the real jitted round, its own 64-bit noise root per trial, its keys from
`randomness.round_keys_of` (the function a run uses), its mechanism, its aggregator's accumulate /
finalize over the run's chunking, and its server-state plumbing (the mechanism's state, e.g. an
adaptive clip, evolves as in a run). Only two parts are replaced, and neither touches privacy:
- the clients' training: a client's "local adapter" is the global adapter plus an update chosen by
  the game (the canary, its neighbour, zero, or another client's), selected by a number written
  into the client's batch tokens, so the canary is a client of the cohort like any other;
- the server optimizer: it keeps the global adapter where it was and records the aggregate
  (post-processing: the observer sees exactly what the round released), so every round starts from
  the same global adapter and the observations of a trial's rounds are comparable.

Detectors (audit.py runs them all; each has its own test against planted faults):
- lower bound: the games' scores (audit_bounds.py) against the accountant's epsilon;
- shape: where a game is a plain Gaussian mechanism its scores must be Gaussian with equal variance;
- noise: zero updates through the round, several clients in several chunks and rounds, an empty
  round last: the aggregate's noise has the mechanism's stated standard deviation in every round
  (empty included), and is uncorrelated across rounds;
- root: two noise roots that differ only above bit 32 give different keys and different noise.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ...core import randomness
from ...core.pytypes import Array, Key, Tree
from ...federated import aggregation as agg
from ...federated import algorithms

if TYPE_CHECKING:
    from ..mechanisms import Mechanism

# sub-streams of the "audit" randomness domain used here (audit_canary uses 0-2)
_ROOTS, _SAMPLE, _NOISE_ROOTS = 3, 4, 5
NOISE_SIGMAS = 5.0  # the noise check's tolerance on a variance ratio, in standard errors
CORRELATION_SIGMAS = 4.0  # and on a correlation (4 / sqrt(n))
ROOT_CHECK_SEED = 12345  # root_check's pair: this root and this + 2**32


def record_aggregate() -> optax.GradientTransformation:
    """A server step that leaves the global adapter where it is and keeps the pseudo-gradient
    (global - aggregate) as its state: the audit's observer reads the aggregate from it."""

    def init(params: Tree) -> Tree:
        return jax.tree.map(jnp.zeros_like, params)

    def update(updates: Tree, state: Tree, params: Tree | None = None) -> tuple[Tree, Tree]:
        del state, params
        return jax.tree.map(jnp.zeros_like, updates), updates

    return optax.GradientTransformation(init, update)


def set_update_client(updates: Tree):
    """The client function of an audit round: local = global + updates[sel], sel = tokens[0, 0, 0]."""

    def client_fn(base, global_lora, batches, lr, *, rank=None, hook=None, ctx=None, dpsgd=None):
        del base, lr, rank, hook, ctx, dpsgd
        sel = batches["tokens"][0, 0, 0]
        local = jax.tree.map(lambda g, u: g + u[sel], global_lora, updates)
        z = jnp.zeros((), jnp.float32)
        return local, {"loss": z, "first_loss": z, "update_norm": z}, None

    return client_fn


def trial_roots(seed: int, stream: int, n: int) -> np.ndarray:
    """n independent 64-bit noise roots (as [n, 2] uint32 key words), one per trial."""
    return randomness.np_rng(seed, "audit", stream).integers(0, 2**32, (n, 2), dtype=np.uint64).astype(np.uint32)


def root_of(words: Array) -> Key:
    """The typed root key of a trial from its two key words (traced)."""
    return jax.random.wrap_key_data(words, impl="threefry2x32")


class AuditRound:
    """The real round with set updates: `run(root_words, sel[T, K], valid[T, K])` -> the aggregate
    minus the global adapter after each of the T rounds (a tree with a leading T axis) and the
    mechanism's state at the start of each round."""

    def __init__(self, mech: Mechanism, updates: Tree, num_clients: int, expected: int, chunk: int | None):
        from ...federated.simulation import RoundParts, make_round

        fl = mech.cfg.fl
        self.mech = mech
        self.zeros = jax.tree.map(lambda x: jnp.zeros(x.shape[1:], jnp.float32), updates)
        self.parts = RoundParts(
            client_fn=set_update_client(updates),
            mechanism=mech,
            aggregator=agg.get("mean"),
            hook=algorithms.get("fedavg").hook(fl),
            server_opt=record_aggregate(),
            definition=None,
            num_clients=num_clients,
            expected_cohort=expected,
            chunk=chunk,
        )
        self.round_fn = make_round(self.parts)

    def run(self, words: Array, sel: Array, valid: Array) -> tuple[Tree, Any]:
        from ...federated.simulation import BATCH_KEYS, Cohort

        root = root_of(words)
        k = sel.shape[1]
        state0 = self.parts.init(self.zeros)

        def one(state, x):
            t, sel_t, valid_t = x
            cohort = Cohort(
                {n: sel_t.reshape(k, 1, 1, 1) for n in BATCH_KEYS},
                jnp.ones((k,), jnp.float32),
                jnp.arange(k, dtype=jnp.int32),
                jnp.ones((k,), jnp.int32),
                valid_t,
            )
            new, _ = self.round_fn(state, {}, cohort, randomness.round_keys_of(root, t), jnp.float32(0.0))
            observed = jax.tree.map(jnp.negative, new.opt)  # aggregate - global
            return new, (observed, state.mech)

        ts = jnp.arange(sel.shape[0], dtype=jnp.int32)
        _, (obs, mstates) = jax.lax.scan(one, state0, (ts, sel, valid))
        return obs, mstates


# ----------------------------------------------------------------------------- the noise check


def _sigma_leaves(mech: Mechanism, tree: Tree) -> list[float]:
    """The noise std of each leaf that the accounted multiplier implies (the multiplier the ledger
    composes times the clip, not the mechanism's own sigma attributes, so a mechanism that adds less
    noise than it accounts shows); 0 where nothing is released (a frozen, public A)."""
    from .canary import _per_leaf_sigma

    dp = mech.cfg.dp
    z = getattr(mech, "z_update", mech.z)  # central with adaptive clipping: the update's share of z
    clip_b = dp.clip_a if dp.scope == "global" else dp.clip_b
    sigma_a = 0.0 if mech.cfg.lora.freeze_a and not mech.sums_updates else z * dp.clip_a
    return jax.tree.leaves(_per_leaf_sigma(tree, sigma_a, z * clip_b))


def noise_check(mech: Mechanism, shapes: Tree, trials: int = 256, seed: int = 0, chunk: int = 1) -> dict:
    """Zero updates through the real round: K = 2 clients in chunks of `chunk`, then an empty round
    (no client kept); per round, the aggregate's noise divided by the std the mechanism states must
    have variance 1 (within NOISE_SIGMAS standard errors) and the rounds' noises must be uncorrelated
    (within CORRELATION_SIGMAS / sqrt(n)). Catches noise skipped in some releases or rounds, a noise
    scale other than stated, keys shared across rounds, clients or chunks, and an empty round
    without noise. Applies where the round adds Gaussian noise to the aggregate (local, central)."""
    if mech.record_level:
        ka, kb = (randomness.round_keys(ROOT_CHECK_SEED + i * 2**32, 0)["dpsgd_noise"] for i in (0, 1))
        differ = bool(np.any(np.asarray(jax.random.key_data(ka) != jax.random.key_data(kb))))
        return {
            "applicable": False,
            "reason": "record-level noise is added inside local training",
            "root_pair_differs": differ,
        }
    correlated = getattr(mech, "correlated_noise", False)
    if correlated and mech.cfg.fl.rounds < 3:
        return {"applicable": False, "reason": "the noise strategy covers fewer than the check's 3 rounds"}
    k = 2
    zeros = jax.tree.map(lambda x: jnp.zeros((1,) + tuple(x.shape), jnp.float32), shapes)
    expected = k if not mech.sums_updates else mech.cfg.fl.clients_per_round
    harness = AuditRound(mech, zeros, k, expected, chunk)
    sel = jnp.zeros((3, k), jnp.int32)
    valid = jnp.array([[True, True], [True, True], [False, False]])
    # the first two trials: roots equal below bit 32 (root_check reads whether their noise differs)
    pair = [randomness.root_words(ROOT_CHECK_SEED + i * 2**32) for i in (0, 1)]
    words = jnp.asarray(np.concatenate([np.stack(pair), trial_roots(seed, _NOISE_ROOTS, trials - 2)]))
    cache = mech.__dict__.setdefault("_audit_noise_check", {})  # another seed compiles nothing
    if (trials, chunk) not in cache:
        cache[(trials, chunk)] = jax.jit(jax.vmap(lambda w: harness.run(w, sel, valid)))
    obs, mstates = cache[(trials, chunk)](words)
    pair_differs = any(bool(jnp.any(x[0] != x[1])) for x in jax.tree.leaves(obs))
    clip0 = mech.cfg.dp.clip_a
    scale = mstates["clip"] / clip0 if "clip" in mstates else jnp.ones((trials, 3), jnp.float32)  # [trials, T]
    sig = _sigma_leaves(mech, zeros)
    per_round = []  # standardised noise of each round: [trials, coords]
    for t in range(3):
        parts = []
        for x, s in zip(jax.tree.leaves(obs), sig):
            if s <= 0:
                continue
            if mech.sums_updates:  # the sum's noise (every round, empty included) over the expected cohort
                std = s * scale[:, t] / expected
            elif t < 2:  # the mean of K independent releases
                std = s * jnp.ones((trials,)) / math.sqrt(k)
            else:  # an empty round under local DP releases nothing: the global stays
                std = None
            if std is None:
                parts.append(jnp.zeros((trials, 0)))
                continue
            parts.append(x[:, t].reshape(trials, -1) / std[:, None])
        per_round.append(np.asarray(jnp.concatenate(parts, axis=1), np.float64))
    if correlated:  # noise correlated by a strategy C: C y is iid (the rounds' noises whitened)
        per_round = list(np.tensordot(mech.strategy_matrix(3), np.stack(per_round), axes=1))
    out: dict = {"applicable": True, "trials": trials, "clients": k, "chunk": chunk, "rounds": []}
    out["root_pair_differs"] = pair_differs
    failures = []
    for t, z in enumerate(per_round):
        if z.size == 0:
            if not np.all(np.asarray(jax.tree.leaves(jax.tree.map(lambda x: x[:, t], obs))[0]) == 0):
                failures.append(f"round {t} (empty) moved the global adapter under local DP")
            out["rounds"].append({"round": t, "empty": True, "n": 0})
            continue
        n = z.size
        var = float(np.mean(z * z))
        tol = NOISE_SIGMAS * math.sqrt(2.0 / n)
        row = {"round": t, "empty": t == 2, "n": n, "variance_ratio": var, "tolerance": tol}
        out["rounds"].append(row)
        if abs(var - 1.0) > tol:
            what = "an empty round's" if t == 2 else f"round {t}'s"
            failures.append(f"{what} noise has {var:.3g} x the variance the mechanism states (allowed 1 +- {tol:.2g})")
    z0, z1 = per_round[0], per_round[1]
    with np.errstate(invalid="ignore", divide="ignore"):
        r = float(np.mean(z0 * z1) / math.sqrt(np.mean(z0 * z0) * np.mean(z1 * z1)))
    tol_r = CORRELATION_SIGMAS / math.sqrt(z0.size)
    out["round_correlation"], out["correlation_tolerance"] = r, tol_r
    if not abs(r) <= tol_r:  # NaN (a round without any noise) included
        failures.append(f"two rounds' noises correlate at {r:.3g} (allowed +- {tol_r:.2g}): keys reused across rounds")
    out["failures"] = failures
    out["passed"] = not failures
    return out


def root_check(noise: dict, base_seed: int = ROOT_CHECK_SEED) -> dict:
    """Two noise roots that differ only above bit 32 must give different key data and different
    noise through the real round (a root cut to 32 bits is a search over 2**32, not a distribution).
    The noise comes from noise_check, which plays these two roots as its first two trials."""
    a, b = base_seed, base_seed + 2**32
    da, db = (np.asarray(jax.random.key_data(randomness.root(s))) for s in (a, b))
    out = {"roots": [a, b], "root_bits": randomness.ROOT_BITS, "key_data_differ": bool(np.any(da != db))}
    out["noise_differs"] = noise.get("root_pair_differs", out["key_data_differ"])
    out["passed"] = out["key_data_differ"] and out["noise_differs"]
    what = "keys" if not out["key_data_differ"] else "noise"
    out["failures"] = [] if out["passed"] else [f"noise roots {a} and {b} (equal below bit 32) give the same {what}"]
    return out
