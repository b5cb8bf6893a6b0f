"""Planted faults, each caught by the audit (fedlora_jax.privacy.audit.auditor) at its default trial count and
verdict confidence, and the unmodified code read as consistent. A fault is planted in the test only
(a mechanism subclass or a monkeypatched key function), never in the product; the audit plays its
games through the real round (audit_round.AuditRound: the round's keys, mechanism, chunked sums),
so faults in that plumbing reach it. Each case names the detector that must catch it:
- lower_bound: the empirical lower bound exceeds the accountant's epsilon;
- shape: the scores of a plain Gaussian game are not Gaussian with equal variance;
- noise: zero updates through the round: the noise's variance or its independence across rounds is off;
- root: two roots equal below bit 32 give the same keys or noise.
Seeds are fixed, so every case is deterministic."""

from __future__ import annotations

import copy
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedlora_jax.config.run_config import load_config
from fedlora_jax.core import randomness
from fedlora_jax.privacy import mechanisms as modes
from fedlora_jax.privacy.audit import auditor as audit

TRIALS = 4000  # the audit's default
BASE = ["fl.rounds=2", "fl.num_clients=4", "fl.clients_per_round=2", "fl.local_steps=1", "dp.noise=multiplier"]
LOCAL = BASE + ["dp.mode=local", "dp.noise_multiplier=2.0", "dp.scope=global", "dp.neighbouring=add-remove"]
CENTRAL = BASE + ["dp.mode=central", "fl.sampling=poisson", "dp.noise_multiplier=2.0", "dp.scope=global"]
# DP-FedAvg without amplification (cyclic groups): every participation composes
CENTRAL_CYCLIC = BASE[1:] + ["fl.rounds=3", "dp.mode=central", "fl.sampling=cyclic", "dp.noise_multiplier=2.0"]
CENTRAL_CYCLIC += ["dp.scope=global"]
# BandMF: 6 rounds, 3 cyclic groups, noise correlated over 3 rounds
BANDMF = BASE[1:] + ["fl.rounds=6", "fl.num_clients=6", "dp.mode=bandmf", "fl.sampling=cyclic", "dp.band=3"]
BANDMF += ["dp.noise_multiplier=2.0", "dp.scope=global"]


def _mech(cls, overrides):
    cfg = load_config("tiny", overrides)
    return cfg, cls(cfg, audit.adapter_shapes(cfg), None)


class _LocalSkipsHalf(modes.LocalDP):
    """Noise skipped in half of the local releases (a coin per release)."""

    def release(self, local, global_, key, rank=None, mstate=None):
        clean = copy.copy(self)
        clean.sigma_a = clean.sigma_b = 0.0
        skip = jax.random.bernoulli(jax.random.fold_in(key, 12345))
        noisy = super().release(local, global_, key, rank, mstate)
        bare = modes.LocalDP.release(clean, local, global_, key, rank, mstate)
        return jax.tree.map(lambda n, b: jnp.where(skip, b, n), noisy, bare)


class _CentralSkipsHalf(modes.CentralDP):
    """Central noise skipped in half of the rounds (a coin per round)."""

    def finalize_sum(self, total, global_, key, expected_cohort, mstate=None):
        skip = jax.random.bernoulli(jax.random.fold_in(key, 12345))
        noisy = super().finalize_sum(total, global_, key, expected_cohort, mstate)
        bare = jax.tree.map(lambda g, t: g + t / expected_cohort, global_, total)
        return jax.tree.map(lambda n, b: jnp.where(skip, b, n), noisy, bare)


class _EmptyCohortHole(modes.CentralDP):
    """A round whose sum is zero (no client kept) keeps the global adapter, un-noised."""

    def finalize_sum(self, total, global_, key, expected_cohort, mstate=None):
        empty = jnp.all(jnp.stack([jnp.all(x == 0) for x in jax.tree.leaves(total)]))
        noisy = super().finalize_sum(total, global_, key, expected_cohort, mstate)
        return jax.tree.map(lambda n, g: jnp.where(empty, g, n), noisy, global_)


