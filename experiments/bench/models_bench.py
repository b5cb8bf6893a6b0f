"""Model benchmarks: compile time of forward+backward vs depth (SmolLM2-135M, 30 layers, against
the same width at 2 layers) and scoring throughput of SmolLM2-135M on this machine.

    python experiments/bench/models_bench.py [--out experiments/bench/results/models.json]
"""

import argparse
import json
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fedlora_jax.models import LoRAConfig, abstract_model, init_lora, mean_nll
from fedlora_jax.models.hub import load_model


def compile_seconds(definition, base, lora, tokens, mask):
    f = jax.jit(jax.value_and_grad(lambda lo, b, t, m: mean_nll(definition, b, lo, t, m)))
    t = time.perf_counter()
    f.lower(lora, base, tokens, mask).compile()
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="experiments/bench/results/models.json")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args()
    lora_cfg = LoRAConfig(r=8, alpha=16, target_modules=("q_proj", "v_proj"))
    lm = load_model("default", lora_cfg, tokenizer=False)
    cfg = lm.config
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (args.batch, args.seq)), jnp.int32)
    mask = jnp.ones_like(tokens)
    res = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "jax": jax.__version__,
            "devices": [str(d) for d in jax.devices()],
        }
    }
    # compile time against depth: the same model cut to 2 layers
    shallow_cfg = cfg.replace(num_layers=2)
    shallow_def = abstract_model(shallow_cfg, lora_cfg)[0]
    shallow_base = {k: (jax.tree.map(lambda x: x[:2], v) if k == "blocks" else v) for k, v in lm.base.items()}
    res["compile_fwd_bwd_s"] = {
        "layers_2": compile_seconds(shallow_def, shallow_base, init_lora(shallow_def), tokens, mask),
        "layers_30": compile_seconds(lm.definition, lm.base, lm.lora, tokens, mask),
    }
    res["compile_fwd_bwd_s"]["ratio_30_vs_2"] = (
        res["compile_fwd_bwd_s"]["layers_30"] / res["compile_fwd_bwd_s"]["layers_2"]
    )
    # scoring throughput (forward + NLL) at batch x seq
    f = jax.jit(lambda b, lo, t, m: mean_nll(lm.definition, b, lo, t, m))
    f(lm.base, lm.lora, tokens, mask).block_until_ready()
    n, t = 5, time.perf_counter()
    for _ in range(n):
        f(lm.base, lm.lora, tokens, mask).block_until_ready()
    dt = (time.perf_counter() - t) / n
    res["score_tokens_per_s"] = args.batch * args.seq / dt
    res["score_shape"] = [args.batch, args.seq]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
