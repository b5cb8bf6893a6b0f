"""Privacy: clipping bounds, noise scale and independence, the noise analysis, accounting."""

import json
import math

import dp_accounting as dpa
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dp_accounting import pld
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from fedlora_jax import cli
from fedlora_jax.privacy import accounting as acc
from fedlora_jax.privacy.mechanisms import analysis
from fedlora_jax.privacy.mechanisms import primitives as mech


def _tree(key, layers=3, r=4, d_in=6, d_out=5, scale=1.0):
    ks = jax.random.split(key, 4)
    return {
        "q": {
            "lora_a": scale * jax.random.normal(ks[0], (layers, r, d_in)),
            "lora_b": scale * jax.random.normal(ks[1], (layers, d_out, r)),
        },
        "v": {
            "lora_a": scale * jax.random.normal(ks[2], (layers, r, d_in)),
            "lora_b": scale * jax.random.normal(ks[3], (layers, d_out + 2, r)),
        },
    }


@settings(max_examples=12, deadline=None)
@given(
    layers=st.integers(1, 3),
    r=st.integers(1, 5),
    d=st.integers(1, 7),
    log_scale=st.floats(-4, 4),
    clip_a=st.floats(1e-3, 10),
    clip_b=st.floats(1e-3, 10),
    scope=st.sampled_from(mech.SCOPES),
)
def test_clipped_norms_never_exceed_bounds(layers, r, d, log_scale, clip_a, clip_b, scope):
    tree = _tree(jax.random.key(layers * 31 + r), layers, r, d, d + 1, 10.0**log_scale)
    out, _ = mech.clip(tree, clip_a, clip_b, scope)
    tol = 1 + 1e-5
    a = [x for p, x in jax.tree_util.tree_flatten_with_path(out)[0] if p[-1].key == "lora_a"]
    b = [x for p, x in jax.tree_util.tree_flatten_with_path(out)[0] if p[-1].key == "lora_b"]
    if scope == "per_matrix":
        for x in a:
            assert np.all(np.linalg.norm(np.asarray(x).reshape(layers, -1), axis=1) <= clip_a * tol)
        for x in b:
            assert np.all(np.linalg.norm(np.asarray(x).reshape(layers, -1), axis=1) <= clip_b * tol)
    elif scope == "per_factor":
        assert math.sqrt(sum(float(jnp.sum(x * x)) for x in a)) <= clip_a * tol
        assert math.sqrt(sum(float(jnp.sum(x * x)) for x in b)) <= clip_b * tol
    else:
        assert math.sqrt(sum(float(jnp.sum(x * x)) for x in a + b)) <= clip_a * tol


def test_clip_leaves_small_trees_untouched_and_scales_large_ones_exactly():
    tree = _tree(jax.random.key(0))
    out, norms = mech.clip(tree, 1e6, 1e6, "per_matrix")
    assert jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.all(x == y)), out, tree))
    out, _ = mech.clip(tree, 0.5, 0.5, "global")
    total = math.sqrt(sum(float(jnp.sum(x * x)) for x in jax.tree.leaves(tree)))
    # global clipping is one scalar rescaling of the whole vector
    np.testing.assert_allclose(out["q"]["lora_a"], tree["q"]["lora_a"] * 0.5 / total, rtol=1e-5)


def test_infinite_clip_and_zero_noise_is_identity():
    tree = _tree(jax.random.key(1))
    glob = _tree(jax.random.key(2))
    for target in mech.TARGETS:
        out = mech.privatize(
            tree, glob, jax.random.key(3), clip_a=math.inf, clip_b=math.inf, sigma_a=0.0, sigma_b=0.0, target=target
        )
        for x, y in zip(jax.tree.leaves(out), jax.tree.leaves(tree)):
            np.testing.assert_allclose(x, y, atol=1e-6)


def test_noise_scale_ks_accepts_true_sigma_and_rejects_wrong_ones():
    zeros = {"m": {"lora_a": jnp.zeros((1, 50, 100)), "lora_b": jnp.zeros((1, 100, 50))}}
    s_a, s_b = 0.3, 0.7
    out = mech.add_noise(zeros, jax.random.key(0), s_a, s_b)
    for x, s in ((out["m"]["lora_a"], s_a), (out["m"]["lora_b"], s_b)):
        x = np.asarray(x).ravel()  # 5,000 draws each
        assert stats.kstest(x, "norm", args=(0, s)).pvalue > 1e-3
        assert stats.kstest(x, "norm", args=(0, s * 2 / 3)).pvalue < 1e-6
        assert stats.kstest(x, "norm", args=(0, s * 3 / 2)).pvalue < 1e-6


