"""Central DP over a large population: one round with every client slot masked (wave 1: N slots)
against the Poisson cohort padded to its capacity (C slots), same model, interleaved and repeated.

    python experiments/bench/poisson_cohort_bench.py [--clients 1000] [--per-round 10] [--reps 5]
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
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--per-round", type=int, default=10)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="experiments/bench/results/poisson_cohort.json")
    a = ap.parse_args()
    n, k = a.clients, a.per_round
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
            "fl.clients_per_chunk=64",
        ],
    )
    definition, base, lora, _, _ = build_model(cfg)
    mech = modes.build(cfg, lora)
    cap = sampling.cohort_slots(n, k, "poisson")
    rng = np.random.default_rng(0)

    calls = {
        name: compiled_round(cfg, definition, base, lora, mech, n, slots, k, np.arange(slots), 10.0, rng)[0]
        for name, slots in (("all_slots", n), ("capacity_slots", cap))
    }
    times, med = interleaved(calls, a.reps)
    res = {
        "clients": n,
        "expected_cohort": k,
        "capacity": cap,
        "overflow_per_round": sampling.poisson_capacity(n, k)[1],
        "median_round_s": med,
        "speedup": med["all_slots"] / med["capacity_slots"],
        "times": times,
        "jax": jax.__version__,
    }
    print(json.dumps(res, indent=1))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
