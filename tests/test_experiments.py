"""The experiment scripts end to end at smoke scale, and every notebook top to bottom."""

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["eps_clip", "algorithms", "rank_variance", "model_size", "dp_modes", "aggregation", "population"]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# what each script must write (tables as CSV + markdown, figures as PNG)
OUTPUTS = {
    "eps_clip": ["eps_clip.csv", "eps_clip.md", "eps_clip.png"],
    "algorithms": ["algorithms_loss.csv", "algorithms_scores.md", "algorithms.png"],
    "rank_variance": ["rank_variance.csv", "rank_variance.md", "rank_variance.png"],
    "model_size": ["model_size.csv", "model_size.md"],
    "dp_modes": ["dp_modes.csv", "dp_modes.md", "dp_modes.png"],
    "aggregation": ["aggregation.csv", "aggregation.md", "aggregation.png"],
    "population": ["population.csv", "population.md", "population.png"],
}


# the notebook that shows each script's experiment: the script tests write where the notebook
# looks, so the notebook tests reuse those runs (and test that reuse) instead of repeating them
NOTEBOOK_OF = {
    "eps_clip": "privacy_utility",
    "algorithms": "algorithms_under_dp",
    "rank_variance": "rank_noise_variance",
    "model_size": "rank_noise_variance",
    "dp_modes": "aggregation_modes",
    "aggregation": "aggregation_modes",
    "population": "population",
}


@pytest.fixture(scope="session")
def shared_out(tmp_path_factory):
    return tmp_path_factory.mktemp("experiments")


def _env(out):
    env = dict(os.environ)
    env["FEDLORA_SCALE"], env["FEDLORA_OUT"] = "smoke", str(out)
    return env


@pytest.mark.slow
@pytest.mark.parametrize("name", SCRIPTS)
def test_experiment_script_runs_at_smoke_scale(name, shared_out):
    out = shared_out / NOTEBOOK_OF[name] / "smoke"
    r = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / f"{name}.py"), "--scale", "smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        env=_env(shared_out),
        timeout=1200,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    for f in OUTPUTS[name]:
        assert (out / f).stat().st_size > 0, f
    rows = list(csv.DictReader((out / OUTPUTS[name][0]).open()))
    assert rows
    if name in ("rank_variance", "model_size"):
        # the measured variance of the noisy product agrees with the exact formula (5 standard errors)
        for row in rows:
            assert abs(float(row["Var_mc"]) - float(row["Var_exact"])) < 5 * float(row["Var_mc_se"]), row
    if name == "dp_modes":
        eps = {row["mode"]: float(row["epsilon_honest"]) for row in rows if row["mode"] != "none"}
        # every mode is calibrated to epsilon 8 for the worst client of the sampling schedule
        assert set(eps) == {"local", "central", "dpsgd"}
        for mode, e in eps.items():
            assert e == pytest.approx(8.0, rel=0.02), mode
    if name == "population":
        # every DP run is calibrated to its row's epsilon for the mechanism it runs
        dp = [row for row in rows if row["mechanism"] != "none"]
        assert {row["mechanism"] for row in dp} == {"central", "central_adaptive", "ffa_central", "local"}
        for row in dp:
            assert float(row["epsilon_honest"]) == pytest.approx(float(row["epsilon"]), rel=0.02), row
            assert float(row["delta"]) <= 1 / int(row["N"])
    # a second call reuses every finished run and writes the same table
    before = (out / OUTPUTS[name][0]).read_text()
    r = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / f"{name}.py"), "--scale", "smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        env=_env(shared_out),
        timeout=600,
    )
    assert r.returncode == 0 and "reused" in r.stdout
    if name not in (
        "algorithms",
        "eps_clip",
        "dp_modes",
        "aggregation",
        "population",
    ):  # tables with a seconds column differ
        assert (out / OUTPUTS[name][0]).read_text() == before


def test_experiment_bad_scale_and_override(tmp_path):
    from fedlora_jax import experiments

    with pytest.raises(ValueError, match="scale 'huge' is not allowed; choose one of: smoke, cpu, paper"):
        experiments.base_config("huge")
    assert (
        experiments.main("eps_clip", ["--scale", "smoke", "--out", str(tmp_path / "x"), "--set", "fl.algorithm=fedsgd"])
        == 2
    )
    assert not (tmp_path / "x").exists()  # every config is checked before any run starts


