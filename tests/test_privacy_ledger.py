"""The ledger covers every published bit, and the relation each epsilon is for is the one the code
runs: a divergence stop charges the round it saw; under DP the console's data line, the metrics
rows' wall-clock seconds and the card publish nothing the outside_guarantee list does not name;
replace-one under central and dpsgd is accounted as replace-one (dp-accounting's own computation);
analytic calibration over several clipped blocks meets the stated per-release epsilon (attacked
through the real round)."""

from __future__ import annotations

import json
import logging
import math

import dp_accounting as dpa
import numpy as np
import pytest
from dp_accounting.pld import pld_privacy_accountant as pld

from fedlora_jax import cli
from fedlora_jax.config.run_config import load_config
from fedlora_jax.core.errors import UserError
from fedlora_jax.privacy import mechanisms as modes
from fedlora_jax.privacy.audit import auditor as audit
from fedlora_jax.runs.runner import run

SMALL = ["fl.num_clients=4", "fl.clients_per_round=2", "fl.local_steps=1", "dp.noise=multiplier"]


def _pld_epsilon(relation, z, q, count, delta):
    """dp-accounting's PLD epsilon of count Poisson-sampled Gaussians, computed here independently."""
    acc = pld.PLDAccountant(relation, value_discretization_interval=1e-3)
    acc.compose(dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), count))
    return acc.get_epsilon(delta)


@pytest.mark.slow
def test_a_divergence_stop_charges_the_round_that_triggered_it(tmp_path):
    """The stop reason depends on round r+1's release (it was non-finite), so the ledger counts r+1
    rounds while r rows and the round-r adapter are published; the epsilon is that of r+1 rounds."""
    sets = ["dp.mode=central", "fl.sampling=poisson", "dp.scope=global", "dp.adaptive_clip=true"]
    sets += ["dp.noise=calibrate", "dp.epsilon=8", "dp.clip_count_noise=2", "dp.clip_lr=1000"]
    sets += ["fl.num_clients=40", "fl.clients_per_round=20", "fl.rounds=4", "eval_every=1"]
    cfg = load_config("tiny", sets)
    s = run(cfg, out_dir=str(tmp_path / "r"), progress=False)
    assert s["stop_reason"].startswith("diverged")
    p = s["privacy"]
    assert p["rounds_accounted"] == s["rounds"] + 1
    expected = _pld_epsilon(
        dpa.NeighboringRelation.ADD_OR_REMOVE_ONE, p["effective_noise_multiplier"], 0.5, s["rounds"] + 1, cfg.dp.delta
    )
    assert p["epsilon"] == pytest.approx(expected, rel=2e-2)
    published = (
        0.0
        if s["rounds"] == 0
        else _pld_epsilon(
            dpa.NeighboringRelation.ADD_OR_REMOVE_ONE, p["effective_noise_multiplier"], 0.5, s["rounds"], cfg.dp.delta
        )
    )
    assert p["epsilon"] > published  # more than the published rows alone would say


@pytest.mark.slow
def test_a_dp_runs_console_rows_and_card_publish_nothing_outside_the_list(tmp_path, capsys, caplog):
    """Under local DP without dp.publish_client_metrics: the console's data line carries no per-client
    count, and every wall-clock figure the run publishes is listed in outside_guarantee and the card."""
    out = tmp_path / "r"
    sets = ["dp.mode=local", "dp.noise=multiplier", "dp.noise_multiplier=1.0", "fl.rounds=2", "eval_every=1"]
    args = ["run", "tiny", "--out", str(out), "--json"] + [a for x in sets + SMALL[:3] for a in ("--set", x)]
    with caplog.at_level(logging.INFO, logger="fedlora_jax"):
        assert cli.main(args) == 0
    console = capsys.readouterr().err + caplog.text
    data_lines = [x for x in console.splitlines() if "data:" in x]
    assert data_lines and not any("per client" in x or "dropped" in x or "truncated" in x for x in data_lines)
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    outside = summary["privacy"]["outside_guarantee"]
    assert all("seconds" in r for r in rows) and any("seconds" in x and "wall_seconds" in x for x in outside)
    card = (out / "adapter" / "README.md").read_text()
    assert "Outside the guarantee: nothing" not in card
    assert all(x in card for x in outside)
    # on request the counts are shown, marked
    caplog.clear()
    out2 = tmp_path / "r2"
    args2 = ["run", "tiny", "--out", str(out2), "--set", "dp.publish_client_metrics=true"] + args[4:]
    with caplog.at_level(logging.INFO, logger="fedlora_jax"):
        assert cli.main(args2) == 0
    console = capsys.readouterr().err + caplog.text
    assert any("per client" in x and "outside the DP guarantee" in x for x in console.splitlines())


def _mech(overrides, sizes=None):
    cfg = load_config("tiny", SMALL + list(overrides))
    return modes.build(cfg, audit.adapter_shapes(cfg), sizes)


