"""Round time and memory of central DP at N = 10,000 clients: the Poisson cohort padded to its
capacity (the cost of K, not N) beside a fixed cohort of exactly K slots, for K = 100 and 1,000,
on the tiny model; interleaved and repeated. Memory is XLA's own account of the compiled round
(arguments + temporaries), which does not depend on the machine's noise.

    python experiments/bench/population_bench.py [--clients 10000] [--cohorts 100 1000] [--reps 3]
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


def _round(cfg, definition, base, lora, mech, n, slots, k, rng):
    shape = (slots, cfg.fl.local_steps, cfg.fl.batch_size, cfg.data.seq_len)
    block = {
        "tokens": jnp.asarray(rng.integers(0, 200, shape), jnp.int32),
        "attention_mask": jnp.ones(shape, jnp.int32),
        "loss_mask": jnp.ones(shape, jnp.int32),
        "num_examples": jnp.full((slots,), 2.0),
    }
    valid = np.zeros(slots, bool)
    valid[: min(k, slots)] = True
    fn = make_round(definition, cfg, mech, n)
    args = (
        base,
        block,
        jnp.asarray(rng.choice(n, slots, replace=False), jnp.int32),
        jnp.full((slots,), cfg.lora.r, jnp.int32),
        jnp.asarray(valid),
        randomness.round_keys(0, 0),
        jnp.float32(1e-3),
    )
    state = init_state(cfg, lora, n, mech)
    t = time.perf_counter()
    compiled = fn.lower(state, *args).compile()
    compile_s = time.perf_counter() - t
    mem = compiled.memory_analysis()
    mib = {
        "arguments_mib": mem.argument_size_in_bytes / 2**20,
        "temporaries_mib": mem.temp_size_in_bytes / 2**20,
        "block_mib": sum(x.nbytes for x in block.values()) / 2**20,
    }
    return (lambda: jax.block_until_ready(compiled(state, *args))), mib, compile_s


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
            calls[name], mem[name], comp[name] = _round(cfg, definition, base, lora, mech, n, slots, k, rng)
            calls[name]()  # warm
        times = {name: [] for name in calls}
        for _ in range(a.reps):  # interleaved
            for name, call in calls.items():
                t = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - t)
        med = {name: float(np.median(v)) for name, v in times.items()}
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