class _HalfNoise(modes.LocalDP):
    """Half the noise standard deviation the accountant is told."""

    def calibrate(self):
        super().calibrate()
        self.sigma_a, self.sigma_b = self.sigma_a / 2, self.sigma_b / 2


class _OutlierUnclipped(modes.LocalDP):
    """A client whose update is far beyond the clip (the canary's is 10 clips long) is not clipped."""

    def release(self, local, global_, key, rank=None, mstate=None):
        loose = copy.copy(self)
        loose.cfg = dataclasses.replace(self.cfg, dp=dataclasses.replace(self.cfg.dp, clip_a=1e30, clip_b=1e30))
        loose.clip_b = 1e30
        norm = jnp.sqrt(
            sum(jnp.sum(jnp.square(a - b)) for a, b in zip(jax.tree.leaves(local), jax.tree.leaves(global_)))
        )
        far = norm > 5 * self.cfg.dp.clip_a
        clipped = super().release(local, global_, key, rank, mstate)
        unclipped = modes.LocalDP.release(loose, local, global_, key, rank, mstate)
        return jax.tree.map(lambda u, c: jnp.where(far, u, c), unclipped, clipped)


class _CentralHalfNoise(modes.CentralDP):
    """Half the noise standard deviation the accountant is told (central DP)."""

    def calibrate(self):
        super().calibrate()
        self.z_update = self.z_update / 2


class _BandMFForgets(modes.BandMF):
    """The correlated noise's state is not carried to the next round (each round starts it afresh)."""

    def finalize_sum_with_state(self, total, global_, key, expected_cohort, mstate):
        aggregate, _ = super().finalize_sum_with_state(total, global_, key, expected_cohort, mstate)
        return aggregate, mstate


class _BandMFUncorrelated(modes.BandMF):
    """Independent noise of the same scale, while the accountant counts the strategy's correlation."""

    def finalize_sum_with_state(self, total, global_, key, expected_cohort, mstate):
        return self.finalize_sum(total, global_, key, expected_cohort, mstate), mstate


class _BandMFHalfNoise(modes.BandMF):
    """Half the noise standard deviation the accountant is told (the round scales z_update x clip)."""

    def calibrate(self):
        super().calibrate()
        self.z_update = self.z_update / 2


def _rounds_share_keys(monkeypatch):
    real = randomness.round_keys_of
    monkeypatch.setattr(randomness, "round_keys_of", lambda root, r: real(root, 0))


def _clients_share_keys(monkeypatch):
    monkeypatch.setattr(randomness, "client_key", lambda parent, client: parent)


def _root_truncated(monkeypatch):
    real = randomness.root_words
    monkeypatch.setattr(randomness, "root_words", lambda seed: real(int(seed) & 0xFFFFFFFF))


# name: (config, mechanism class, monkeypatch planting the fault or None, detector that must fire)
FAULTS = {
    "local_noise_skipped_in_half_the_releases": (LOCAL, _LocalSkipsHalf, None, "shape"),
    "central_noise_skipped_in_half_the_rounds": (CENTRAL, _CentralSkipsHalf, None, "noise"),
    "noise_keys_reused_across_rounds": (LOCAL, modes.LocalDP, _rounds_share_keys, "noise"),
    "noise_keys_reused_across_clients": (LOCAL, modes.LocalDP, _clients_share_keys, "noise"),
    "root_truncated_to_32_bits": (LOCAL, modes.LocalDP, _root_truncated, "root"),
    "one_clients_clip_skipped": (LOCAL, _OutlierUnclipped, None, "lower_bound"),
    "noise_std_halved": (LOCAL, _HalfNoise, None, "lower_bound"),
    "empty_cohort_without_noise": (CENTRAL, _EmptyCohortHole, None, "noise"),
    "central_unamplified_noise_std_halved": (CENTRAL_CYCLIC, _CentralHalfNoise, None, "lower_bound"),
    "bandmf_noise_state_not_carried": (BANDMF, _BandMFForgets, None, "noise"),
    "bandmf_noise_not_correlated": (BANDMF, _BandMFUncorrelated, None, "noise"),
    "bandmf_noise_std_halved": (BANDMF, _BandMFHalfNoise, None, "lower_bound"),
    "bandmf_keys_reused_across_rounds": (BANDMF, modes.BandMF, _rounds_share_keys, "noise"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAULTS))
