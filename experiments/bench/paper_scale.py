"""The paper's setting on one device, measured: a Llama-2-7B-shaped base in bfloat16 (random
weights: the shape and the work are what matter), 20 clients, 2 per round, 10 local AdamW steps,
batch 16, sequence 512, LoRA rank 32 (alpha 64) on q_proj and v_proj, local DP (clip 0.1, the
paper's classical sigma at epsilon 25), for as many rounds as fit in --seconds; and a population
round (N = 10,000 clients, Poisson cohorts of 1,000, central DP) on a small model.

Reports seconds per round, the projection to the paper's 200 rounds, the device's peak memory and
XLA's temp memory per client, and TFLOP/s (analytic FLOPs, as scale_bench counts them).

    python experiments/bench/paper_scale.py                 # on the device (about 3 + 1 minutes)
    python experiments/bench/paper_scale.py --scale smoke   # the same code at toy shapes (CPU, CI)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale_bench import analytic_flops  # noqa: E402  (the FLOP count every bench uses)

from fedlora_jax.config.run_config import load_config  # noqa: E402
from fedlora_jax.core import randomness
from fedlora_jax.federated import sampling  # noqa: E402
from fedlora_jax.federated.simulation import Cohort, build_round, init_state  # noqa: E402
from fedlora_jax.models import LoRAConfig, ModelConfig, init_model  # noqa: E402
from fedlora_jax.privacy import mechanisms as modes  # noqa: E402

SHAPES = {
    # Llama-2-7B: hidden 4096, 32 layers, 32 heads, MLP 11008, vocab 32000
    "paper": dict(hidden=4096, layers=32, heads=32, inter=11008, vocab=32000),
    "smoke": dict(hidden=64, layers=2, heads=4, inter=128, vocab=512),
}
PAPER_RUN = dict(clients=20, cohort=2, steps=10, batch=16, seq=512, rank=32, alpha=64, rounds=200)
SMOKE_RUN = dict(clients=4, cohort=2, steps=2, batch=2, seq=16, rank=4, alpha=8, rounds=200)
POPULATION = {  # N clients, Poisson cohorts of K, central DP, a small model
    "paper": dict(
        num=10_000, cohort=1_000, hidden=256, layers=4, heads=4, inter=1024, vocab=8192, steps=2, batch=4, seq=64
    ),
    "smoke": dict(num=40, cohort=8, hidden=32, layers=1, heads=2, inter=64, vocab=256, steps=1, batch=2, seq=8),
}


def _model(shape: dict, rank: int, alpha: int, dtype: str):
    mc = ModelConfig(
        "llama",
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        num_layers=shape["layers"],
        num_heads=shape["heads"],
        intermediate_size=shape["inter"],
        max_position_embeddings=4096,
        dtype=dtype,
    )
    lc = LoRAConfig(r=rank, alpha=alpha, target_modules=("q_proj", "v_proj"))
    definition, base, lora = init_model(mc, lc, seed=0)
    base = jax.tree.map(lambda x: x.astype(jnp.dtype(dtype)), base)
    return definition, base, lora


def _block(k: int, steps: int, batch: int, seq: int, vocab: int) -> dict:
    rng = np.random.default_rng(0)
    return {
        "tokens": rng.integers(0, vocab, (k, steps, batch, seq)).astype(np.int32),
        "attention_mask": np.ones((k, steps, batch, seq), np.int32),
        "loss_mask": np.ones((k, steps, batch, seq), np.int32),
        "num_examples": np.ones(k, np.float32),
    }


def _peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def paper_round(scale: str, seconds: float, dtype: str) -> dict:
    """The paper's round: rounds until `seconds` pass (at least 2 after the compiling one)."""
    run = PAPER_RUN if scale == "paper" else SMOKE_RUN
    shape = SHAPES[scale]
    definition, base, lora = _model(shape, run["rank"], run["alpha"], dtype)
    cfg = load_config(
        "tiny",
        [
            f"fl.num_clients={run['clients']}",
            f"fl.clients_per_round={run['cohort']}",
            f"fl.local_steps={run['steps']}",
            f"fl.batch_size={run['batch']}",
            f"fl.rounds={run['rounds']}",
            "dp.mode=local",
            "dp.noise=classical",
            "dp.epsilon=25",
            "dp.clip_a=0.1",
            "dp.clip_b=0.1",
        ],
    )
    k = run["cohort"]
    mech = modes.build(cfg, lora)
    fn = build_round(definition, cfg, mech, run["clients"])
    block = _block(k, run["steps"], run["batch"], run["seq"], shape["vocab"])
    cohort = Cohort.of(block, np.arange(k), np.full((k,), run["rank"]), np.ones(k, bool))
    state = init_state(cfg, lora, run["clients"], mech)
    t0 = time.perf_counter()
    compiled = fn.lower(state, base, cohort, randomness.round_keys(0, 0), jnp.float32(5e-5)).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    state, _ = compiled(state, base, cohort, randomness.round_keys(0, 0), jnp.float32(5e-5))  # warm
    jax.block_until_ready(state)
    times, r = [], 1
    start = time.perf_counter()
    while r < 3 or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        state, _ = compiled(state, base, cohort, randomness.round_keys(0, r), jnp.float32(5e-5))
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t)
        r += 1
        if r > 2 and time.perf_counter() - start > seconds:
            break
    per_round = float(np.median(times))
    p = dict(
        clients=k,
        steps=run["steps"],
        batch=run["batch"],
        seq=run["seq"],
        layers=shape["layers"],
        hidden=shape["hidden"],
    )
    flops = analytic_flops(p, base)
    temp = getattr(mem, "temp_size_in_bytes", None)
    return {
        "what": f"{scale}: {shape['layers']} layers x {shape['hidden']} ({dtype}), {run['clients']} clients, "
        f"{k} per round, {run['steps']} steps, batch {run['batch']}, seq {run['seq']}, rank {run['rank']}",
        "rounds_timed": len(times),
        "seconds_per_round": per_round,
        "projected_seconds_for_paper_rounds": per_round * run["rounds"],
        "compile_seconds": compile_s,
        "tflops_per_s": flops / per_round / 1e12,
        "temp_bytes_per_client": None if temp is None else temp / k,
        "device_peak_bytes": _peak_bytes(),
        "base_bytes": int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(base))),
    }


