"""The same federated work three ways, side by side in one process (issue: scale and speed):

1. fedlora_jax: one jitted round (vmap over clients within chunks, lax.scan over chunks);
2. a sequential JAX loop: one jitted client update + clip/noise per client, mean on the host;
3. PyTorch + PEFT, as the paper's code does it: one model, load each client's adapter, fresh
   AdamW, local steps, read the adapter back, clip and noise each tensor, average A and B.

Also: achieved FLOP/s of our round against this machine's measured matmul peak, peak memory
(XLA's compiled memory analysis) against clients_per_chunk and cohort size.

    python experiments/bench/scale_bench.py --memory    # JSON + markdown table in experiments/bench/results/
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

from fedlora_jax.config.run_config import load_config
from fedlora_jax.core import randomness
from fedlora_jax.federated.client import client_update
from fedlora_jax.federated.plan import auto_chunk
from fedlora_jax.federated.simulation import Cohort, build_round, init_state
from fedlora_jax.models import LoRAConfig, ModelConfig, init_model
from fedlora_jax.privacy import mechanisms as modes
from fedlora_jax.privacy.mechanisms import primitives as mech

REGIMES = {
    # chunk None: fl.clients_per_chunk unset (plan.auto_chunk picks it: 32 and 8 clients on CPU here)
    "cross-device": dict(hidden=64, layers=2, heads=4, vocab=512, clients=256, steps=2, batch=2, seq=32, chunk=None),
    "mid": dict(hidden=128, layers=2, heads=4, vocab=1024, clients=64, steps=4, batch=4, seq=64, chunk=None),
    "smollm2": dict(
        hidden=576, layers=30, heads=9, kv=3, inter=1536, vocab=49152, clients=4, steps=2, batch=2, seq=128, chunk=2
    ),
}
CLIP, SIGMA = 0.1, 0.02


def matmul_peak():
    a = jnp.ones((2048, 2048), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t = time.perf_counter()
    for _ in range(10):
        f(a).block_until_ready()
    return 10 * 2 * 2048**3 / (time.perf_counter() - t)


def setup(p, seed=0):
    mc = ModelConfig(
        "llama",
        vocab_size=p["vocab"],
        hidden_size=p["hidden"],
        num_layers=p["layers"],
        num_heads=p["heads"],
        num_kv_heads=p.get("kv", p["heads"]),
        intermediate_size=p.get("inter", 4 * p["hidden"]),
        max_position_embeddings=4096,
    )
    definition, base, lora = init_model(mc, LoRAConfig(r=8, alpha=16, target_modules=("q_proj", "v_proj")), seed=seed)
    rng = np.random.default_rng(seed)
    k, s, b, t = p["clients"], p["steps"], p["batch"], p["seq"]
    block = {
        "tokens": rng.integers(0, p["vocab"], (k, s, b, t)).astype(np.int32),
        "attention_mask": np.ones((k, s, b, t), np.int32),
        "loss_mask": np.ones((k, s, b, t), np.int32),
        "num_examples": np.ones(k, np.float32),
    }
    return mc, definition, base, lora, block


def cfg_for(p, chunk):
    return load_config(
        "tiny",
        [
            f"fl.num_clients={p['clients']}",
            f"fl.clients_per_round={p['clients']}",
            f"fl.local_steps={p['steps']}",
            f"fl.batch_size={p['batch']}",
            "fl.lr=1e-3",
            "fl.lr_min=0",
            "dp.mode=local",
            f"dp.clip_a={CLIP}",
            f"dp.clip_b={CLIP}",
            "dp.noise=multiplier",
            f"dp.noise_multiplier={SIGMA / CLIP}",
        ]
        + ([f"fl.clients_per_chunk={chunk}"] if chunk else []),
    )


def analytic_flops(p, base):
    """FLOPs of one round: per token, 2P forward + 2P backward (input gradients only: the base is
    frozen) over the P matmul weights (blocks' kernels and the output head), plus attention
    (QK^T and PV: 4 S d per layer forward, twice that backward). XLA's cost analysis counts a
    loop body once, so it cannot be used for scanned layers and steps."""
    kernels = sum(
        int(np.prod(x.shape))
        for path, x in jax.tree_util.tree_flatten_with_path(base)[0]
        if getattr(path[-1], "key", "") == "kernel"
    )
    # the output head's kernel is among `kernels` (it was once counted twice here)
    tokens = p["clients"] * p["steps"] * p["batch"] * p["seq"]
    per_token = 4 * kernels + 12 * p["layers"] * p["seq"] * p["hidden"]
    return tokens * per_token


def compiled_round(p, definition, base, lora, block, chunk):
    """Our round of regime p (chunk None: unset, plan.auto_chunk picks it), compiled, and its arguments."""
    k = p["clients"]
    cfg = cfg_for(p, chunk)
    fn = build_round(definition, cfg, modes.build(cfg, lora), k)
    cohort = Cohort.of(block, np.arange(k), np.full((k,), 8), np.ones(k, bool))
    args = (init_state(cfg, lora, k), base, cohort, randomness.round_keys(0, 0), jnp.float32(1e-3))
    return fn.lower(*args).compile(), args


def ours(p, definition, base, lora, block, chunk, reps=3):
    t = time.perf_counter()
    compiled, args = compiled_round(p, definition, base, lora, block, chunk)
    compile_s = time.perf_counter() - t
    jax.block_until_ready(compiled(*args))
    t = time.perf_counter()
    for _ in range(reps):
        jax.block_until_ready(compiled(*args))
    dt = (time.perf_counter() - t) / reps
    mem = compiled.memory_analysis()
    return {
        "round_s": dt,
        "client_updates_per_s": p["clients"] / dt,
        "compile_s": compile_s,
        "flops": analytic_flops(p, base),
        "temp_bytes": getattr(mem, "temp_size_in_bytes", None),
    }


def sequential_jax(p, definition, base, lora, block, reps=1):
    @jax.jit
    def one(base, b, cid):  # base as an argument: closed over, XLA would constant-fold the weights
        local, _, _ = client_update(definition, base, lora, b, 1e-3)
        return mech.privatize(
            local,
            lora,
            jax.random.fold_in(randomness.key(0, "client_noise", 0), cid),
            clip_a=CLIP,
            clip_b=CLIP,
            sigma_a=SIGMA,
            sigma_b=SIGMA,
        )

    batches = [
        {k: jnp.asarray(block[k][i]) for k in ("tokens", "attention_mask", "loss_mask")} for i in range(p["clients"])
    ]
    jax.block_until_ready(one(base, batches[0], 0))
    t = time.perf_counter()
    for _ in range(reps):
        acc = None
        for i, b in enumerate(batches):
            out = one(base, b, i)
            acc = out if acc is None else jax.tree.map(jnp.add, acc, out)
        jax.block_until_ready(jax.tree.map(lambda x: x / p["clients"], acc))
    dt = (time.perf_counter() - t) / reps
    return {"round_s": dt, "client_updates_per_s": p["clients"] / dt}


def torch_peft(p, block, max_clients=None):
    import torch
    import transformers as tf
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=p["vocab"],
        hidden_size=p["hidden"],
        intermediate_size=p.get("inter", 4 * p["hidden"]),
        num_hidden_layers=p["layers"],
        num_attention_heads=p["heads"],
        num_key_value_heads=p.get("kv", p["heads"]),
        max_position_embeddings=4096,
    )
    model = get_peft_model(
        tf.LlamaForCausalLM(cfg), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    )
    model.train()
    glob = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    n = min(p["clients"], max_clients or p["clients"])
    t = time.perf_counter()
    total = {k: torch.zeros_like(v) for k, v in glob.items()}
    for c in range(n):
        set_peft_model_state_dict(model, glob)
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-3, weight_decay=0.0)
        for s in range(p["steps"]):
            ids = torch.from_numpy(block["tokens"][c, s]).long()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        with torch.no_grad():
            for k, v in get_peft_model_state_dict(model).items():
                v = v * torch.clamp(CLIP / (v.norm() + 1e-12), max=1.0)
                total[k] += v + SIGMA * torch.randn_like(v)
    _ = {k: v / n for k, v in total.items()}
    dt = time.perf_counter() - t
    return {"clients_timed": n, "seconds": dt, "client_updates_per_s": n / dt}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--regimes", default="cross-device,mid,smollm2")
    ap.add_argument("--out", default="experiments/bench/results/scale.json")
    ap.add_argument("--memory", action="store_true", help="also sweep chunk size and cohort size (cross-device)")
    args = ap.parse_args()
    res = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "jax": jax.__version__,
            "devices": [str(d) for d in jax.devices()],
        },
        "matmul_peak_flops": matmul_peak(),
        "regimes": {},
    }
    for name in args.regimes.split(","):
        p = REGIMES[name]
        _, definition, base, lora, block = setup(p)
        r = {"params": p}
        r["ours"] = ours(p, definition, base, lora, block, p["chunk"])
        r["chunk"] = p["chunk"] or auto_chunk(p["clients"], p["batch"] * p["seq"], jax.default_backend())
        whole = r["chunk"] < p["clients"]  # the whole cohort in one chunk, where that is another round
        r["ours_whole_cohort"] = ours(p, definition, base, lora, block, p["clients"]) if whole else r["ours"]
        r["sequential_jax"] = sequential_jax(p, definition, base, lora, block)
        r["torch_peft"] = torch_peft(p, block, max_clients=32)
        r["speedup_vs_torch_peft"] = r["ours"]["client_updates_per_s"] / r["torch_peft"]["client_updates_per_s"]
        r["speedup_vs_sequential_jax"] = r["ours"]["client_updates_per_s"] / r["sequential_jax"]["client_updates_per_s"]
        if r["ours"]["flops"]:
            r["achieved_flops"] = r["ours"]["flops"] / r["ours"]["round_s"]
            r["fraction_of_matmul_peak"] = r["achieved_flops"] / res["matmul_peak_flops"]
        res["regimes"][name] = r
        print(name, json.dumps({k: v for k, v in r.items() if k != "params"}, indent=1), flush=True)
    if args.memory:
        from fedlora_jax.federated.plan import measure

        p = REGIMES["cross-device"]
        _, d, b, lo, _ = setup(p)
        shapes = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), t)
        cfg = load_config(
            "tiny",
            [
                f"fl.local_steps={p['steps']}",
                f"fl.batch_size={p['batch']}",
                f"data.seq_len={p['seq']}",
                "dp.mode=local",
            ],
        )
        mem = {
            "chunk_sweep_cohort_1024": {
                c: measure(cfg, d, shapes(b), shapes(lo), c, 1024)["temp_bytes"] for c in (32, 64, 128, 256)
            },
            "cohort_sweep_chunk_128": {},
        }
        for cohort in (256, 1024, 4096, 10000):
            m = measure(cfg, d, shapes(b), shapes(lo), 128, cohort)
            mem["cohort_sweep_chunk_128"][cohort] = {
                "temp_bytes": m["temp_bytes"],
                "argument_bytes": m["argument_bytes"],
            }
        res["memory"] = mem
        print(json.dumps(mem, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2, default=str))
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from table import write

    print(write(args.out))  # the markdown table beside the JSON


if __name__ == "__main__":
    main()
