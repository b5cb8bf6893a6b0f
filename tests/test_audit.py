"""Empirical privacy audit (fedlora_jax.privacy.audit.auditor): lower bounds on epsilon measured on the run's
own jitted release path (mechanism.release / finalize_sum, client.dpsgd_grads) must stay below the
accountant's upper bound for the same game, must have power, must falsify the paper's epsilon, and
must catch a re-introduced hole. Every lower bound here is at 99.9% confidence (each of the two
bounds at 99.95%, so their maximum holds at 99.9%): where the accountant is tight (local mode is
exact Gaussian composition) a correct mechanism still puts the lower bound above it with probability
up to 1 - confidence, so the tests use a high one. The seeds are fixed, so each test is deterministic."""

from __future__ import annotations

import functools
import json
import math

import dp_accounting as dpa
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from fedlora_jax import cli
from fedlora_jax.config.run_config import load_config
from fedlora_jax.privacy import accounting as acc
from fedlora_jax.privacy import mechanisms as modes
from fedlora_jax.privacy.audit import auditor as audit

TRIALS = 8000
CONFIDENCE = 0.999
BASE = ["fl.rounds=2", "fl.num_clients=4", "fl.clients_per_round=2", "fl.local_steps=1", "dp.noise=multiplier"]
SAMPLED_CENTRAL = ["dp.mode=central", "fl.sampling=poisson", "dp.noise_multiplier=2.0", "dp.scope=global"]

# name: (overrides, audit keyword arguments); q is the game's sampling rate
CASES = {
    # local, the defaults (per_matrix: 8 clipped blocks; replace-one), a weak noise, 2 participations
    "local_z0.5": (["dp.mode=local", "dp.noise_multiplier=0.5"], {"compositions": 2}),
    # local, one clipped tensor, add-remove, one release
    "local_z2": (
        ["dp.mode=local", "dp.noise_multiplier=2.0", "dp.scope=global", "dp.neighbouring=add-remove"],
        {"compositions": 1},
    ),
    # central, q = 2/4, one round (noise in every round, empty cohorts included)
    "central_z2_q0.5": (SAMPLED_CENTRAL, {"compositions": 1}),
    # central, per_matrix clipping, a weaker noise, q = 2/4, three rounds
    "central_z0.7_q0.5": (["dp.mode=central", "fl.sampling=poisson", "dp.noise_multiplier=0.7"], {"compositions": 3}),
    # central, every client in every round (q = 1: a plain Gaussian), other clients with orthogonal updates
    "central_z2_q1": (
        [
            "dp.mode=central",
            "fl.sampling=poisson",
            "fl.clients_per_round=4",
            "dp.noise_multiplier=2.0",
            "dp.scope=global",
        ],
        {"compositions": 1, "others": "orthogonal"},
    ),
    # central with adaptive clipping: the clip is mechanism state, updated from a noisy count each round
    "central_adaptive_z1_q0.5": (
        SAMPLED_CENTRAL[:2]
        + ["dp.noise_multiplier=1.0", "dp.scope=global", "dp.adaptive_clip=true"]
        + ["dp.clip_count_noise=5.0"],
        {"compositions": 3},
    ),
    # dpsgd, batch rate 8/16 = 0.5, 2 steps
    "dpsgd_z1_q0.5": (
        ["dp.mode=dpsgd", "dp.noise_multiplier=1.0", "dp.clip_a=1.0"],
        {"compositions": 2, "client_sizes": [16, 16, 16, 16]},
    ),
    # dpsgd, batch rate 8/8 = 1 (a plain Gaussian), one step
    "dpsgd_z2_q1": (
        ["dp.mode=dpsgd", "dp.noise_multiplier=2.0", "dp.clip_a=1.0"],
        {"compositions": 1, "client_sizes": [8, 8, 8, 8]},
    ),
}
GAUSSIAN = ("local_z2", "central_z2_q1", "dpsgd_z2_q1")  # z >= 2, one composition, no sampling
POWER_FRACTION = 0.75


def _cfg(overrides):
    return load_config("tiny", BASE + list(overrides))


