"""Engine, data and privacy figures on this machine (one run, side by side):

- a round of the tiny preset with 64 clients (wall time per round after compile, peak RSS);
- clip-and-noise time over a round of 64 clients, as a fraction of that round;
- accountant time for 10,000 rounds (local exact composition, central PLD and RDP);
- tokenization throughput on 20,000 Alpaca-shaped synthetic examples (byte tokenizer and the
  SmolLM2 tokenizer), and round-block assembly time relative to a tiny round.

    python experiments/bench/engine_bench.py [--out experiments/bench/results/engine.json]
"""

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fedlora_jax.config.run_config import load_config
from fedlora_jax.core import randomness
from fedlora_jax.data import tokenize_examples
from fedlora_jax.data.pipeline import byte_tokenizer, prepare
from fedlora_jax.federated.simulation import Cohort, build_round, init_state
from fedlora_jax.privacy import accounting as acc
from fedlora_jax.privacy import mechanisms as modes
from fedlora_jax.privacy.mechanisms import primitives as mech
from fedlora_jax.runs.runner import build_model


def timed(fn, n=5):
    fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="experiments/bench/results/engine.json")
    args = ap.parse_args()
    res = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__}}

    # --- a round of the tiny preset with 64 clients, local DP
    cfg = load_config(
        "tiny",
        [
            "fl.num_clients=64",
            "fl.clients_per_round=64",
            "data.synthetic_examples=4096",
            "dp.mode=local",
            "dp.noise=multiplier",
            "dp.noise_multiplier=1.0",
        ],
    )
    definition, base, lora, tok, _ = build_model(cfg)
    data = prepare(cfg, tok)
    noise = modes.build(cfg, lora)
    batcher = data.batcher(cfg.fl.local_steps, cfg.fl.batch_size, 0)
    ids = np.arange(64)
    parts = np.zeros(64, np.int64)
    block = {k: jnp.asarray(v) for k, v in batcher.block(ids, parts).items()}
    round_fn = build_round(definition, cfg, noise, 64)
    state = init_state(cfg, lora, 64)
    call = lambda: jax.block_until_ready(
        round_fn(
            state,
            base,
            Cohort.of(block, ids, np.full((64,), cfg.lora.r), np.ones(64, bool)),
            randomness.round_keys(0, 0),
            jnp.float32(1e-3),
        )
    )
    t = time.perf_counter()
    call()
    res["tiny_round_64_clients"] = {
        "compile_and_first_s": time.perf_counter() - t,
        "round_s": timed(call),
        "shape": list(block["tokens"].shape),
    }
    # --- clip and noise of 64 clients' adapters alone
    stacked = jax.tree.map(lambda x: jnp.stack([x] * 64), lora)
    priv = jax.jit(
        jax.vmap(
            lambda lo, c: mech.privatize(
                lo,
                lora,
                jax.random.fold_in(randomness.key(1, "client_noise", 0), c),
                clip_a=0.1,
                clip_b=0.1,
                sigma_a=0.1,
                sigma_b=0.1,
            )
        )
    )
    cn = timed(lambda: jax.block_until_ready(priv(stacked, jnp.arange(64))), n=20)
    res["clip_and_noise_64_clients_s"] = cn
    res["clip_and_noise_fraction_of_round"] = cn / res["tiny_round_64_clients"]["round_s"]
    # --- block assembly (host) for 64 clients
    asm = timed(lambda: batcher.block(ids, parts), n=10)
    res["block_assembly_64_clients_s"] = asm
    res["block_assembly_fraction_of_round"] = asm / res["tiny_round_64_clients"]["round_s"]
    # --- accountant time for 10,000 rounds
    t = time.perf_counter()
    acc.gaussian_epsilon(5.0, 10_000, 1e-5)
    res["accountant_local_exact_10k_rounds_s"] = time.perf_counter() - t
    t = time.perf_counter()
    acc.gaussian_epsilon_rdp(5.0, 10_000, 1e-5)
    res["accountant_local_rdp_10k_rounds_s"] = time.perf_counter() - t
    t = time.perf_counter()
    acc.sampled_epsilon(1.0, 0.01, 10_000, 1e-5)
    res["accountant_central_pld_and_rdp_10k_rounds_s"] = time.perf_counter() - t
    ledger = acc.Ledger("local", 1000, 5.0, 1e-5)
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    for _ in range(10_000):
        ledger.record(rng.choice(1000, 10, replace=False))
        ledger.worst()
    res["ledger_10k_rounds_1000_clients_s"] = time.perf_counter() - t
    # --- tokenization throughput, 20,000 Alpaca-shaped examples
    import datasets

    from fedlora_jax.data import synthetic

    rows = synthetic.generate(20_000, seed=0)
    for r in rows:
        r["instruction"] = r["instruction"] + " Explain your answer briefly and show the steps you take."
        r["output"] = r["output"] + " because that is the result of the operation described above."
    ds = datasets.Dataset.from_list(rows)
    toks = {"byte": byte_tokenizer()}
    try:
        from fedlora_jax.models.hub import default_gguf_path, load_tokenizer

        toks["smollm2"] = load_tokenizer(default_gguf_path())
    except ValueError:
        pass
    res["tokenize_examples_per_s"] = {}
    for name, tk in toks.items():
        t = time.perf_counter()
        tokenize_examples(ds, tk, "alpaca", 512)
        res["tokenize_examples_per_s"][name] = len(ds) / (time.perf_counter() - t)
    res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
