"""Models and our round: a random Llama-shaped base and fresh adapters from a row of the regimes' table, the
run config, the compiled round, and its analytic FLOPs and rates (FLOPs: see the entry point's docstring)."""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from fedlora_jax.config import load_config
from fedlora_jax.core import randomness
from fedlora_jax.federated.simulation import Cohort, build_round, init_state
from fedlora_jax.models import LoRAConfig, ModelConfig, abstract_model
from fedlora_jax.privacy import mechanisms as modes

from .regimes import CLIP, LORA, Z


def model_config(p, dtype=None):
    return ModelConfig(
        "llama",
        vocab_size=p["vocab"],
        hidden_size=p["hidden"],
        num_layers=p["layers"],
        num_heads=p["heads"],
        num_kv_heads=p.get("kv", p["heads"]),
        intermediate_size=p.get("inter", 4 * p["hidden"]),
        max_position_embeddings=4096,
        tie_word_embeddings=p.get("tie", False),
        dtype=dtype or p.get("dtype", "float32"),
    )


def lora_config():
    return LoRAConfig(r=LORA["r"], alpha=LORA["alpha"], target_modules=LORA["targets"])


def random_weights(shapes, lora_shapes, dtype, seed=0, head_scale=1.0):
    """(base, lora): HF-style random base weights (normal 0.02; norms 1, biases 0) in `dtype`, and
    fresh adapters as PEFT makes them (A ~ U(+-1/sqrt(in)), B = 0), made on the device in one jit."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    lflat, ltreedef = jax.tree_util.tree_flatten_with_path(lora_shapes)

    @jax.jit
    def make(key):
        out = []
        for i, (path, s) in enumerate(flat):
            name = getattr(path[-1], "key", "")
            if name == "scale":
                x = jnp.ones(s.shape, dtype)
            elif name == "bias":
                x = jnp.zeros(s.shape, dtype)
            else:
                std = 0.02 * (head_scale if getattr(path[0], "key", "") == "lm_head" else 1.0)
                x = (std * jax.random.normal(jax.random.fold_in(key, i), s.shape, jnp.float32)).astype(dtype)
            out.append(x)
        lo = []
        for i, (path, s) in enumerate(lflat):
            if getattr(path[-1], "key", "") == "lora_a":
                bound = 1.0 / math.sqrt(s.shape[-1])
                lo.append(jax.random.uniform(jax.random.fold_in(key, 100_000 + i), s.shape, jnp.float32, -bound, bound))
            else:
                lo.append(jnp.zeros(s.shape, jnp.float32))
        return jax.tree_util.tree_unflatten(treedef, out), jax.tree_util.tree_unflatten(ltreedef, lo)

    return make(randomness.key(seed, "model_init"))


def setup(p, dtype=None, seed=0, head_scale=1.0):
    """(model config, definition, base, lora, block) for a row of the regimes' table."""
    mc = model_config(p, dtype)
    definition, shapes, lora_shapes = abstract_model(mc, lora_config())
    base, lora = random_weights(shapes, lora_shapes, jnp.dtype(mc.dtype), seed, head_scale)
    return mc, definition, base, lora, random_block(p, seed)


def random_block(p, seed=0):
    rng = np.random.default_rng(seed)
    k, s, b, t = p["clients"], p["steps"], p["batch"], p["seq"]
    block = {
        "tokens": rng.integers(0, p["vocab"], (k, s, b, t)).astype(np.int32),
        "attention_mask": np.ones((k, s, b, t), np.int32),
        "loss_mask": np.ones((k, s, b, t), np.int32),
        "num_examples": np.ones(k, np.float32),
    }
    return {key: jnp.asarray(v) for key, v in block.items()}


def run_config(p, chunk=None, mode="local", lr=1e-3, model=None):
    """The tiny preset with the row's cohort (all clients every round), local steps, batch and sequence
    length, and DP `mode` (local: clip CLIP per matrix, noise multiplier Z); `model`: model.* keys (a
    shape, model.attention, model.remat) for what reads the config's model (plan)."""
    k = p["clients"]
    overrides = {
        "fl.num_clients": k,
        "fl.clients_per_round": k,
        "fl.local_steps": p["steps"],
        "fl.batch_size": p["batch"],
        "fl.lr": lr,
        "fl.lr_min": lr,
        "dp.mode": mode,
        "dp.noise": "multiplier",
        "dp.noise_multiplier": Z,
        "dp.clip_a": CLIP,
        "dp.clip_b": CLIP,
        "data.seq_len": p["seq"],
        **({"fl.clients_per_chunk": chunk} if chunk else {}),
        **{f"model.{key}": value for key, value in (model or {}).items()},
    }
    return load_config("tiny", [f"{key}={value}" for key, value in overrides.items()])


def round_args(cfg, base, block, k, lr):
    return (
        base,
        Cohort.of(block, np.arange(k), np.full((k,), cfg.lora.r), np.ones(k, bool)),
        randomness.round_keys(cfg.seed, 0),
        jnp.float32(lr),
    )


def compiled_round(definition, cfg, lora, base, block, k, lr=1e-3):
    """(call() -> (state, metrics) blocked, compile seconds, compiled) of our round."""
    mech = modes.build(cfg, lora, np.ones(k))
    fn = build_round(definition, cfg, mech, k)
    state = init_state(cfg, lora, k, mech)
    args = round_args(cfg, base, block, k, lr)
    t = time.perf_counter()
    compiled = fn.lower(state, *args).compile()
    compile_s = time.perf_counter() - t
    return (lambda: jax.block_until_ready(compiled(state, *args))), compile_s, compiled


def flops_of(mc, base, lora, p, clients):
    """Analytic FLOPs of one round of `clients` clients (see the module docstring): executed
    (4 per frozen kernel parameter, 6 per LoRA parameter, attention) and the 6NT convention."""
    kernels = sum(
        int(np.prod(x.shape))
        for path, x in jax.tree_util.tree_flatten_with_path(base)[0]
        if getattr(path[-1], "key", "") == "kernel"
    )
    if mc.tie_word_embeddings:  # the head is the embedding matrix
        kernels += mc.vocab_size * mc.hidden_size
    lora_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(lora))
    tokens = clients * p["steps"] * p["batch"] * p["seq"]
    attn = 12 * mc.num_layers * p["seq"] * mc.num_heads * mc.dim_head
    return {
        "tokens": tokens,
        "base_kernel_params": kernels,
        "lora_params": lora_params,
        "executed": tokens * (4 * kernels + 6 * lora_params + attn),
        "six_nt": tokens * (6 * (kernels + lora_params) + attn),
    }


FRACTION_OF = {"peak_flops": "fraction_of_peak", "measured_matmul_flops": "fraction_of_measured_matmul"}


def rates(machine, fl, seconds, of=tuple(FRACTION_OF)):
    """The achieved FLOP/s of a round of `seconds` (executed and 6NT) and its share of the machine's
    figures named in `of` (the card's peak, a measured matmul) where known."""
    r = {"achieved_flops": fl["executed"] / seconds, "achieved_flops_6nt": fl["six_nt"] / seconds}
    for key in of:
        if machine.get(key):
            r[FRACTION_OF[key]] = r["achieved_flops"] / machine[key]
    return r