@functools.lru_cache(maxsize=None)
def _run(name):
    overrides, kw = CASES[name]
    return audit.audit(_cfg(overrides), TRIALS, confidence=CONFIDENCE, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_lower_bound_below_accountant(name):
    r = _run(name)
    assert r["trials"] == TRIALS and r["confidence"] == CONFIDENCE
    assert r["epsilon_lower"] == max(r["epsilon_lower_distribution_free"], r["epsilon_lower_gdp"] or 0.0)
    assert r["epsilon_lower"] <= r["epsilon_accountant"], r
    assert r["consistent"] and r["verdict"].startswith("consistent")
    # the accountant's figure is the mechanism's ledger for exactly this game
    overrides, kw = CASES[name]
    cfg = _cfg(overrides)
    mech = modes.build(cfg, audit.adapter_shapes(cfg), kw.get("client_sizes"))
    if r["mode"] == "local":
        expected = acc.gaussian_epsilon(mech.z_eff, kw["compositions"], mech.cfg.dp.delta)
    elif r["mode"] == "central":
        expected = acc.sampled_epsilon(
            mech.z_eff,
            mech.cfg.fl.clients_per_round / mech.cfg.fl.num_clients,
            kw["compositions"],
            mech.cfg.dp.delta,
            with_rdp=False,
        )[0]
    else:
        expected = acc.sampled_epsilon(
            mech.z, mech.batch_rate, kw["compositions"] * mech.cfg.fl.local_steps, mech.cfg.dp.delta, with_rdp=False
        )[0]
    assert r["epsilon_accountant"] == pytest.approx(expected, rel=1e-9)
    # the Gaussian-DP bound is offered exactly where the game is a plain Gaussian mechanism
    plain = r["mode"] == "local" or name.endswith("_q1")
    assert (r["epsilon_lower_gdp"] is not None) == plain, r["gdp"]
    assert r["epsilon_paper"] is None if r["mode"] != "local" else r["epsilon_paper"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", GAUSSIAN)
def test_game_has_power(name):
    """At z = 2, one release and no sampling, the audited lower bound reaches at least 75% of the
    accountant's epsilon, and the measured separation mu agrees with the one the accountant assumes."""
    r = _run(name)
    gdp = r["gdp"]
    assert gdp["applicable"], gdp
    for k in ("normality_p_in", "normality_p_out", "equal_variance_p"):  # Gaussian by construction
        assert gdp[k] >= audit.NORMALITY_ALPHA, (k, gdp)
    # mu_expected is what the accountant assumes: one Gaussian release of noise multiplier z_eff
    assert r["mu_expected"] == pytest.approx(1.0 / r["effective_noise_multiplier"], rel=1e-4)
    n = TRIALS / 2
    se = math.sqrt(2 / n + r["mu_expected"] ** 2 / (4 * n))  # standard error of the standardised mean difference
    assert abs(gdp["mu_hat"] - r["mu_expected"]) < 4 * se, gdp
    assert gdp["mu_lower"] < gdp["mu_hat"]
    assert r["epsilon_lower_gdp"] >= POWER_FRACTION * r["epsilon_accountant"], r
    # the attack is better than chance at low false-positive rates
    assert r["tpr_at_fpr"]["0.01"] > 0.01 and r["auroc"] > 0.5


@pytest.mark.slow
def test_paper_mechanism_is_falsified():
    """The paper's noise (classical formula at epsilon 25), one clipped tensor, one release, its own
    add-remove convention: the Gaussian-DP lower bound exceeds 25; a distribution-free bound from n
    trials cannot exceed about ln(n), so only the GDP bound can show it."""
    cfg = load_config(
        "tiny",
        BASE[:-1]
        + ["dp.mode=local", "dp.noise=classical", "dp.epsilon=25", "dp.scope=global", "dp.neighbouring=add-remove"],
    )
    r = audit.audit(cfg, TRIALS, compositions=1, confidence=CONFIDENCE)
    z = math.sqrt(2 * math.log(1.25 / 1e-5)) / 25
    assert r["noise_multiplier"] == pytest.approx(z)
    assert r["epsilon_paper"] == pytest.approx(25.0)
    assert r["epsilon_lower_distribution_free"] < math.log(TRIALS)
    assert r["epsilon_lower_gdp"] > 25.0 and r["paper_falsified"]
    assert r["epsilon_lower"] <= r["epsilon_accountant"]  # the honest figure (~34.6) stands
    assert r["epsilon_accountant"] == pytest.approx(dpa.get_epsilon_gaussian(z, 1e-5), rel=1e-9)
    assert "paper's figure 25 is falsified" in r["verdict"]


class _EmptyCohortHole(modes.CentralDP):
    """The hole fixed in central mode, put back: a round whose sum is zero (no client in the cohort)
    keeps the global adapter, un-noised."""

    def finalize_sum(self, total, global_, key, expected_cohort, *args, **kwargs):
        empty = jnp.all(jnp.stack([jnp.all(x == 0) for x in jax.tree.leaves(total)]))
        noisy = super().finalize_sum(total, global_, key, expected_cohort, *args, **kwargs)
        return jax.tree.map(lambda n, g: jnp.where(empty, g, n), noisy, global_)


@pytest.mark.slow
def test_empty_cohort_hole_is_caught():
    cfg = _cfg(SAMPLED_CENTRAL)
    holed = _EmptyCohortHole(cfg, audit.adapter_shapes(cfg), None)
    r = audit.audit(cfg, TRIALS, compositions=1, mechanism=holed, confidence=CONFIDENCE)
    honest = _run("central_z2_q0.5")  # the same game on the real mechanism
    assert r["epsilon_accountant"] == pytest.approx(honest["epsilon_accountant"])
    assert honest["epsilon_lower"] <= honest["epsilon_accountant"]
    # an un-noised round happens only without the canary; any noisy round without it is impossible, so
    # the attack's TPR at FPR 0.001 approaches q P(N(mu, 1) > 0): well above 0.001 * e^epsilon_accountant
    assert r["tpr_at_fpr"]["0.001"] > 0.2
    assert r["epsilon_lower"] > r["epsilon_accountant"], r
    assert not r["consistent"] and r["verdict"].startswith("VIOLATION")


def test_gdp_bound_covers_known_mu():
    """The mu lower limit (noncentral t) of Gaussian scores with a known separation lies below it,
    and within a few standard errors."""
    rng = np.random.default_rng(0)
    mu, n = 1.5, 3000
    out = audit.gdp_bound(rng.normal(mu, 1, n), rng.normal(0, 1, n), 1e-5, 0.975)
    se = math.sqrt(2 / n + mu**2 / (4 * n))
    assert mu - 5 * se < out["mu_lower"] < mu
    assert out["epsilon"] == pytest.approx(dpa.get_epsilon_gaussian(1 / out["mu_lower"], 1e-5))
    # a Gaussian mixture (a sampled game) fails the normality test
    mix = np.where(rng.random(n) < 0.5, rng.normal(4, 1, n), rng.normal(0, 1, n))
    assert stats.normaltest(mix).pvalue < audit.NORMALITY_ALPHA
    r = audit.bounds(mix, rng.normal(0, 1, n), 1e-5, 0.95, gaussian=True)
    assert r["epsilon_lower_gdp"] is None and not r["gdp"]["applicable"]


# ----------------------------------------------------------------------------- CLI


def _one_sentence(err: str) -> str:
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.slow
def test_cli_audit_json(capsys):
    overrides = CASES["local_z2"][0]
    args = [
        "audit",
        "tiny",
        *sum((["--set", o] for o in BASE + overrides), []),
        "--trials",
        "1000",
        "--compositions",
        "1",
        "--confidence",
        str(CONFIDENCE),
        "--json",
    ]
    assert cli.main(args) == 0
    r = json.loads(capsys.readouterr().out)
    for k in (
        "mode",
        "trials",
        "epsilon_lower",
        "epsilon_lower_distribution_free",
        "epsilon_lower_gdp",
        "epsilon_accountant",
        "epsilon_paper",
        "delta",
        "confidence",
    ):
        assert k in r
    assert r["mode"] == "local" and r["trials"] == 1000 and r["confidence"] == CONFIDENCE and r["delta"] == 1e-5
    assert r["epsilon_lower"] <= r["epsilon_accountant"]
    assert r["epsilon_paper"] == pytest.approx(acc.paper_epsilon(2.0, 1e-5, 1)[0])


@pytest.mark.parametrize(
    "args, words",
    [
        (["audit", "tiny", "--set", "dp.mode=local", "--trials", "50"], ["--trials", "100", "50"]),
        (["audit", "tiny"], ["dp.mode", "'none'", "nothing to audit"]),
        (["audit", "tiny", "--set", "dp.mode=shuffle"], ["dp.mode", "'shuffle'", "local, central, dpsgd"]),
    ],
)
def test_cli_audit_bad_input(args, words, capsys):
    assert cli.main(args) == 2
    line = _one_sentence(capsys.readouterr().err)
    assert line.startswith("fedlora-jax audit: error:")
    for w in words:
        assert w in line, line