def population_round(scale: str, seconds: float) -> dict:
    """A central-DP round over a Poisson cohort (padded to its capacity) of a large population."""
    p = POPULATION[scale]
    definition, base, lora = _model(p, 8, 16, "float32")
    cfg = load_config(
        "tiny",
        [
            f"fl.num_clients={p['num']}",
            f"fl.clients_per_round={p['cohort']}",
            f"fl.local_steps={p['steps']}",
            f"fl.batch_size={p['batch']}",
            "fl.rounds=100",
            "fl.sampling=poisson",
            "dp.mode=central",
            "dp.noise=calibrate",
            "dp.epsilon=8",
            "dp.scope=global",
        ],
    )
    mech = modes.build(cfg, lora)
    fn = build_round(definition, cfg, mech, p["num"])
    ids, valid = sampling.for_config(cfg, 0, 0, mech.cohort_tail)
    cap = len(ids)
    block = _block(cap, p["steps"], p["batch"], p["seq"], p["vocab"])
    cohort = Cohort.of(block, ids, np.full((cap,), 8), valid)
    state = init_state(cfg, lora, p["num"], mech)
    compiled = fn.lower(state, base, cohort, randomness.round_keys(0, 0), jnp.float32(1e-3)).compile()
    state, _ = compiled(state, base, cohort, randomness.round_keys(0, 0), jnp.float32(1e-3))
    jax.block_until_ready(state)
    n, start = 0, time.perf_counter()
    while n < 2 or time.perf_counter() - start < seconds:
        state, _ = compiled(state, base, cohort, randomness.round_keys(0, n + 1), jnp.float32(1e-3))
        jax.block_until_ready(state)
        n += 1
    dt = (time.perf_counter() - start) / n
    return {
        "what": f"{scale}: N {p['num']:,}, Poisson cohorts of {p['cohort']:,} (capacity {cap:,}), central DP, "
        f"{p['layers']} layers x {p['hidden']}",
        "rounds_per_second": 1 / dt,
        "seconds_per_round": dt,
        "client_updates_per_second": int(valid.sum()) / dt,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", choices=list(SHAPES), default="paper")
    ap.add_argument("--seconds", type=float, default=180.0, help="time spent on the paper's rounds")
    ap.add_argument("--population-seconds", type=float, default=40.0)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "paper_scale.json"))
    args = ap.parse_args(argv)
    out = {
        "device": str(jax.devices()[0].device_kind),
        "paper": paper_round(args.scale, args.seconds, args.dtype),
        "population": population_round(args.scale, args.population_seconds),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    a, b = out["paper"], out["population"]
    print(f"| setting | {out['device']} |\n| --- | --- |")
    minutes = a["projected_seconds_for_paper_rounds"] / 60
    print(f"| {a['what']} | {a['seconds_per_round']:.3g} s/round, 200 rounds in {minutes:.3g} min, ", end="")
    print(f"{a['tflops_per_s']:.3g} TFLOP/s |")
    updates = b["client_updates_per_second"]
    print(f"| {b['what']} | {b['rounds_per_second']:.3g} rounds/s ({updates:.4g} client updates/s) |")
    return out


if __name__ == "__main__":
    main()
