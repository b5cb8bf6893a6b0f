"""Synthetic instruction tasks with verifiable answers (a `task` column), for exact-match
evaluation and tests of non-IID splits."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..config.run_config import SYNTHETIC_TASKS as TASKS
from ..core import randomness
from ..core.errors import UserError

if TYPE_CHECKING:
    from collections.abc import Sequence


def _word(rng, lo=3, hi=7):
    return "".join(rng.choice(list("abcdefghij"), rng.integers(lo, hi + 1)))


def make_example(task: str, rng: np.random.Generator) -> dict:
    if task == "arithmetic":
        a, b = rng.integers(0, 50, 2)
        return {"instruction": "Add the two numbers.", "input": f"{a} + {b}", "output": str(a + b), "task": task}
    if task == "reverse":
        w = _word(rng)
        return {"instruction": "Reverse the letters.", "input": w, "output": w[::-1], "task": task}
    if task == "sort":
        d = rng.integers(0, 10, rng.integers(3, 7))
        return {
            "instruction": "Sort the digits.",
            "input": " ".join(map(str, d)),
            "output": " ".join(map(str, sorted(d))),
            "task": task,
        }
    if task == "copy":
        w = _word(rng)
        return {"instruction": "Copy the word.", "input": w, "output": w, "task": task}
    raise UserError(f"unknown synthetic task {task!r}; allowed: {', '.join(TASKS)}")


def generate(n: int, tasks: Sequence[str] = TASKS, seed: int = 0, domain: str = "synthetic_data") -> list[dict]:
    """n examples, tasks in equal shares (round-robin), deterministic by (seed, randomness domain)."""
    for t in tasks:
        if t not in TASKS:
            raise UserError(f"unknown synthetic task {t!r}; allowed: {', '.join(TASKS)}")
    rng = randomness.np_rng(seed, domain)
    return [make_example(tasks[i % len(tasks)], rng) for i in range(n)]
