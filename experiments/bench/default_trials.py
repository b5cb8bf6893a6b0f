"""Trials for the default job (issue 27): the `default` preset with --set overrides, each run end to
end through `runner.run` (load, compile, rounds, whole-set evaluation, export), one after another.

    python experiments/bench/default_trials.py NAME 'key=value key=value' [NAME '...' ...]
    # -> one JSON line per trial appended to experiments/bench/results/default_trials.jsonl

Each line: the overrides, base and final held-out loss with their n, the honest epsilon (worst
client), the paper-convention epsilon, the wall time of the whole run (model load and compile
included), and the load average at the end (the machine is shared)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from fedlora_jax.config.run_config import load_config
from fedlora_jax.runs import runner

OUT = Path("experiments/bench/results/default_trials.jsonl")


def trial(name: str, overrides: list[str]) -> dict:
    cfg = load_config("default", overrides)
    folder = Path(tempfile.mkdtemp(prefix="fedlora_trial_"))
    t0 = time.time()
    try:
        s = runner.run(cfg, folder / "run", progress=False)
    finally:
        wall = time.time() - t0
        shutil.rmtree(folder, ignore_errors=True)
    ev = s.get("eval") or {}
    p = s.get("privacy") or {}
    before = ev.get("before") or {"loss": s.get("initial_eval_loss")}
    after = ev.get("after") or {"loss": s.get("final_eval_loss")}
    return {
        "name": name,
        "overrides": overrides,
        "base_loss": before.get("loss"),
        "final_loss": after.get("loss"),
        "n": after.get("n"),
        "change": (after["loss"] / before["loss"] - 1) if before.get("loss") and after.get("loss") else None,
        "epsilon": p.get("epsilon"),
        "epsilon_paper": p.get("epsilon_paper"),
        "noise_multiplier": p.get("noise_multiplier"),
        "rounds": s.get("rounds"),
        "wall_s": round(wall, 1),
        "load": os.getloadavg()[0],
        "stop_reason": s.get("stop_reason"),
    }


def main(argv: list[str]) -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    for name, sets in zip(argv[::2], argv[1::2]):
        row = trial(name, sets.split())
        print(json.dumps(row), flush=True)
        with OUT.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
