"""The layer loop of shallow models: lax.scan (before) against unrolled (after), our round in the
cross-device and mid regimes of scale_bench.py, interleaved and repeated in one process; share of
this machine's measured float32 matmul peak from the analytic FLOPs (scale_bench.analytic_flops).

    python experiments/bench/unroll_bench.py [--reps 3]   # -> experiments/bench/results/unroll.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import scale_bench as sb

from fedlora_jax.models import layers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="experiments/bench/results/unroll.json")
    a = ap.parse_args()
    peak = sb.matmul_peak()
    rows = []
    for name in ("cross-device", "mid"):
        p = sb.REGIMES[name]
        _, definition, base, lora, block = sb.setup(p)
        times = {"scan": [], "unrolled": []}
        for _ in range(a.reps):  # interleaved
            for variant, max_layers in (("scan", 0), ("unrolled", layers.UNROLL_MAX_LAYERS)):
                saved, layers.UNROLL_MAX_LAYERS = layers.UNROLL_MAX_LAYERS, max_layers
                try:
                    times[variant].append(sb.ours(p, definition, base, lora, block, p["chunk"], reps=3)["round_s"])
                finally:
                    layers.UNROLL_MAX_LAYERS = saved
        med = {v: float(np.median(t)) for v, t in times.items()}
        flops = sb.analytic_flops(p, base)
        row = {
            "regime": name,
            "median_round_s": med,
            "speedup": med["scan"] / med["unrolled"],
            "share_of_peak": {v: flops / s / peak for v, s in med.items()},
            "times": times,
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"matmul_peak_gflops": peak / 1e9, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
