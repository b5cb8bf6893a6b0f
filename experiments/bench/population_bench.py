"""Round time and memory of central DP at N = 10,000 clients: the Poisson cohort padded to its
capacity (the cost of K, not N) beside a fixed cohort of exactly K slots, for K = 100 and 1,000,
on the tiny model; interleaved and repeated. Memory is XLA's own account of the compiled round
(arguments + temporaries), which does not depend on the machine's noise.

    python experiments/bench/population_bench.py [--clients 10000] [--cohorts 100 1000] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import numpy as np
from cohort_timing import compiled_round, interleaved

from fedlora_jax.config.run_config import load_config
from fedlora_jax.federated import sampling
from fedlora_jax.models.factory import build_model
from fedlora_jax.privacy import mechanisms as modes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=10000)
    ap.add_argument("--cohorts", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--chunk", type=int, default=250)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="experiments/bench/results/population.json")
    a = ap.parse_args()
    n = a.clients
    rng = np.random.default_rng(0)
    results = []
    for k in a.cohorts:
        cfg = load_config(
            "tiny",
            [
                "dp.mode=central",
                "fl.sampling=poisson",
                "dp.noise=multiplier",
                "dp.noise_multiplier=1.0",
                f"fl.num_clients={n}",
                f"fl.clients_per_round={k}",
                "fl.local_steps=2",
                "fl.batch_size=4",
                f"fl.clients_per_chunk={min(a.chunk, k)}",
            ],
        )
        definition, base, lora, _, _ = build_model(cfg)
        mech = modes.build(cfg, lora)
        cap = sampling.cohort_slots(n, k, "poisson")
        calls, mem, comp = {}, {}, {}
        for name, slots in (("poisson_capacity", cap), ("fixed_cohort", k)):
            ids = rng.choice(n, slots, replace=False)
            calls[name], mem[name], comp[name] = compiled_round(
                cfg, definition, base, lora, mech, n, slots, k, ids, 2.0, rng
            )
        times, med = interleaved(calls, a.reps)
        row = {
            "clients": n,
            "expected_cohort": k,
            "capacity": cap,
            "overflow_per_round": sampling.poisson_capacity(n, k)[1],
            "median_round_s": med,
            "ratio_capacity_over_fixed": med["poisson_capacity"] / med["fixed_cohort"],
            "memory": mem,
            "compile_s": comp,
            "times": times,
        }
        print(json.dumps(row), flush=True)
        results.append(row)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"jax": jax.__version__, "rows": results}, indent=1))


if __name__ == "__main__":
    main()