def test_noise_of_clients_and_rounds_is_uncorrelated_and_keys_unique():
    zeros = {"m": {"lora_a": jnp.zeros((2, 8, 64)), "lora_b": jnp.zeros((2, 64, 8))}}
    draws = []
    for rnd in range(3):
        round_key = jax.random.fold_in(jax.random.key(7), rnd)
        noisy = jax.vmap(lambda cid: mech.add_noise(zeros, mech.client_key(round_key, cid), 1.0, 1.0))(jnp.arange(6))
        flat = np.concatenate([np.asarray(x).reshape(6, -1) for x in jax.tree.leaves(noisy)], axis=1)
        draws.append(flat)
    x = np.concatenate(draws)  # 18 (round, client) releases x 2048 entries
    corr = np.corrcoef(x)
    off = corr[~np.eye(len(x), dtype=bool)]
    # independent: each correlation ~ N(0, 1/n); 306 of them stay within 5/sqrt(n)
    assert np.abs(off).max() < 5 / math.sqrt(x.shape[1])
    assert len({row.tobytes() for row in x}) == len(x)
    # within a release, the A and B leaves use different keys too
    a, b = np.asarray(noisy["m"]["lora_a"][0]).ravel(), np.asarray(noisy["m"]["lora_b"][0]).ravel()
    assert abs(np.corrcoef(a, np.sort(b))[0, 1]) < 1 and not np.allclose(np.sort(a), np.sort(b))


def test_noise_analysis_unbiased_and_exact_variance_monte_carlo():
    key = jax.random.key(0)
    m, r, n = 7, 3, 11  # m != n, so the paper's swapped form would be wrong
    b = jax.random.normal(jax.random.fold_in(key, 1), (m, r))
    a = jax.random.normal(jax.random.fold_in(key, 2), (r, n))
    s_a, s_b = 0.4, 0.9
    mc = analysis.monte_carlo(b, a, s_a, s_b, jax.random.fold_in(key, 3), samples=20000)
    # unbiased: every entry's mean difference within 4.5 standard errors (77 entries)
    assert np.all(np.abs(np.asarray(mc["mean_d"])) < 4.5 * np.asarray(mc["se_d"]))
    exact = analysis.exact_variance_terms(b, a, s_a, s_b)["Total_Var"]
    assert abs(float(mc["total_var"]) - exact) < 4 * float(mc["total_var_se"])
    swapped = m * s_a**2 * float(jnp.sum(b * b)) + n * s_b**2 * float(jnp.sum(a * a)) + m * n * r * s_a**2 * s_b**2
    assert abs(float(mc["total_var"]) - swapped) > 4 * float(mc["total_var_se"])


def test_round_stats_csv_has_the_paper_columns(tmp_path):
    tree = _tree(jax.random.key(0), layers=2)
    rows = analysis.round_stats(tree, 0.1, 0.2, jax.random.key(1), "round_1_client_0", samples=50)
    assert len(rows) == 4  # 2 modules x 2 layers
    analysis.write_stats_csv(tmp_path / "s.csv", rows)
    header = (tmp_path / "s.csv").read_text().splitlines()[0].split(",")
    assert header == analysis.STATS_COLUMNS


# ----------------------------------------------------------------------------- accounting


def test_composition_of_gaussians_equals_one_gaussian_with_sigma_over_sqrt_t():
    z, t, delta = 3.0, 25, 1e-5
    closed = acc.gaussian_epsilon(z, t, delta)
    assert closed == pytest.approx(dpa.get_epsilon_gaussian(z / 5.0, delta))
    ref = pld.PLDAccountant(value_discretization_interval=1e-4)
    ref.compose(dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(z), t))
    assert closed == pytest.approx(ref.get_epsilon(delta), rel=1e-2)  # PLD is a pessimistic discretisation
    assert acc.gaussian_epsilon_rdp(z, t, delta) >= closed


def test_design_figure_classical_sigma_at_epsilon_25_is_really_about_34_6():
    z = mech.classical_noise_multiplier(25.0, 1e-5)
    per_release, tracker = acc.paper_epsilon(z, 1e-5, 4)
    assert per_release == pytest.approx(25.0) and tracker == pytest.approx(50.0)  # sqrt(4) releases
    assert acc.gaussian_epsilon(z, 1, 1e-5) == pytest.approx(34.6, abs=0.1)


def test_effective_multiplier_folds_tensors_and_relation():
    tree = _tree(jax.random.key(0), layers=3)
    n_a, n_b, ca, cb = mech.clip_blocks(tree, "per_matrix", 0.1, 0.1)
    assert (n_a, n_b) == (6, 6)
    z = mech.effective_noise_multiplier(n_a, n_b, ca, cb, 0.5, 0.5, "add-remove")
    assert z == pytest.approx(5.0 / math.sqrt(12))
    assert mech.effective_noise_multiplier(n_a, n_b, ca, cb, 0.5, 0.5, "replace-one") == pytest.approx(z / 2)


