"""House rules checked in CI: ruff lint and ruff format over the package, experiments and tests
(configured in pyproject.toml)."""

from __future__ import annotations

import ast
import collections
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


def _string_lists(path):
    """(sorted strings, line) of every tuple/list/set literal of two or more string constants."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and len(node.elts) >= 2:
            if all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
                yield tuple(sorted(e.value for e in node.elts)), node.lineno


def test_every_choice_list_has_one_home():
    """A list of choices (algorithms, modes, tasks, dtypes, ...) is written once, in its registry, and
    imported wherever it is checked or offered: a copy drifts (the CLI offered `--task` choices by hand
    while the config checked its own tuple). So no literal list of strings may appear twice."""
    seen = collections.defaultdict(list)
    for path in sorted((ROOT / "fedlora_jax").rglob("*.py")):
        for key, line in _string_lists(path):
            seen[key].append(f"{path.relative_to(ROOT)}:{line}")
    copies = {k: v for k, v in seen.items() if len(v) > 1}
    assert not copies, f"choice lists written more than once (import the registry instead): {copies}"


def test_the_division_floor_has_one_home():
    """The guard against dividing by a zero norm, weight sum or sigma is numerics.DIVISION_FLOOR:
    a tiny float literal elsewhere is a copy of it (there were seven, under three names). Tiny
    constants live in numerics.py."""
    tiny = []
    for path in sorted((ROOT / "fedlora_jax").rglob("*.py")):
        if path.name == "numerics.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, float) and 0 < node.value < 1e-20:
                tiny.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not tiny, f"import numerics.DIVISION_FLOOR instead of a literal: {tiny}"
