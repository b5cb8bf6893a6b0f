"""Populations that come and go, and DP without the sampling assumption (issue 30):

- cyclic sampling: a client takes part at most once every b = ceil(N/K) rounds, and its group does
  not depend on the other clients (add-remove);
- availability: diurnal clients are picked only inside their window; dropouts are charged;
- BandMF (dp.mode bandmf): the streamed noise has the covariance of C^-1 C^-T (Monte Carlo); band 1
  is DP-FedAvg without amplification bit for bit (same keys); the printed epsilon equals an
  independent computation from jax-privacy's sensitivity and dp-accounting; bad settings are one
  sentence."""

from __future__ import annotations

import json
import math

import dp_accounting as dpa
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedlora_jax.config import load_config
from fedlora_jax.core.errors import UserError
from fedlora_jax.federated import sampling
from fedlora_jax.privacy import mechanisms as modes
from fedlora_jax.privacy.audit import canary
from fedlora_jax.runs.runner import run

SMALL = [
    "fl.num_clients=8",
    "fl.clients_per_round=2",
    "fl.local_steps=1",
    "fl.batch_size=4",
    "data.synthetic_examples=64",
]
BAND = ["dp.mode=bandmf", "fl.sampling=cyclic", "dp.scope=global", "dp.noise=multiplier", "dp.noise_multiplier=1.5"]


@pytest.mark.parametrize("n, k", [(20, 5), (103, 10), (1000, 7)])
def test_cyclic_participation_never_repeats_a_client_within_b_rounds(n, k):
    b = math.ceil(n / k)
    last = np.full(n, -(10**9))
    counts = np.zeros(n, np.int64)
    for r in range(3 * b + 2):
        ids, valid = sampling.sample_round(9, n, k, "cyclic", r)
        taken = ids[valid]
        assert len(set(taken.tolist())) == len(taken)
        assert np.all(r - last[taken] >= b), (r, taken[r - last[taken] < b])
        last[taken] = r
        counts[taken] += 1
    assert counts.max() <= math.ceil((3 * b + 2) / b) and counts.min() >= 3  # everyone, once per cycle


def test_a_cyclic_group_does_not_depend_on_the_other_clients():
    """Adding client N (the last id) moves nobody else: add-remove neighbours see the same groups."""
    a = sampling.cyclic_groups(4, 40, 10)
    b = sampling.cyclic_groups(4, 41, 10)  # b = ceil(41/10) = 5 groups: not comparable; same b below
    c = sampling.cyclic_groups(4, 39, 10)
    assert len(a) == len(c) == 4 and len(b) == 5
    for g_a, g_c in zip(a, c):
        assert set(g_c.tolist()) == set(g_a.tolist()) - {39}


def test_diurnal_clients_are_picked_only_inside_their_window_and_the_draw_is_seeded():
    cfg = load_config(
        "tiny",
        [
            "fl.num_clients=200",
            "fl.clients_per_round=20",
            "fl.availability=diurnal",
            "fl.availability_period=10",
            "fl.availability_window=0.3",
            "fl.sampling=uniform",
        ],
    )
    fl = cfg.fl
    shares = []
    for r in range(20):
        avail = sampling.available(cfg.seed, fl.num_clients, r, fl.availability_period, fl.availability_window)
        ids, valid = sampling.for_config(cfg, r)
        assert avail[ids[valid]].all()
        shares.append(avail.mean())
    # mean width 0.3 x 10 rounds, each client a window U(0.5, 1.5) x 3 rounded: about 30% available
    assert 0.2 < np.mean(shares) < 0.4
    assert np.array_equal(sampling.for_config(cfg, 3)[0], sampling.for_config(cfg, 3)[0])
    # a client's window is its own draws: a larger population leaves everyone else's where it was
    a, b = sampling._diurnal(7, 200, 10, 0.3), sampling._diurnal(7, 201, 10, 0.3)
    assert np.array_equal(a[0], b[0][:200]) and np.array_equal(a[1], b[1][:200])


