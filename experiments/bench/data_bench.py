"""Host-side data work for large populations: building the client data (load, tokenize, hold
out, partition) for N clients, and one round's block (the [K, steps, batch, seq] arrays of a
sampled cohort), for N in {1,000, 10,000}, iid and dirichlet_balanced partitions (the label-wise dirichlet leaves
clients of 2 examples empty), and cohorts of 100 and
1,000, with the population study's settings (synthetic tasks, 2 examples per client, seq 32,
2 local steps x batch 4). A block is drawn for fresh random cohorts, `--reps` times; the median
is reported beside the minimum. Compare with a round's device time (population_bench.py).

    python experiments/bench/data_bench.py [--out experiments/bench/results/data.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from fedlora_jax.config.run_config import load_config
from fedlora_jax.data.pipeline import byte_tokenizer, prepare


def config(n: int, partition: str):
    return load_config(
        "tiny",
        [
            f"fl.num_clients={n}",
            "fl.local_steps=2",
            "fl.batch_size=4",
            "data.source=synthetic",
            "data.template=plain",
            "data.seq_len=32",
            f"data.partition={partition}",
            f"data.synthetic_examples={int(n * 2 / 0.9) + 1}",
        ],
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--populations", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--cohorts", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "data.json"))
    args = ap.parse_args()
    tok = byte_tokenizer()
    rows = []
    for n in args.populations:
        for partition in ("iid", "dirichlet_balanced"):
            cfg = config(n, partition)
            t0 = time.perf_counter()
            data = prepare(cfg, tok)
            prepare_s = time.perf_counter() - t0
            sizes = np.array([len(p) for p in data.parts])
            batcher = data.batcher(cfg.fl.local_steps, cfg.fl.batch_size, cfg.seed)
            rng = np.random.default_rng(0)
            participations = np.zeros(n, np.int64)
            for k in args.cohorts:
                if k > n:
                    continue
                times = []
                for _ in range(args.reps):
                    ids = np.sort(rng.choice(n, k, replace=False))
                    t0 = time.perf_counter()
                    block = batcher.block(ids, participations)
                    times.append(time.perf_counter() - t0)
                    participations[ids] += 1
                row = {
                    "N": n,
                    "partition": partition,
                    "K": k,
                    "prepare_s": prepare_s,
                    "block_ms_median": 1e3 * statistics.median(times),
                    "block_ms_min": 1e3 * min(times),
                    "block_mib": sum(v.nbytes for v in block.values()) / 2**20,
                    "examples_per_client_min": int(sizes.min()),
                    "examples_per_client_max": int(sizes.max()),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    Path(args.out).write_text(
        json.dumps({"machine": platform.processor() or platform.machine(), "rows": rows}, indent=1)
    )


if __name__ == "__main__":
    main()
