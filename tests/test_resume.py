"""Resume is exact in every mode: a run killed at a random moment (kill -9) and resumed ends where an
uninterrupted run ends; a finished run is left alone; Ctrl-C stops cleanly."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from fedlora_jax import cli
from fedlora_jax.adapters import peft_io
from fedlora_jax.config.run_config import load_config
from fedlora_jax.models import abstract_model
from fedlora_jax.runs.outdir import prepare_out
from fedlora_jax.runs.runner import build_model, run

MODES = {
    "none": [],
    "local": ["dp.mode=local", "dp.noise=multiplier", "dp.noise_multiplier=1.0"],
    "central": ["dp.mode=central", "fl.sampling=poisson", "dp.noise=multiplier", "dp.noise_multiplier=1.0"],
    "dpsgd": ["dp.mode=dpsgd", "dp.noise=multiplier", "dp.noise_multiplier=1.0", "dp.clip_a=1.0"],
    # correlated noise: the streamed inverse's state (the last dp.band noises) is checkpointed with the round's
    "bandmf": ["dp.mode=bandmf", "fl.sampling=cyclic", "dp.band=2", "dp.noise=multiplier", "dp.noise_multiplier=1.0"],
}
BASE = [
    "fl.rounds=5",
    "fl.num_clients=4",
    "fl.clients_per_round=2",
    "fl.local_steps=2",
    "fl.batch_size=4",
    "data.synthetic_examples=120",
    "eval_every=2",
    "checkpoint_every=1",
]


def _sets(mode):
    # a fixed noise seed: two runs may only be compared when their noise is the same
    return BASE + MODES[mode] + ["dp.publish_client_metrics=true", "dp.noise_seed=11"] * (mode != "none")


def _adapter(folder: Path):
    cfg = load_config(str(folder / "config.yaml"))
    definition = abstract_model(build_model(cfg)[0].config, peft_io.read_peft_config(folder / "adapter"))[0]
    return peft_io.load_peft(folder / "adapter", definition)


def _rows(folder: Path):
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def _cli(args, **kw):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen(
        [sys.executable, "-m", "fedlora_jax.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def _same_run(a: Path, b: Path):
    for x, y in zip(*(jax.tree.leaves(_adapter(f)) for f in (a, b))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert _rows(a) == _rows(b)
    sa, sb = (json.loads((f / "summary.json").read_text()) for f in (a, b))
    assert sa["privacy"] == sb["privacy"]  # the ledger: epsilon, participations
    assert sa["initial_eval_loss"] == sb["initial_eval_loss"] and sa["rounds"] == sb["rounds"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode, seed", [("none", 0), ("none", 1), ("local", 2), ("central", 3), ("dpsgd", 4), ("bandmf", 5)]
)
def test_kill_9_at_a_random_moment_then_resume_equals_the_uninterrupted_run(mode, seed, tmp_path):
    sets = sum((["--set", s] for s in _sets(mode)), [])
    full, part = tmp_path / "full", tmp_path / "part"
    assert cli.main(["run", "tiny", *sets, "--out", str(full), "--no-progress", "--json"]) == 0
    rng = random.Random(seed)
    target = rng.randint(1, 4)  # kill once this many metrics rows exist, after a random extra delay
    p = _cli(["run", "tiny", *sets, "--out", str(part), "--no-progress"])
    t0 = time.time()
    while p.poll() is None and time.time() - t0 < 300:
        m = part / "metrics.jsonl"
        if m.exists() and len(m.read_text().splitlines()) >= target:
            time.sleep(rng.uniform(0, 0.5))
            break
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    r = _cli(["run", "tiny", *sets, "--out", str(part), "--no-progress", "--resume"])
    out, err = r.communicate(timeout=600)
    assert r.returncode == 0, err[-2000:]
    _same_run(full, part)


def test_resume_of_a_finished_run_changes_nothing(tmp_path, capsys):
    sets = sum((["--set", s] for s in _sets("local") + ["fl.rounds=2"]), [])
    out = tmp_path / "r"
    assert cli.main(["run", "tiny", *sets, "--out", str(out), "--no-progress"]) == 0
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    capsys.readouterr()
    assert cli.main(["run", "tiny", *sets, "--out", str(out), "--no-progress", "--resume"]) == 0
    printed = capsys.readouterr()
    assert "already finished" in (printed.out + printed.err)
    after = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert after == before


@pytest.mark.slow
def test_resume_after_a_truncated_metrics_line_keeps_summary_fields(tmp_path):
    cfg = load_config("tiny", _sets("none"))
    full = run(cfg, tmp_path / "full", progress=False)
    part = tmp_path / "part"
    run(cfg, part, progress=False, stop_after=3)
    m = part / "metrics.jsonl"
    m.write_text(m.read_text() + '{"round": 4, "lr": 0.0')  # a crash in the middle of writing round 4
    resumed = run(cfg, part, resume=True, progress=False)
    _same_run(tmp_path / "full", part)
    assert resumed["initial_eval_loss"] == full["initial_eval_loss"] is not None
    # wall time is the total over both sessions, not the resumed part alone
    first = json.loads(json.dumps(full))["wall_seconds"]
    assert resumed["wall_seconds"] > 0 and first > 0


@pytest.mark.slow
def test_sigint_finishes_the_round_checkpoints_and_exits_130(tmp_path):
    out = tmp_path / "r"
    sets = sum((["--set", s] for s in _sets("none") + ["fl.rounds=40", "checkpoint_every=100"]), [])
    p = _cli(["run", "tiny", *sets, "--out", str(out), "--no-progress"])
    t0 = time.time()
    while time.time() - t0 < 300:
        m = out / "metrics.jsonl"
        if m.exists() and len(m.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 130, err[-2000:]
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and "interrupted" in lines[0] and "Traceback" not in err
    s = json.loads((out / "summary.json").read_text())
    assert s["stop_reason"] == "interrupted" and 2 <= s["rounds"] < 40
    assert (out / "checkpoints" / str(s["rounds"])).exists()  # a checkpoint of the last finished round
    r = _cli(["run", "tiny", *sets, "--out", str(out), "--no-progress", "--resume"])
    _, err = r.communicate(timeout=600)
    assert r.returncode == 0, err[-2000:]
    assert json.loads((out / "summary.json").read_text())["rounds"] == 40


def _drop_checkpoint(folder: Path, step: int):
    import shutil

    shutil.rmtree(folder / "checkpoints" / str(step))


def test_killed_after_logging_a_round_but_before_its_checkpoint_resumes_exactly(tmp_path):
    """Round 1 logged, its checkpoint never written (kill -9 during the save): the round-0 checkpoint,
    saved before any row is logged, lets the run resume and end where an uninterrupted run ends."""
    cfg = load_config("tiny", _sets("local"))
    run(cfg, tmp_path / "full", progress=False)
    part = tmp_path / "part"
    run(cfg, part, progress=False, stop_after=1)
    _drop_checkpoint(part, 1)
    assert sorted(p.name for p in (part / "checkpoints").iterdir() if p.name.isdigit()) == ["0"]
    assert len(_rows(part)) == 1
    run(cfg, part, resume=True, progress=False)
    _same_run(tmp_path / "full", part)


def test_two_kills_leave_no_duplicate_rows(tmp_path, monkeypatch):
    """Killed after logging round 3 but before its checkpoint, resumed, killed again after the
    checkpoint of round 3: the rows dropped at the first resume must not come back as duplicates."""
    from fedlora_jax.runs import reporting

    cfg = load_config("tiny", _sets("none"))
    run(cfg, tmp_path / "full", progress=False)
    part = tmp_path / "part"
    run(cfg, part, progress=False, stop_after=3)
    _drop_checkpoint(part, 3)  # as if killed after round 3 was logged, during its checkpoint

    def killed(*a, **k):
        raise KeyboardInterrupt  # the second kill, after round 3's checkpoint, before outputs

    with monkeypatch.context() as m:
        m.setattr(reporting, "write_outputs", killed)
        with pytest.raises(KeyboardInterrupt):
            run(cfg, part, resume=True, progress=False, stop_after=1)
    run(cfg, part, resume=True, progress=False)
    assert [r["round"] for r in _rows(part)] == [1, 2, 3, 4, 5]
    _same_run(tmp_path / "full", part)


def test_resume_of_a_run_killed_before_anything_was_logged_starts_it(tmp_path):
    """No checkpoint and no logged round (killed while loading): --resume starts the run from round 0."""
    cfg = load_config("tiny", _sets("none"))
    run(cfg, tmp_path / "full", progress=False)
    part = tmp_path / "part"
    prepare_out(cfg, part, resume=False, overwrite=False)  # what a run writes before it loads (config, manifest)
    (part / "metrics.jsonl").write_text("")
    run(cfg, part, resume=True, progress=False)
    _same_run(tmp_path / "full", part)
