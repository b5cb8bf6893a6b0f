"""The faults of issue 28, each as the user meets it: nothing is deleted that the tool did not write,
a damaged run folder is named in one sentence, a non-finite value is refused before a run starts, a
full disk is one sentence (and the run resumes), and nothing hangs without a word."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedlora_jax import cli
from fedlora_jax.config.run_config import load_config

MANIFEST = "fedlora_manifest.json"  # fedlora_jax.runs.runfolder.MANIFEST (tested below)

SETS = ["fl.rounds=2", "fl.num_clients=4", "fl.clients_per_round=2", "fl.local_steps=1", "checkpoint_every=1"]
ARGS = sum((["--set", s] for s in SETS), [])


def _tree(root: Path) -> dict:
    """relative path -> (is folder, size, content hash) of everything under root."""
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = (p.is_dir(), 0 if p.is_dir() else p.stat().st_size)
    return out


def _one_line(capfd, rc, code=2) -> str:
    err = capfd.readouterr().err
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert rc == code, err[-3000:]
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith("fedlora-jax"), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> Path:
    """A real run of the tiny preset stopped after round 1 of 2 (checkpoints 0 and 1, summary.json)."""
    from fedlora_jax.runs.runner import run

    out = tmp_path_factory.mktemp("faults") / "run"
    run(load_config("tiny", SETS), out, progress=False, stop_after=1)
    return out


@pytest.fixture
def run_copy(stopped_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(stopped_run, dst)
    return dst


# ----------------------------------------------------------------------------- overwrite: data loss


def test_the_manifest_lists_every_file_a_run_writes(run_copy):
    listed = json.loads((run_copy / MANIFEST).read_text())["entries"]
    for p in run_copy.rglob("*"):
        rel = p.relative_to(run_copy).as_posix()
        if rel == MANIFEST:
            continue
        assert rel in listed, rel
        if p.is_file():
            assert listed[rel]["size"] == p.stat().st_size, rel


@pytest.mark.parametrize(
    "foreign", ["adapter/MY_NOTES.txt", "checkpoints/keepme.txt", "checkpoints/1/state/mine.bin", "notes.txt"]
)
def test_overwrite_never_deletes_a_file_the_tool_did_not_write(run_copy, foreign, capfd):
    f = run_copy / foreign
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text("mine")
    before = _tree(run_copy)
    rc = cli.main(["run", "tiny", *ARGS, "--out", str(run_copy), "--overwrite", "--no-progress"])
    line = _one_line(capfd, rc)
    assert foreign in line and "nothing was deleted" in line
    assert _tree(run_copy) == before and f.read_text() == "mine"


def test_overwrite_refuses_a_listed_file_that_changed(run_copy, capfd):
    w = run_copy / "adapter" / "adapter_model.safetensors"
    w.write_bytes(b"my own weights")
    rc = cli.main(["run", "tiny", *ARGS, "--out", str(run_copy), "--overwrite", "--no-progress"])
    line = _one_line(capfd, rc)
    assert "adapter/adapter_model.safetensors" in line and "changed" in line
    assert w.read_bytes() == b"my own weights"


def test_a_folder_without_the_manifest_is_never_a_run(tmp_path, capfd):
    mine = tmp_path / "mine"
    (mine / "checkpoints").mkdir(parents=True)
    (mine / "config.yaml").write_text(yaml.safe_dump(load_config("tiny").to_dict(), sort_keys=False))
    (mine / "metrics.jsonl").write_text('{"round": 1}\n')
    (mine / "checkpoints" / "my_model.bin").write_bytes(b"\0" * 100)
    before = _tree(mine)
    for flag in ("--overwrite", "--resume"):
        rc = cli.main(["run", "tiny", "--out", str(mine), flag, "--no-progress"])
        line = _one_line(capfd, rc)
        assert MANIFEST in line, line
        assert _tree(mine) == before


def test_overwrite_deletes_exactly_what_the_manifest_lists(run_copy):
    from fedlora_jax.runs.outdir import prepare_out

    cfg = load_config("tiny", SETS)
    prepare_out(cfg, run_copy, resume=False, overwrite=True)
    assert sorted(p.name for p in run_copy.iterdir()) == sorted(["config.yaml", MANIFEST])
    assert sorted(p.name for p in run_copy.parent.iterdir()) == ["run"]  # no leftovers beside it


def test_a_run_killed_during_a_checkpoint_save_can_be_overwritten(run_copy):
    """orbax's temporary folder of a save that never finished was written by the tool."""
    from fedlora_jax.runs.outdir import prepare_out
    from fedlora_jax.runs.runfolder import Manifest

    m = Manifest.load(run_copy)
    m.begin("checkpoints")  # what Checkpointer.save records before orbax starts writing
    tmp = run_copy / "checkpoints" / "2.orbax-checkpoint-tmp" / "state.orbax-checkpoint-tmp"
    tmp.mkdir(parents=True)
    (tmp / "_sharding").write_bytes(b"x" * 10)
    prepare_out(load_config("tiny", SETS), run_copy, resume=False, overwrite=True)
    assert sorted(p.name for p in run_copy.iterdir()) == sorted(["config.yaml", MANIFEST])