@pytest.mark.parametrize("rounds", [1, 3])
def test_central_replace_one_is_accounted_as_replace_one(rounds):
    """dp.neighbouring replace-one under central DP: the ledger's epsilon is dp-accounting's REPLACE_ONE
    PLD for the same events (a client's update moves within its clip ball: the relation, not a doubled
    sensitivity), above the add-remove figure; unset, central stays add-remove."""
    base = [
        "dp.mode=central",
        "fl.sampling=poisson",
        "dp.noise_multiplier=1.5",
        "dp.scope=global",
        f"fl.rounds={rounds}",
    ]
    m = _mech(base + ["dp.neighbouring=replace-one"])
    assert m.neighbouring == "replace-one" and m.info["neighbouring"] == "replace-one"
    eps = m.ledger.epsilons(np.zeros(1, np.int64), rounds)[0]
    ro = _pld_epsilon(dpa.NeighboringRelation.REPLACE_ONE, 1.5, 0.5, rounds, 1e-5)
    ar = _pld_epsilon(dpa.NeighboringRelation.ADD_OR_REMOVE_ONE, 1.5, 0.5, rounds, 1e-5)
    assert eps == pytest.approx(ro, rel=2e-2) and eps > ar * 1.05
    unset = _mech(base)
    assert unset.neighbouring == "add-remove"
    assert unset.ledger.epsilons(np.zeros(1, np.int64), rounds)[0] == pytest.approx(ar, rel=2e-2)


def test_dpsgd_with_public_counts_is_replace_one_and_add_remove_is_refused():
    """Public counts fix each client's record count, which adding or removing a record would change:
    the only honest relation is replace-one, accounted by dp-accounting's REPLACE_ONE."""
    sets = ["dp.mode=dpsgd", "dp.noise_multiplier=1.0", "dp.clip_a=1.0", "dp.public_counts=true", "fl.rounds=2"]
    m = _mech(sets, [16] * 4)
    assert m.neighbouring == "replace-one"
    steps = m.cfg.fl.local_steps * 2
    expected = _pld_epsilon(dpa.NeighboringRelation.REPLACE_ONE, 1.0, m.batch_rate, steps, 1e-5)
    assert m.ledger.epsilons(np.array([2]))[0] == pytest.approx(expected, rel=2e-2)
    with pytest.raises(UserError, match="dp.neighbouring replace-one"):
        _mech(sets + ["dp.neighbouring=add-remove"], [16] * 4)
    assert _mech(sets[:-2] + ["fl.rounds=2"], [16] * 4).neighbouring == "add-remove"


@pytest.mark.parametrize("relation", ["add-remove", "replace-one"])
def test_central_analytic_calibration_meets_the_per_release_epsilon_over_all_blocks(relation):
    """dp.noise analytic under central DP with L separately clipped blocks: one release (no sampling)
    of the sum has exactly dp.epsilon under the relation, over all L blocks (the sum's sensitivity is
    C sqrt(L); replace-one doubles the distance)."""
    m = _mech(
        ["dp.mode=central", "fl.sampling=poisson", "dp.noise=analytic", "dp.epsilon=2", f"dp.neighbouring={relation}"]
    )
    blocks = sum(m.blocks)
    assert blocks > 1  # per_matrix clipping of several matrices
    z_release = m.z_eff / (2.0 if relation == "replace-one" else 1.0)
    assert dpa.get_epsilon_gaussian(z_release, 1e-5) == pytest.approx(2.0, rel=1e-3)
    assert m.z == pytest.approx(m.z_eff * math.sqrt(blocks), rel=1e-9)


@pytest.mark.slow
def test_central_analytic_per_release_epsilon_holds_under_attack():
    """Attack through the real round: every client in every round (q = 1, a plain Gaussian), one
    round, analytic calibration at epsilon 2 with per-matrix clipping (several blocks). The audit's
    Gaussian-DP lower bound stays below 2 and is consistent; the calibration that ignored sqrt(L)
    put the true per-release epsilon far above 2, which this game measures."""
    sets = ["dp.mode=central", "fl.sampling=poisson", "fl.clients_per_round=4", "dp.noise=analytic", "dp.epsilon=2"]
    cfg = load_config("tiny", SMALL + sets + ["fl.rounds=1"])
    r = audit.audit(cfg, 4000, compositions=1)
    assert r["gdp"]["applicable"] and r["consistent"], r["verdict"]
    assert r["epsilon_lower_gdp"] <= 2.0 <= r["epsilon_accountant"] * 1.01
    # the game has the power to see the old calibration: its mu would be sqrt(L) times larger
    m = modes.build(cfg, audit.adapter_shapes(cfg), None)
    assert r["gdp"]["mu_hat"] * math.sqrt(sum(m.blocks)) > 2 * r["gdp"]["mu_lower"]