def test_central_epsilon_equals_direct_dp_accounting():
    z, q, rounds, delta = 1.1, 0.05, 300, 1e-6
    eps_pld, eps_rdp = acc.sampled_epsilon(z, q, rounds, delta)
    event = dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), rounds)
    ref = pld.PLDAccountant(value_discretization_interval=acc.PLD_DISCRETIZATION)
    ref.compose(event)
    assert eps_pld == pytest.approx(ref.get_epsilon(delta), rel=1e-9)
    r = dpa.rdp.RdpAccountant()
    r.compose(event)
    assert eps_rdp == pytest.approx(r.get_epsilon(delta), rel=1e-9)


@pytest.mark.parametrize("mode", ["local", "central", "dpsgd"])
def test_calibration_meets_target(mode):
    kw = dict(delta=1e-5, rounds=50, clients=10, clients_per_round=2, tensors=8, local_steps=4, batch_sampling_rate=0.1)
    out = acc.report(mode, target_epsilon=4.0, **kw)
    check = acc.report(mode, noise_multiplier=out["noise_multiplier"], **kw)
    assert check["epsilon_pld"] == pytest.approx(4.0, rel=2e-3)


def test_ledger_tracks_worst_client_and_budget():
    ledger = acc.Ledger("local", num_clients=5, z_eff=2.0, delta=1e-5)
    for ids in ([0, 1], [0, 2], [0, 3]):
        ledger.record(ids)
    assert list(ledger.participations) == [3, 1, 1, 1, 0]
    assert ledger.worst() == pytest.approx(acc.gaussian_epsilon(2.0, 3, 1e-5))
    assert ledger.worst_after([0, 4]) == pytest.approx(acc.gaussian_epsilon(2.0, 4, 1e-5))
    eps = ledger.epsilons()
    assert ledger.mean() == pytest.approx(float(np.mean(eps))) and eps[4] == 0.0
    state = ledger.state_dict()
    other = acc.Ledger("local", num_clients=5, z_eff=2.0, delta=1e-5)
    other.load_state_dict(json.loads(json.dumps(state)))
    assert other.worst() == ledger.worst()


def test_privacy_cli_json(capsys):
    assert (
        cli.main(
            [
                "privacy",
                "--noise-multiplier",
                "0.5",
                "--rounds",
                "100",
                "--clients",
                "20",
                "--clients-per-round",
                "2",
                "--tensors",
                "4",
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    # the worst client of the seeded schedule (seed 0), not the average 100 x 2 / 20 = 10
    from fedlora_jax.federated import sampling

    worst = int(sampling.participation_counts(0, 20, 2, "uniform", 100).max())
    assert out["participations"] == worst > 10 and out["neighbouring"] == "replace-one"
    # 4 tensors at sigma/C 0.5, replace-one: one Gaussian of multiplier 0.5 / (2 sqrt 4), `worst` times
    assert out["epsilon_pld"] == pytest.approx(acc.gaussian_epsilon(0.125, worst, 1e-5))
    assert out["epsilon_paper"] == pytest.approx(math.sqrt(2 * math.log(1.25e5)) / 0.5)
    assert {"epsilon_rdp", "noise_multiplier", "delta"} <= set(out)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--noise-multiplier", "1", "--delta", "1.5"], "delta must be in (0, 1)"),
        (["--noise-multiplier", "1", "--delta", "0"], "delta must be in (0, 1)"),
        (["--sigma", "1", "--clip", "0"], "--clip C > 0"),
        (["--sigma", "-1", "--clip", "1"], "--sigma must be >= 0"),
        (["--noise-multiplier", "-1"], "noise multiplier must be >= 0"),
        (["--target-epsilon", "0"], "target epsilon must be > 0"),
        (["--target-epsilon", "-2"], "target epsilon must be > 0"),
        (["--mode", "central", "--noise-multiplier", "1"], "needs a client sampling rate"),
        (["--noise-multiplier", "1", "--clients", "3", "--clients-per-round", "5"], "clients per round must be in"),
    ],
)
def test_privacy_cli_bad_input(argv, message, capsys):
    assert cli.main(["privacy", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.strip().count("\n") == 0


def test_classical_formula_rejects_bad_epsilon_and_warns_once():
    with pytest.raises(ValueError, match="epsilon must be > 0"):
        mech.classical_noise_multiplier(0.0, 1e-5)
    mech._WARNED.clear()
    with pytest.warns(UserWarning, match="not a valid privacy bound"):
        mech.classical_noise_multiplier(25.0, 1e-5)