# ----------------------------------------------------------------------------- damaged run folders


def _first_line_array(run):
    m = run / "metrics.jsonl"
    lines = m.read_text().splitlines()
    m.write_text("\n".join(["[1, 2]"] + lines[1:]) + "\n")


def _truncate_checkpoint(run):
    for p in (run / "checkpoints" / "1").rglob("*"):
        if p.is_file():
            p.write_bytes(b"")


DAMAGE = {
    "metrics-line-is-an-array": ("metrics.jsonl", _first_line_array),
    "metrics-empty": ("metrics.jsonl", lambda r: (r / "metrics.jsonl").write_text("")),
    "summary-corrupt": ("summary.json", lambda r: (r / "summary.json").write_text('{"rounds": 1, ')),
    "summary-empty": ("summary.json", lambda r: (r / "summary.json").write_text("")),
    "summary-a-list": ("summary.json", lambda r: (r / "summary.json").write_text("[]")),
    "config-empty": ("config.yaml", lambda r: (r / "config.yaml").write_text("")),
    "checkpoint-zero-length": ("checkpoints/1", _truncate_checkpoint),
    "checkpoint-meta-corrupt": (
        "checkpoints/1",
        lambda r: (r / "checkpoints" / "1" / "meta" / "metadata").write_text("{not json"),
    ),
    "manifest-corrupt": (MANIFEST, lambda r: (r / MANIFEST).write_text("{")),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_resume_of_a_damaged_run_folder_says_which_file(run_copy, case, capfd):
    name, damage = DAMAGE[case]
    damage(run_copy)
    rc = cli.main(["run", "--out", str(run_copy), "--resume", "--no-progress"])
    line = _one_line(capfd, rc)
    assert "run folder damaged" in line and name in line, line


def test_overwrite_of_a_folder_with_a_damaged_manifest_deletes_nothing(run_copy, capfd):
    (run_copy / MANIFEST).write_text("[1]")
    before = _tree(run_copy)
    rc = cli.main(["run", "tiny", *ARGS, "--out", str(run_copy), "--overwrite", "--no-progress"])
    line = _one_line(capfd, rc)
    assert "run folder damaged" in line and MANIFEST in line
    assert _tree(run_copy) == before


# ----------------------------------------------------------------------------- non-finite values


@pytest.mark.parametrize(
    "sets, says",
    [
        (["dp.mode=local", "dp.noise=multiplier", "dp.noise_multiplier=0"], "dp.noise_multiplier"),
        (["dp.mode=local", "dp.noise=classical", "dp.epsilon=1e-320"], "not finite"),
        (["dp.mode=local", "dp.noise=classical", "dp.delta=1e-320"], "not finite"),
        (["dp.mode=local", "dp.noise=classical", "dp.epsilon=1e300"], "cannot compute"),
        (["dp.mode=local", "dp.noise=multiplier", "dp.noise_multiplier=1e300"], "cannot compute"),
    ],
)
def test_a_value_that_makes_an_output_non_finite_is_refused_up_front(tmp_path, sets, says, capfd):
    out = tmp_path / "o"
    rc = cli.main(["run", "tiny", *sum((["--set", s] for s in sets), []), "--out", str(out), "--no-progress"])
    line = _one_line(capfd, rc)
    assert says in line, line
    assert not out.exists()


# ----------------------------------------------------------------------------- full disk


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)]).returncode == 0