def test_dropouts_still_count_as_picked_for_privacy(tmp_path):
    cfg = load_config(
        "tiny",
        SMALL
        + [
            "fl.rounds=6",
            "fl.availability=dropout",
            "fl.dropout=0.5",
            "dp.mode=local",
            "dp.noise=multiplier",
            "dp.noise_multiplier=2.0",
        ],
    )
    came = picked = 0
    for r in range(6):
        ids, valid = sampling.for_config(cfg, r)
        rep = sampling.reports_for(cfg, ids, valid, r, cfg.seed)
        assert not (rep & ~valid).any()
        came, picked = came + rep.sum(), picked + valid.sum()
    assert 0 < came < picked  # some dropped out at p = 0.5
    summary = run(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["clients"] for r in rows) == came  # the rounds saw only those who reported
    counts = sampling.config_counts(cfg)  # picked: the ledger charges every picked client
    assert summary["privacy"]["max_participations"] == counts.max()


def test_dropout_by_size_drops_small_clients_more_often_and_ignores_the_others_data():
    ids = np.arange(1000)
    sizes = np.where(ids < 500, 10, 1000)
    rep = np.mean([sampling.reports(1, ids, np.ones(1000, bool), r, 0.2, sizes, 40) for r in range(50)], axis=0)
    p_small, p_big = 1 - rep[:500].mean(), 1 - rep[500:].mean()
    assert p_small == pytest.approx(min(1, 0.2 * 40 / 10), abs=0.02)  # p x reference / size, capped at 1
    assert p_big == pytest.approx(0.2 * 40 / 1000, abs=0.01)
    # a client's report depends on its own size only: changing another client's data changes nothing
    other = sizes.copy()
    other[0] = 10_000
    a = sampling.reports(3, ids, np.ones(1000, bool), 5, 0.2, sizes, 40)
    b = sampling.reports(3, ids, np.ones(1000, bool), 5, 0.2, other, 40)
    assert np.array_equal(a[1:], b[1:])


def test_plan_and_progress_bar_show_the_realised_cohorts():
    from fedlora_jax.federated.plan import plan
    from fedlora_jax.runs import reporting

    base = ["fl.num_clients=1000", "fl.clients_per_round=100", "fl.rounds=40", "fl.sampling=poisson"]
    diurnal = plan(load_config("tiny", base + ["fl.availability=diurnal", "fl.availability_window=0.4"]))["cohorts"]
    share = diurnal["available_share"]["mean"]
    # Poisson at q = 0.1 among the available: mean picked = 0.1 x available, within 4 s.e. of a binomial mean
    assert diurnal["picked"]["mean"] == pytest.approx(100 * share, abs=4 * math.sqrt(100 * share * 0.9 / 40))
    assert 0.25 < share < 0.55
    drop = plan(load_config("tiny", base + ["fl.availability=dropout", "fl.dropout=0.3"]))["cohorts"]
    assert drop["reporting"]["mean"] == pytest.approx(0.7 * drop["picked"]["mean"], rel=0.05)
    assert drop["available_share"]["mean"] == 1.0
    assert reporting.postfix({"clients": 7}, [])["cohort"] == 7
    assert reporting.postfix({"unprotected_clients": 7}, [])["cohort(unprotected)"] == 7
    assert "cohort" not in reporting.postfix({"epsilon": 1.0}, [])


def _mech(extra):
    cfg = load_config("tiny", SMALL + BAND + extra)
    return modes.build(cfg, canary.adapter_shapes(cfg)), cfg


