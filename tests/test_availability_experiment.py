"""The availability experiment (experiments/availability.py) end to end at smoke scale, and every run of
its cpu and paper grids built before any run."""

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OUTPUTS = ["availability.csv", "availability.md", "availability.png"]
MECHANISMS = {"none", "central_claimed", "central_honest", "bandmf"}


@pytest.mark.slow
def test_availability_runs_at_smoke_scale(tmp_path):
    from fedlora_jax.experiments.availability import runs_of
    from fedlora_jax.privacy.accounting.gaussian import gaussian_epsilon

    out = tmp_path / "availability" / "smoke"
    r = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "availability.py"), "--scale", "smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    for f in OUTPUTS:
        assert (out / f).stat().st_size > 0, f
    rows = list(csv.DictReader((out / "availability.csv").open()))
    grid = runs_of("smoke")
    assert len(rows) == len(grid) == len(list((out / "runs").iterdir()))  # one row per run
    assert {row["mechanism"] for row in rows} == MECHANISMS
    by = {row["mechanism"]: row for row in rows}
    target = float(by["central_claimed"]["epsilon"])
    # the claimed multiplier is what amplification by sampling calls the target; without it the run's
    # honest epsilon is larger
    claimed, honest = float(by["central_claimed"]["epsilon_claimed"]), float(by["central_claimed"]["epsilon_honest"])
    assert claimed == pytest.approx(target, rel=1e-3)
    assert honest > claimed
    # BandMF is calibrated for the most participations cyclic groups allow (ceil(rounds / groups)), which
    # a client available at its group's turn reaches: it ends at the target
    band = by["bandmf"]
    assert float(band["epsilon_honest"]) == pytest.approx(target, rel=1e-6)
    groups = math.ceil(int(band["N"]) / int(band["K"]))
    assert int(band["max_participations"]) == math.ceil(int(band["rounds"]) / groups)
    assert int(band["band"]) == min(4, groups, int(band["rounds"]))
    # central DP under diurnal availability is calibrated for a client picked in EVERY round (the secret
    # draw is not known ahead) and charged for the rounds its worst client really took part in: it ends at
    # the target only when that client took part in every round, below it otherwise
    ch = by["central_honest"]
    worst = int(ch["max_participations"])
    assert float(ch["epsilon_honest"]) <= target * (1 + 1e-6)
    assert float(ch["epsilon_honest"]) == pytest.approx(
        gaussian_epsilon(float(ch["noise_multiplier"]), worst, float(ch["delta"])), rel=1e-6
    )
    if worst == int(ch["rounds"]):
        assert float(ch["epsilon_honest"]) == pytest.approx(target, rel=1e-6)
    # the honest multipliers are larger than the claimed one (no amplification)
    assert float(ch["noise_multiplier"]) > float(by["central_claimed"]["noise_multiplier"])
    assert float(band["noise_multiplier"]) > float(by["central_claimed"]["noise_multiplier"])
    for row in rows:
        assert math.isfinite(float(row["eval_loss"])), row
        if row["mechanism"] != "none":
            assert float(row["delta"]) == pytest.approx(1e-5)


@pytest.mark.parametrize("scale", ["cpu", "paper"])
def test_every_run_of_every_scale_has_a_valid_config(scale, tmp_path, monkeypatch):
    """All configs (and mechanisms: calibration too) are built before the first run: stop at that run."""
    from fedlora_jax import experiments
    from fedlora_jax.runs import runner

    class Reached(Exception):
        pass

    def first_run(cfg, *a, **kw):
        raise Reached(cfg)

    monkeypatch.setattr(runner, "run", first_run)
    with pytest.raises(Reached) as reached:
        experiments.main("availability", ["--scale", scale, "--out", str(tmp_path / "out")])
    cfg = reached.value.args[0]
    assert cfg.fl.availability == "diurnal" and cfg.fl.clients_per_round == 100


def test_overrides_that_would_mislabel_the_table_are_refused_before_any_run(tmp_path, monkeypatch):
    from fedlora_jax import experiments
    from fedlora_jax.core.errors import UserError
    from fedlora_jax.runs import runner

    def no_run(*a, **kw):
        raise AssertionError("a run started")

    monkeypatch.setattr(runner, "run", no_run)
    for override in ("fl.availability=always", "dp.band=2", "fl.sampling=uniform"):
        with pytest.raises(UserError, match="is a coordinate of this experiment's grid"):
            experiments.availability("smoke", tmp_path / "out", [override], cache=False)
    assert not (tmp_path / "out" / "runs").exists()


def test_figure_of_runs_without_dp_only_has_one_panel(tmp_path):
    from fedlora_jax.experiments.availability import plot_availability

    grid = {"N40_nodp": ({"N": 40, "K": 4, "epsilon": None, "mechanism": "none"}, [])}
    rows = [{"N": 40, "K": 4, "epsilon": None, "mechanism": "none", "eval_loss": 7.0}]
    path = plot_availability(rows, {"N40_nodp": [(0, 8.0), (1, 7.0)]}, grid, tmp_path / "a.png")
    assert path.exists() and path.stat().st_size > 1000