@pytest.mark.parametrize("size", ["60k", "100k", "400k"])
def test_a_full_disk_is_one_sentence_and_the_run_resumes(tmp_path, size, capfd):
    """A real full disk (a small tmpfs; root only): at the first checkpoint, a later one, the final
    adapter. One sentence, and once there is room --resume finishes the run."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, size):
        pytest.skip("needs root and mount to make a small file system")
    try:
        out = disk / "run"
        rc = cli.main(["run", "tiny", *ARGS, "--out", str(out), "--no-progress"])
        line = _one_line(capfd, rc)
        assert "No space left on device" in line and "--resume" in line, line
        subprocess.run(["mount", "-o", "remount,size=50m", str(disk)], check=True)
        rc = cli.main(["run", "--out", str(out), "--resume", "--no-progress"])
        err = capfd.readouterr().err
        assert rc == 0, err[-3000:]
        assert json.loads((out / "summary.json").read_text())["rounds"] == 2
    finally:
        subprocess.run(["umount", str(disk)])


def test_an_orbax_error_that_hides_an_os_error_is_one_sentence(tmp_path, monkeypatch, capfd):
    """orbax raises ValueError (RESOURCE_EXHAUSTED ... [os_error_code='28']) for a full disk."""
    import orbax.checkpoint as ocp

    def full(self, step, *a, **k):
        raise ValueError(
            f'RESOURCE_EXHAUSTED: Error writing local file "{self.directory}/{step}.orbax-checkpoint-tmp/x": '
            "Failed to write 114 bytes to file 7: No space left on device [os_error_code='28']"
        )

    monkeypatch.setattr(ocp.CheckpointManager, "save", full)
    out = tmp_path / "o"
    line = _one_line(capfd, cli.main(["run", "tiny", *ARGS, "--out", str(out), "--no-progress"]))
    assert "No space left on device" in line and "checkpoints" in line


# ----------------------------------------------------------------------------- one sentence, exit 2


def _yaml_dup(tmp_path):
    f = tmp_path / "dup.yaml"
    f.write_text("name: dup\nfl:\n  rounds: 2\n  rounds: 5\n")
    return str(f)


CASES = {
    "privacy-seed-negative": (
        ["privacy", "--noise-multiplier", "1", "--clients", "4", "--clients-per-round", "2", "--seed", "-1"],
        "--seed",
    ),
    "generate-seed-huge": (["generate", "tiny", "--prompt", "hi", "--seed", "9" * 20], "--seed"),
    "audit-seed-negative": (["audit", "tiny", "--seed", "-5"], "--seed"),
    "out-empty": (["run", "tiny", "--out", ""], "--out"),
    "rounds-huge": (
        ["run", "tiny", "--set", "fl.rounds=10000000", "--set", "dp.mode=local", "--set", "dp.noise=calibrate"],
        "100,000",
    ),
    "privacy-rounds-huge": (
        ["privacy", "--noise-multiplier", "1", "--clients", "4", "--clients-per-round", "2", "--rounds", "1000000000"],
        "100,000",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_one_sentence(case, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    argv, says = CASES[case]
    rc = cli.main(argv)
    assert says in _one_line(capfd, rc)
    assert list(tmp_path.iterdir()) == []


def test_a_yaml_key_given_twice_is_refused(tmp_path, capfd):
    f = _yaml_dup(tmp_path)
    line = _one_line(capfd, cli.main(["config", f]))
    assert "'rounds'" in line and "dup.yaml" in line and "twice" in line
    f2 = tmp_path / "top.yaml"
    f2.write_text("seed: 1\nseed: 2\n")
    assert "'seed'" in _one_line(capfd, cli.main(["config", str(f2)]))


def test_by_column_rows_without_the_label_are_refused(tmp_path, capfd):
    rows = [{"instruction": f"q{i}", "output": f"a{i}", "topic": ["x", "y"][i % 2]} for i in range(40)]
    rows[3].pop("topic")
    rows[7]["topic"] = None
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sets = [f"data.source={f}", "data.partition=by_column", "data.label_column=topic", "fl.num_clients=2"]
    sets += ["fl.clients_per_round=2"]
    rc = cli.main(["data", "tiny", *sum((["--set", s] for s in sets), [])])
    line = _one_line(capfd, rc)
    assert "topic" in line and "record 4" in line, line


@pytest.fixture(scope="module")
def nan_adapter(stopped_run, tmp_path_factory) -> Path:
    from safetensors.numpy import load_file, save_file

    run = tmp_path_factory.mktemp("nan") / "run"
    shutil.copytree(stopped_run, run)
    w = run / "adapter" / "adapter_model.safetensors"
    t = load_file(str(w))
    k = sorted(t)[0]
    t[k] = np.full_like(t[k], np.nan)
    save_file(t, str(w))
    return run


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "{run}"],
        ["generate", "{run}", "--prompt", "hi", "--max-new-tokens", "2"],
        ["score", "{run}/base_model", "--adapter", "{run}/adapter", "--text", "hello there"],
    ],
    ids=["eval", "generate", "score"],
)
def test_an_adapter_with_non_finite_weights_is_refused(nan_adapter, argv, capfd):
    rc = cli.main([a.replace("{run}", str(nan_adapter)) for a in argv])
    line = _one_line(capfd, rc)
    assert "not finite" in line and "adapter_model.safetensors" in line, line