def test_streamed_noise_has_the_covariance_of_the_inverse_strategy():
    """Per coordinate, the noise over rounds is C^-1 w with w iid N(0, 1): covariance C^-1 C^-T.
    Monte Carlo over 4,000 coordinates; tolerance 5 standard errors of a covariance entry."""
    mech, cfg = _mech(["fl.rounds=6", "dp.band=3", "fl.num_clients=12", "fl.clients_per_round=3"])
    d = 4000
    tree = {"x": jnp.zeros((d,), jnp.float32)}
    state = mech.inverse.init_multiply(tree)
    outs = []
    for t in range(6):
        w = {"x": jax.random.normal(jax.random.fold_in(jax.random.key(0), t), (d,))}
        e, state = mech.inverse.multiply_next(w, state)
        outs.append(np.asarray(e["x"], np.float64))
    emp = np.cov(np.stack(outs), bias=True)
    with jax.numpy_rank_promotion("allow"):  # jax-privacy's materialize broadcasts by rank
        c = np.asarray(mech.strategy.materialize(), np.float64)
    want = np.linalg.inv(c) @ np.linalg.inv(c).T
    se = np.sqrt((want**2 + np.outer(np.diag(want), np.diag(want))) / d)
    assert np.all(np.abs(emp - want) < 5 * se + 1e-6), (emp, want)
    assert np.abs(np.tril(c, -3)).max() == 0 and np.allclose(np.linalg.norm(c, axis=0), 1, atol=1e-5)
    assert not np.allclose(want, np.eye(6), atol=0.05)  # the noise IS correlated across rounds