def test_notebooks_are_committed_without_outputs():
    assert len(NOTEBOOKS) == 8
    for path in NOTEBOOKS:
        nb = nbformat.read(str(path), as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{path.name} has outputs"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path, shared_out, monkeypatch):
    from nbclient import NotebookClient

    for k, v in _env(shared_out).items():
        monkeypatch.setenv(k, v)
    nb = nbformat.read(str(path), as_version=4)
    NotebookClient(nb, timeout=1200, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors


def test_population_figure_of_runs_without_dp_only_has_one_panel(tmp_path):
    """A part of the grid with no DP run (epsilons=[]) still plots (it crashed on zero panels)."""
    from fedlora_jax.experiments.populations import plot_population

    rows = [
        {"N": 100, "K": k, "mechanism": "none", "epsilon": None, "eval_loss": loss}
        for k, loss in ((10, 2.3), (50, 2.1))
    ]
    path = plot_population(rows, tmp_path / "p.png")
    assert path.exists() and path.stat().st_size > 1000


@pytest.mark.parametrize("scale", ["cpu", "paper"])
@pytest.mark.parametrize("name", SCRIPTS)
def test_every_run_of_every_scale_has_a_valid_config(name, scale, tmp_path, monkeypatch):
    """Every script builds all of its configs before the first run: stop at that first run. A
    grid whose overrides contradict the scale's preset (the population grid set fl.lr_min=1e-3
    above the paper preset's fl.lr=5e-5) fails here, not hours into an accelerator session."""
    from fedlora_jax import experiments
    from fedlora_jax.experiments import grid
    from fedlora_jax.models import hub
    from fedlora_jax.runs import runner

    class Reached(Exception):
        pass

    def first_run(cfg, *a, **kw):
        raise Reached(cfg)

    built = []

    def recorded(*a, **kw):
        built.append(cfg := base_config(*a, **kw))
        return cfg

    base_config = grid.base_config
    monkeypatch.setattr(grid, "base_config", recorded)
    monkeypatch.setattr(runner, "run", first_run)
    with pytest.raises(Reached):
        experiments.main(name, ["--scale", scale, "--out", str(tmp_path / "out")])
    assert built
    for cfg in built:  # a model source the loader would refuse (population's 'smollm2' was one)
        if cfg.model.source != "tiny":
            hub.check_source(cfg.model.source)


def _no_run(*a, **kw):
    raise AssertionError("a run started")


@pytest.mark.parametrize(
    "override, says",
    [
        ("dp.epsilon=2", "dp.epsilon is a coordinate of this experiment's grid"),  # the table said 8
        ("fl.num_clients=80", "fl.num_clients is a coordinate of this experiment's grid"),  # the table said 40
        ("fl.aggregation=stack", "dp.mode central with fl.aggregation stack is not supported"),  # failed after 1 run
        ("fl.algorithm=scaffold", "fl.algorithm scaffold with dp.mode central"),  # failed after 2 runs
    ],
)
def test_population_refuses_what_would_mislabel_or_stop_it_before_any_run(tmp_path, monkeypatch, override, says):
    from fedlora_jax import experiments as ex
    from fedlora_jax.core.errors import UserError
    from fedlora_jax.runs import runner

    monkeypatch.setattr(runner, "run", _no_run)
    with pytest.raises(UserError, match=re.escape(says)):
        ex.population("smoke", tmp_path / "out", [override], cache=False)
    assert not (tmp_path / "out" / "runs").exists()


def test_experiments_never_replace_a_table_or_run_folder_they_did_not_write(tmp_path, monkeypatch):
    """A foreign population.csv was silently replaced; a foreign folder at a run's place stopped the grid
    after its first run. Both are now refused before any run, and left as they were."""
    from fedlora_jax import experiments as ex
    from fedlora_jax.core.errors import UserError
    from fedlora_jax.runs import runner

    monkeypatch.setattr(runner, "run", _no_run)
    out = tmp_path / "out"
    out.mkdir()
    (out / "population.csv").write_text("my,own,table\n")
    with pytest.raises(UserError, match="was not written by this tool"):
        ex.population("smoke", out, cache=False)
    assert (out / "population.csv").read_text() == "my,own,table\n"
    (out / "population.csv").unlink()
    foreign = out / "runs" / "N40_K4_eps8_central"
    foreign.mkdir(parents=True)
    (foreign / "data.bin").write_text("precious")
    with pytest.raises(UserError, match="is not a run folder of this tool"):
        ex.population("smoke", out, cache=False)
    assert (foreign / "data.bin").read_text() == "precious"
    # what an experiment wrote, it may replace on a rerun (the manifest lists it)
    ex.write_table([{"a": 1}], out / "t")
    ex.write_table([{"a": 2}], out / "t")
    assert (out / "t.csv").read_text().splitlines() == ["a", "2"]