def test_planted_fault_is_caught(name, monkeypatch):
    overrides, cls, plant, detector = FAULTS[name]
    if plant is not None:
        plant(monkeypatch)
    cfg, mech = _mech(cls, overrides)
    r = audit.audit(cfg, TRIALS, compositions=1, mechanism=mech)
    assert r["verdict_confidence"] == audit.VERDICT_CONFIDENCE
    assert detector in r["detected_by"], (name, r["detected_by"], r["verdict"])
    assert not r["consistent"] and r["verdict"].startswith("VIOLATION")


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides", [LOCAL, CENTRAL, CENTRAL_CYCLIC, BANDMF], ids=["local", "central", "central_cyclic", "bandmf"]
)
def test_unmodified_code_is_consistent_in_40_seeds(overrides):
    """The local game's accountant is tight (exact Gaussian composition), so a lower bound at 95%
    exceeds it about once in 20 audits; the verdict's family-wise level keeps 40 audits consistent."""
    cfg = load_config("tiny", overrides)
    game = audit.build_game(cfg, compositions=1)
    above_95 = 0
    for seed in range(40):
        r = audit.audit(cfg, TRIALS, game=game, seed=seed)
        assert r["consistent"], (seed, r["verdict"])
        above_95 += r["epsilon_lower"] > r["epsilon_accountant"]
    assert above_95 <= 8  # Binomial(40, 0.05) exceeds 8 with probability < 1e-3


def test_roots_differing_above_bit_32_give_different_keys_and_noise():
    """The secret root reaches JAX whole: 12345 and 12345 + 2**32 differ in the key data of every
    domain and in the noise of every mode's round keys; a root below 2**32 is jax.random.key's."""
    a, b = 12345, 12345 + 2**32
    assert not np.array_equal(jax.random.key_data(randomness.root(a)), jax.random.key_data(randomness.root(b)))
    assert np.array_equal(jax.random.key_data(randomness.root(a)), jax.random.key_data(jax.random.key(a)))
    ka, kb = randomness.round_keys(a, 3), randomness.round_keys(b, 3)
    for d in randomness.ROUND_DOMAINS:
        na = jax.random.normal(randomness.client_key(ka[d], 1), (64,))
        nb = jax.random.normal(randomness.client_key(kb[d], 1), (64,))
        assert float(jnp.max(jnp.abs(na - nb))) > 0.1, d
    # numpy draws on the host use the whole root too (central DP's client draw, DP-SGD's batches)
    assert randomness.np_rng(a, "client_sampling", 0).random() != randomness.np_rng(b, "client_sampling", 0).random()
    with pytest.raises(ValueError):
        randomness.root(2**64)


def test_a_noise_root_from_os_entropy_has_64_bits(monkeypatch):
    """resume.noise_seed draws ROOT_BITS = 64 bits; both key words carry entropy (a 32-bit root
    would leave the high word 0 in every draw)."""
    from fedlora_jax.runs import resume

    cfg = load_config("tiny", LOCAL)
    mech = modes.build(cfg, audit.adapter_shapes(cfg), None)
    seeds = [resume.noise_seed(cfg, mech, {}) for _ in range(64)]
    high = [int(jax.random.key_data(randomness.root(s))[0]) for s in seeds]
    assert randomness.ROOT_BITS >= 64 and max(seeds) < 2**64
    assert len(set(high)) > 60 and max(high) >= 2**31  # 64 draws of a uniform 32-bit word
