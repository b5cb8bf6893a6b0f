"""What our round is compared with: sequential JAX (the same arithmetic, one client at a time) and the
paper's code path (PyTorch + PEFT, a sequential loop over clients)."""

from __future__ import annotations

import gc
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedlora_jax.core import randomness
from fedlora_jax.federated.algorithms import server_optimizer
from fedlora_jax.federated.client import client_update
from fedlora_jax.privacy import mechanisms as modes

from .regimes import CLIP, LORA, Z


def sequential_round(definition, cfg, lora, base, block, k, lr=1e-3):
    """A jitted single-client update (local training + the mechanism's release, folded into a
    running sum) in a Python loop over clients, then the mean and the server step: the same
    arithmetic as our round, one client at a time. Returns call() -> new global adapter."""
    fl = cfg.fl
    mech = modes.build(cfg, lora, np.ones(k))
    keys = randomness.round_keys(cfg.seed, 0)
    server = server_optimizer(fl)

    mstate = mech.init_state()  # the mechanism's server state (empty for local DP)

    @jax.jit
    def one(base, g, batches, cid, acc, keys, lr, mstate):  # base as an argument: closed over, XLA would fold it
        local, metrics, _ = client_update(
            definition, base, g, batches, lr, weight_decay=fl.weight_decay, freeze_a=cfg.lora.freeze_a
        )
        released = mech.release(local, g, jax.random.fold_in(keys["client_noise"], cid), None, mstate)
        # every client has weight 1 here (one example each, or uniform under DP): a plain sum
        return jax.tree.map(jnp.add, acc, released), metrics["loss"]

    @jax.jit
    def finish(g, acc, n):
        agg = jax.tree.map(lambda s: s / n, acc)
        updates, _ = server.update(jax.tree.map(jnp.subtract, g, agg), server.init(g), g)
        return optax.apply_updates(g, updates)

    per_client = [{key: block[key][i] for key in ("tokens", "attention_mask", "loss_mask")} for i in range(k)]
    zeros = jax.tree.map(jnp.zeros_like, lora)
    lr = jnp.float32(lr)

    def call(return_losses=False):
        acc, losses = zeros, []
        for i, b in enumerate(per_client):
            acc, loss = one(base, lora, b, jnp.int32(i), acc, keys, lr, mstate)
            losses.append(loss)
        out = jax.block_until_ready(finish(lora, acc, jnp.float32(k)))
        return (out, jnp.stack(losses)) if return_losses else out

    return call


def torch_env():
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cuda":  # JAX's default float32 matmul precision on Ampere+ GPUs is TF32: match it
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return torch, dev


def torch_round(p, block, max_clients):
    """The paper's code path: one model, for each client load the global adapter, a fresh AdamW,
    local steps, read the adapter back, clip and noise each tensor, sum; then the mean.
    Returns (call() -> seconds for n clients, n, info, cleanup())."""
    import transformers as tf
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    torch, dev = torch_env()
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=p["vocab"],
        hidden_size=p["hidden"],
        intermediate_size=p.get("inter", 4 * p["hidden"]),
        num_hidden_layers=p["layers"],
        num_attention_heads=p["heads"],
        num_key_value_heads=p.get("kv", p["heads"]),
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        tie_word_embeddings=p.get("tie", False),
    )
    dtype = torch.bfloat16 if p.get("dtype") == "bfloat16" else torch.float32
    with torch.device(dev):
        model = tf.LlamaForCausalLM(cfg)
    model = model.to(dtype)
    model = get_peft_model(
        model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules=list(LORA["targets"]))
    )
    model.train()
    glob = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    n = min(p["clients"], max_clients)
    tokens = torch.from_numpy(np.asarray(block["tokens"][:n])).long().to(dev)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def call():
        sync()
        t = time.perf_counter()
        total = {k: torch.zeros_like(v) for k, v in glob.items()}
        for c in range(n):
            set_peft_model_state_dict(model, glob)
            opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-3, weight_decay=0.0)
            for s in range(p["steps"]):
                ids = tokens[c, s]
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                for k, v in get_peft_model_state_dict(model).items():
                    v = v * torch.clamp(CLIP / (v.norm() + 1e-12), max=1.0)
                    total[k] += v + Z * CLIP * torch.randn_like(v)
        _ = {k: v / n for k, v in total.items()}
        sync()
        return time.perf_counter() - t

    info = {
        "device": dev,
        "dtype": str(dtype),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "adapter_dtype": str(next(q for q in model.parameters() if q.requires_grad).dtype),
    }

    def cleanup():
        nonlocal model
        del model
        gc.collect()
        if dev == "cuda":
            torch.cuda.empty_cache()

    return call, n, info, cleanup
