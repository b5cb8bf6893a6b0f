"""House rules checked in CI: ruff lint and ruff format over the package, experiments and tests
(configured in pyproject.toml)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _ruff(*args):
    exe = shutil.which("ruff")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "ruff", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


def test_ruff_lint_is_clean():
    r = _ruff("check", "fedlora_jax", "experiments", "tests")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-1000:]


def test_ruff_format_is_applied():
    r = _ruff("format", "--check", "fedlora_jax", "experiments", "tests")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-1000:]
