"""Shared by the cohort benchmarks (poisson_cohort_bench.py, population_bench.py): one compiled
central-DP round over a given number of client slots, and interleaved, repeated timing."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from fedlora_jax.core import randomness
from fedlora_jax.federated.simulation import Cohort, build_round, init_state


def compiled_round(cfg, definition, base, lora, mech, n, slots, k, ids, examples, rng):
    """(call, XLA memory analysis in MiB, compile seconds) of a round over `slots` client slots of
    which the first min(k, slots) are valid; the data is random tokens."""
    shape = (slots, cfg.fl.local_steps, cfg.fl.batch_size, cfg.data.seq_len)
    block = {
        "tokens": jnp.asarray(rng.integers(0, 200, shape), jnp.int32),
        "attention_mask": jnp.ones(shape, jnp.int32),
        "loss_mask": jnp.ones(shape, jnp.int32),
        "num_examples": jnp.full((slots,), float(examples)),
    }
    valid = np.zeros(slots, bool)
    valid[: min(k, slots)] = True
    args = (
        base,
        Cohort.of(block, ids, np.full((slots,), cfg.lora.r), valid),
        randomness.round_keys(0, 0),
        jnp.float32(1e-3),
    )
    state = init_state(cfg, lora, n, mech)
    t = time.perf_counter()
    compiled = build_round(definition, cfg, mech, n).lower(state, *args).compile()
    compile_s = time.perf_counter() - t
    mem = compiled.memory_analysis()
    mib = {
        "arguments_mib": mem.argument_size_in_bytes / 2**20,
        "temporaries_mib": mem.temp_size_in_bytes / 2**20,
        "block_mib": sum(x.nbytes for x in block.values()) / 2**20,
    }
    return (lambda: jax.block_until_ready(compiled(state, *args))), mib, compile_s


def interleaved(calls: dict, reps: int) -> tuple[dict, dict]:
    """Each call once to warm up, then `reps` rounds of every call in turn: (times, medians)."""
    for call in calls.values():
        call()
    times = {name: [] for name in calls}
    for _ in range(reps):
        for name, call in calls.items():
            t = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t)
    return times, {name: float(np.median(v)) for name, v in times.items()}
