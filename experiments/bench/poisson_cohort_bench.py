"""Central DP over a large population: one round with every client slot masked (wave 1: N slots)
against the Poisson cohort padded to its capacity (C slots), same model, interleaved and repeated.

    python experiments/bench/poisson_cohort_bench.py [--clients 1000] [--per-round 10] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fedlora_jax import randomness, sampling
from fedlora_jax.config import load_config
from fedlora_jax.models.factory import build_model
from fedlora_jax.privacy import modes
from fedlora_jax.simulation import init_state, make_round


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
    seq = cfg.data.seq_len
    rng = np.random.default_rng(0)

    def setup(slots):
        shape = (slots, cfg.fl.local_steps, cfg.fl.batch_size, seq)
        block = {
            "tokens": jnp.asarray(rng.integers(0, 200, shape), jnp.int32),
            "attention_mask": jnp.ones(shape, jnp.int32),
            "loss_mask": jnp.ones(shape, jnp.int32),
            "num_examples": jnp.full((slots,), 10.0),
        }
        valid = np.zeros(slots, bool)
        valid[:k] = True
        fn = make_round(definition, cfg, mech, n)
        args = (
            base,
            block,
            jnp.arange(slots, dtype=jnp.int32),
            jnp.full((slots,), cfg.lora.r, jnp.int32),
            jnp.asarray(valid),
            randomness.round_keys(0, 0),
            jnp.float32(1e-3),
        )
        state = init_state(cfg, lora, n)
        jax.block_until_ready(fn(state, *args))  # compile
        return lambda: jax.block_until_ready(fn(state, *args))

    calls = {"all_slots": setup(n), "capacity_slots": setup(cap)}
    times = {name: [] for name in calls}
    for _ in range(a.reps):  # interleaved
        for name, call in calls.items():
            t = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t)
    med = {name: float(np.median(v)) for name, v in times.items()}
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
