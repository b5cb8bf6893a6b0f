"""GPT-2: learned positions, LayerNorm, fused qkv (c_attn), GELU (tanh), tied embeddings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ..core.pytypes import Array
from .config import LoRAConfig, ModelConfig
from .layers import (
    Embed,
    LayerNorm,
    Linear,
    attend_cached,
    attention,
    attention_mask,
    cached_attention_mask,
    scan_blocks,
    scan_blocks_cached,
    stacked,
    write_rows,
)


def _lora_for(name: str, lora: LoRAConfig | None):
    return lora if lora is not None and name in lora.target_modules else None


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, lora, rngs):
        e = cfg.hidden_size
        self.c_attn = Linear(e, 3 * e, bias=True, lora=_lora_for("c_attn", lora), rngs=rngs, name="c_attn")
        self.c_proj = Linear(e, e, bias=True, lora=_lora_for("c_proj", lora), rngs=rngs, name="c_proj")
        self.shape = (cfg.num_heads, cfg.dim_head)
        self.impl = cfg.attention

    def __call__(self, x, allowed):
        b, s, e = x.shape
        h, d = self.shape
        q, k, v = jnp.split(self.c_attn(x), 3, axis=-1)
        q, k, v = (t.reshape(b, s, h, d) for t in (q, k, v))
        return self.c_proj(attention(q, k, v, allowed, d**-0.5, self.impl))

    def cached(
        self, x: Array, cache_kv: tuple[Array, Array], positions: Array, allowed: Array
    ) -> tuple[Array, tuple[Array, Array]]:
        b, t, e = x.shape
        h, d = self.shape
        q, k, v = (u.reshape(b, t, h, d) for u in jnp.split(self.c_attn(x), 3, axis=-1))
        out, cache_kv = attend_cached(q, k, v, cache_kv, positions, allowed, d**-0.5)
        return self.c_proj(out), cache_kv


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, lora, rngs):
        e, f = cfg.hidden_size, cfg.intermediate_size or 4 * cfg.hidden_size
        self.c_fc = Linear(e, f, bias=True, lora=_lora_for("c_fc", lora), rngs=rngs, name="c_fc")
        self.c_proj = Linear(f, e, bias=True, lora=_lora_for("c_proj", lora), rngs=rngs, name="c_proj")

    def __call__(self, x):
        return self.c_proj(jax.nn.gelu(self.c_fc(x), approximate=True))


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, lora, rngs):
        self.ln_1 = LayerNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = Attention(cfg, lora, rngs)
        self.ln_2 = LayerNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = MLP(cfg, lora, rngs)

    def __call__(self, x, allowed):
        x = x + self.attn(self.ln_1(x), allowed)
        return x + self.mlp(self.ln_2(x))

    def cached(
        self, x: Array, cache_kv: tuple[Array, Array], positions: Array, allowed: Array
    ) -> tuple[Array, tuple[Array, Array]]:
        h, cache_kv = self.attn.cached(self.ln_1(x), cache_kv, positions, allowed)
        x = x + h
        return x + self.mlp(self.ln_2(x)), cache_kv


class GPT2Model(nnx.Module):
    """Causal LM. `__call__(tokens [B,S], mask [B,S]) -> logits [B,S,V]` in float32."""

    def __init__(self, cfg: ModelConfig, lora: LoRAConfig | None = None, *, rngs: nnx.Rngs):
        if lora is not None:
            lora.check(cfg)
        self.config = cfg
        self.wte = Embed(cfg.vocab_size, cfg.hidden_size, rngs)
        self.wpe = Embed(cfg.max_position_embeddings, cfg.hidden_size, rngs)
        self.blocks = stacked(lambda r: Block(cfg, lora, r), cfg.num_layers, rngs)
        self.ln_f = LayerNorm(cfg.hidden_size, cfg.norm_eps)

    def __call__(self, tokens, mask=None):
        dtype = jnp.dtype(self.config.dtype)
        if mask is None:
            mask = jnp.ones(tokens.shape, bool)
        pos = jnp.arange(tokens.shape[1])
        x = self.wte(tokens, dtype) + self.wpe(pos, dtype)[None]
        x = scan_blocks(self.blocks, x, attention_mask(mask), remat=self.config.remat)
        return self.wte.attend(self.ln_f(x))

    def cached(self, tokens: Array, positions: Array, cache: dict, mask: Array | None = None) -> tuple[Array, dict]:
        """Logits [B,T,V] of new `tokens` at `positions` [B,T] over the cache, and the cache with them
        written (see LlamaModel.cached); learned positions are looked up at `positions`."""
        dtype = jnp.dtype(self.config.dtype)
        if mask is None:
            mask = jnp.ones(tokens.shape, bool)
        slots = write_rows(cache["mask"], mask.astype(bool), positions[:, 0])
        x = self.wte(tokens, dtype) + self.wpe(positions, dtype)
        allowed = cached_attention_mask(slots, positions)
        x, (k, v) = scan_blocks_cached(self.blocks, x, (cache["k"], cache["v"]), positions, allowed)
        return self.wte.attend(self.ln_f(x)), {"k": k, "v": v, "mask": slots}
