"""Cost of the metric writers per round: the time of one `write(row, step)` for metrics.jsonl,
metrics.csv, TensorBoard (tensorboardX, flushed every write) and W&B offline, on a metrics row of a
local-DP run with published client metrics (the widest row a run writes). Each writer writes
`--rows` rows, `--repeats` times into a fresh folder; the median per-row time of each repeat is
reported (min / median / max over the repeats), with the writer's open and close times.

    WANDB_MODE=offline python experiments/bench/writers_bench.py [--out experiments/bench/results/writers.json]
"""

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from fedlora_jax.config.run_config import load_config
from fedlora_jax.runs import writers

ROW = {
    "round": 0,
    "lr": 0.003,
    "unprotected_loss": 2.31,
    "unprotected_first_loss": 2.52,
    "unprotected_update_norm": 0.41,
    "unprotected_dropped": 0,
    "clients": 2,
    "eval_loss": None,
    "epsilon": 39.38,
    "epsilon_mean": 19.69,
    "delta": 1e-05,
    "epsilon_rdp": 41.65,
    "epsilon_paper": 4.84,
    "epsilon_paper_tracker": 4.84,
    "seconds": 0.035,
}


def bench(name: str, rows: int, repeats: int) -> dict:
    cfg = load_config("tiny", ["dp.mode=local", "logging.writers=[tensorboard,wandb]"])
    cls = {"jsonl": writers.JsonlWriter, "csv": writers.CsvWriter, **writers.OPTIONAL_WRITERS}[name]
    medians, opens, closes = [], [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            w = cls()
            t = time.perf_counter()
            w.open(out, cfg, [], 0)
            opens.append(time.perf_counter() - t)
            times = []
            for r in range(1, rows + 1):
                row = {**ROW, "round": r, "eval_loss": 2.0 if r % 5 == 0 else None}
                t = time.perf_counter()
                w.write(row, r)
                times.append(time.perf_counter() - t)
            t = time.perf_counter()
            w.close()
            closes.append(time.perf_counter() - t)
            medians.append(statistics.median(times))
    us = lambda xs: {"min": min(xs) * 1e6, "median": statistics.median(xs) * 1e6, "max": max(xs) * 1e6}
    return {"write_us": us(medians), "open_s": statistics.median(opens), "close_s": statistics.median(closes)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=200)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--writers", default="jsonl,csv,tensorboard,wandb")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    res = {
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "rows": a.rows,
        "repeats": a.repeats,
        "writers": {n: bench(n, a.rows, a.repeats) for n in a.writers.split(",")},
    }
    for n, r in res["writers"].items():
        w = r["write_us"]
        print(
            f"{n:12s} write/row median {w['median']:9.1f} us (min {w['min']:.1f}, max {w['max']:.1f}); "
            f"open {r['open_s']:.3f} s, close {r['close_s']:.3f} s"
        )
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
