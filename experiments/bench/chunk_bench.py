"""How many clients a CPU round should vmap at once: the round time against clients_per_chunk in
four regimes, interleaved and repeated in one process, and the chunk that an unset
fl.clients_per_chunk picks (plan.auto_chunk) against the whole cohort at once.

    python experiments/bench/chunk_bench.py [--reps 5]   # -> experiments/bench/results/chunk.{json,md}
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np
import scale_bench as sb

from fedlora_jax.federated.plan import auto_chunk

REGIMES = {
    "cross-device": sb.REGIMES["cross-device"],
    "mid": sb.REGIMES["mid"],
    "hidden 256, 4 layers": dict(hidden=256, layers=4, heads=8, vocab=2048, clients=32, steps=2, batch=4, seq=64),
    "sequence 128": dict(hidden=64, layers=2, heads=4, vocab=512, clients=128, steps=2, batch=1, seq=128),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="experiments/bench/results/chunk.json")
    a = ap.parse_args()
    rows = []
    for name, p in REGIMES.items():
        k, tokens = p["clients"], p["batch"] * p["seq"]
        auto = auto_chunk(k, tokens, "cpu")
        chunks = sorted({c for c in (k // 32, k // 16, k // 8, k // 4, k // 2, k) if c >= 1} | {auto})
        _, definition, base, lora, block = sb.setup(p)
        calls = {c: sb.compiled_round(p, definition, base, lora, block, c) for c in chunks}
        for f, args in calls.values():
            jax.block_until_ready(f(*args))
        times = {c: [] for c in calls}
        for _ in range(a.reps):  # interleaved: the machine is shared
            for c, (f, args) in calls.items():
                t = time.perf_counter()
                jax.block_until_ready(f(*args))
                times[c].append(time.perf_counter() - t)
        med = {c: float(np.median(t)) for c, t in times.items()}
        row = {
            "regime": name,
            "params": p,
            "tokens_per_client_step": tokens,
            "auto_chunk": auto,
            "median_round_s": med,
            "auto_vs_whole_cohort": med[k] / med[auto],
            "best_chunk": min(med, key=med.get),
            "times": times,
        }
        print(json.dumps({x: v for x, v in row.items() if x != "times"}), flush=True)
        rows.append(row)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"cpus": jax.device_count(), "reps": a.reps, "rows": rows}, indent=1))
    md = [
        "Round time (median s) by clients_per_chunk; auto: what an unset chunk picks (plan.auto_chunk).",
        "",
        "| regime | tokens per client step | chunk: round s (tokens per step) | auto | auto vs whole cohort |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        cells = ", ".join(f"{c}: {s:.3f} ({c * r['tokens_per_client_step']:,})" for c, s in r["median_round_s"].items())
        md.append(
            f"| {r['regime']} | {r['tokens_per_client_step']} | {cells} | {r['auto_chunk']} "
            f"| {r['auto_vs_whole_cohort']:.2f}x |"
        )
    Path(a.out).with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