def test_band_one_is_dp_fedavg_without_amplification_bit_for_bit(tmp_path):
    common = SMALL + [
        "fl.rounds=4",
        "fl.sampling=cyclic",
        "dp.scope=global",
        "dp.noise=multiplier",
        "dp.noise_multiplier=1.5",
        "dp.noise_seed=77",
    ]
    a = run(load_config("tiny", common + ["dp.mode=bandmf", "dp.band=1"]), tmp_path / "a", progress=False)
    b = run(load_config("tiny", common + ["dp.mode=central"]), tmp_path / "b", progress=False)
    wa = (tmp_path / "a" / "adapter" / "adapter_model.safetensors").read_bytes()
    wb = (tmp_path / "b" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert wa == wb
    assert a["privacy"]["epsilon"] == pytest.approx(b["privacy"]["epsilon"], rel=1e-12)
    assert "NO amplification" in b["privacy"]["mechanism"]


def test_a_resume_continues_with_the_checkpointed_strategy(tmp_path, monkeypatch):
    """The strategy's parameters travel in the checkpointed state: a resume whose re-optimization gave
    another C (another jax-privacy, another machine) still continues the run's own noise exactly."""
    from jax_privacy.matrix_factorization import banded

    from fedlora_jax.privacy.mechanisms import bandmf

    cfg = load_config("tiny", SMALL + BAND + ["fl.rounds=6", "dp.band=2", "dp.noise_seed=5", "checkpoint_every=1"])
    run(cfg, tmp_path / "full", progress=False)
    run(cfg, tmp_path / "part", progress=False, stop_after=3)
    other = banded.ColumnNormalizedBanded.default(6, 2)
    assert not np.allclose(np.asarray(other.params), np.asarray(bandmf.strategy(6, 2).params))
    monkeypatch.setattr(bandmf, "strategy", lambda rounds, band: other)
    run(cfg, tmp_path / "part", resume=True, progress=False)
    weights = "adapter/adapter_model.safetensors"
    assert (tmp_path / "part" / weights).read_bytes() == (tmp_path / "full" / weights).read_bytes()


@pytest.mark.parametrize(
    "rounds, band, clients, k, z, neighbouring",
    [(12, 2, 12, 3, 1.2, None), (30, 4, 40, 8, 2.5, None), (20, 3, 9, 3, 3.0, "replace-one")],
)
def test_epsilon_equals_jax_privacy_sensitivity_and_dp_accounting(rounds, band, clients, k, z, neighbouring):
    from jax_privacy.matrix_factorization import banded

    extra = [
        f"fl.rounds={rounds}",
        f"dp.band={band}",
        f"fl.num_clients={clients}",
        f"fl.clients_per_round={k}",
        f"dp.noise_multiplier={z}",
    ] + ([f"dp.neighbouring={neighbouring}"] if neighbouring else [])
    mech, cfg = _mech(extra)
    min_sep = math.ceil(clients / k)
    sens = math.sqrt(banded.minsep_sensitivity_squared(banded.optimize(rounds, bands=band), min_sep=min_sep))
    factor = 2.0 if neighbouring == "replace-one" else 1.0
    want = dpa.get_epsilon_gaussian(z / (sens * factor), cfg.dp.delta)  # one Gaussian, sensitivity sens x clip
    worst = np.zeros(clients, np.int64)
    worst[0] = math.ceil(rounds / min_sep)  # the most participations a client can have
    assert mech.ledger.epsilons(worst).max() == pytest.approx(want, rel=1e-9)
    pld = dpa.pld.PLDAccountant(
        dpa.NeighboringRelation.REPLACE_ONE if neighbouring else dpa.NeighboringRelation.ADD_OR_REMOVE_ONE
    )
    pld.compose(dpa.GaussianDpEvent(z / sens))
    assert mech.ledger.epsilons(worst).max() == pytest.approx(pld.get_epsilon(cfg.dp.delta), rel=2e-3)


def test_the_privacy_calculator_gives_the_runs_epsilon_for_bandmf(capsys):
    from fedlora_jax import cli
    from fedlora_jax.privacy.accounting import report

    mech, cfg = _mech(["fl.rounds=12", "dp.band=2", "fl.num_clients=12", "fl.clients_per_round=3"])
    r = report("bandmf", delta=cfg.dp.delta, noise_multiplier=1.5, rounds=12, clients=12, clients_per_round=3)
    k = math.ceil(12 / math.ceil(12 / 3))
    assert r["participations"] == k
    assert r["epsilon_pld"] == pytest.approx(mech.ledger.epsilons(np.array([k]))[0], rel=1e-12)
    assert cli.main(["privacy", "--mode", "bandmf", "--noise-multiplier", "1.5", "--rounds", "12"]) == 2
    assert "needs clients and clients per round" in capsys.readouterr().err


def test_calibrated_bandmf_ends_at_the_target_epsilon(tmp_path):
    cfg = load_config("tiny", SMALL + BAND + ["fl.rounds=8", "dp.band=2", "dp.noise=calibrate", "dp.epsilon=4"])
    summary = run(cfg, tmp_path / "run", progress=False)
    assert summary["privacy"]["epsilon"] == pytest.approx(4.0, rel=1e-6)
    assert summary["privacy"]["band"] == 2 and summary["privacy"]["sensitivity_squared"] == 2


def test_adaptive_clipping_composes_with_bandmf(tmp_path):
    """The clip moves with the noisy quantile estimate; the run ends at the calibrated epsilon (the
    update's and the count's noise split z^-2 = z_u^-2 + (2 sigma_count)^-2, central DP's); the
    correlated noise state and the clip both survive in the mechanism's state."""
    cfg = load_config(
        "tiny",
        SMALL
        + BAND
        + [
            "fl.rounds=8",
            "dp.band=2",
            "dp.noise=calibrate",
            "dp.epsilon=6",
            "dp.adaptive_clip=true",
            "dp.clip_count_noise=2",
            "dp.clip_a=0.05",
            "dp.target_quantile=0.9",
        ],
    )
    summary = run(cfg, tmp_path / "run", progress=False)
    p = summary["privacy"]
    assert p["epsilon"] == pytest.approx(6.0, rel=1e-6)
    z, zu, sc = p["noise_multiplier"], p["update_noise_multiplier"], p["clip_count_noise"]
    assert zu**-2 + (2 * sc) ** -2 == pytest.approx(z**-2, rel=1e-9)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    clips = [r["clip"] for r in rows]
    assert len(set(clips)) > 1 and all(c > 0 for c in clips)


@pytest.mark.parametrize(
    "extra, says",
    [
        (["fl.sampling=poisson"], "needs fl.sampling cyclic"),
        (["dp.band=5"], "dp.band = 5 is more than the 4 cyclic groups"),
        (["dp.band=0"], "dp.band must be an integer >= 1"),
        (["dp.adaptive_clip=true", "dp.scope=per_matrix"], "dp.adaptive_clip clips each update as one vector"),
        (["fl.availability=weekly"], "fl.availability"),
        (["fl.dropout=1.0"], "fl.dropout must be in [0, 1)"),
    ],
)
def test_bad_settings_are_one_sentence(extra, says):
    with pytest.raises(UserError, match=re_escape(says)):
        _mech(["fl.rounds=8"] + extra)


def re_escape(s):
    import re

    return re.escape(s)
