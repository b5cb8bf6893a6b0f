"""The Llama family (Llama 2/3, Mistral, TinyLlama, SmolLM) and Qwen2 (the same block with q/k/v
biases): RMSNorm, RoPE, grouped-query attention, SwiGLU, tied or untied embeddings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ..core.pytypes import Array
from .config import LoRAConfig, ModelConfig
from .layers import (
    Embed,
    Linear,
    RMSNorm,
    apply_rope,
    attend_cached,
    attention,
    attention_mask,
    cached_attention_mask,
    rope_inv_freq,
    scan_blocks,
    scan_blocks_cached,
    stacked,
    write_rows,
)


def _lora_for(name: str, lora: LoRAConfig | None):
    return lora if lora is not None and name in lora.target_modules else None


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, lora: LoRAConfig | None, rngs: nnx.Rngs):
        h, kv, d, e = cfg.num_heads, cfg.kv_heads, cfg.dim_head, cfg.hidden_size
        mk = lambda name, i, o, bias: Linear(i, o, bias=bias, lora=_lora_for(name, lora), rngs=rngs, name=name)
        self.q_proj = mk("q_proj", e, h * d, cfg.qkv_bias)
        self.k_proj = mk("k_proj", e, kv * d, cfg.qkv_bias)
        self.v_proj = mk("v_proj", e, kv * d, cfg.qkv_bias)
        self.o_proj = mk("o_proj", h * d, e, False)
        self.shape = (h, kv, d)
        self.impl = cfg.attention

    def __call__(self, x, cos, sin, allowed):
        b, s, _ = x.shape
        h, kv, d = self.shape
        q = apply_rope(self.q_proj(x).reshape(b, s, h, d), cos, sin)
        k = apply_rope(self.k_proj(x).reshape(b, s, kv, d), cos, sin)
        v = self.v_proj(x).reshape(b, s, kv, d)
        return self.o_proj(attention(q, k, v, allowed, d**-0.5, self.impl))

    def cached(
        self, x: Array, cache_kv: tuple[Array, Array], positions: Array, cos: Array, sin: Array, allowed: Array
    ) -> tuple[Array, tuple[Array, Array]]:
        """The new tokens' attention over the cache (keys/values written at `positions`)."""
        b, t, _ = x.shape
        h, kv, d = self.shape
        q = apply_rope(self.q_proj(x).reshape(b, t, h, d), cos, sin)
        k = apply_rope(self.k_proj(x).reshape(b, t, kv, d), cos, sin)
        v = self.v_proj(x).reshape(b, t, kv, d)
        out, cache_kv = attend_cached(q, k, v, cache_kv, positions, allowed, d**-0.5)
        return self.o_proj(out), cache_kv


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, lora: LoRAConfig | None, rngs: nnx.Rngs):
        e, f = cfg.hidden_size, cfg.intermediate_size
        mk = lambda name, i, o: Linear(i, o, bias=False, lora=_lora_for(name, lora), rngs=rngs, name=name)
        self.gate_proj = mk("gate_proj", e, f)
        self.up_proj = mk("up_proj", e, f)
        self.down_proj = mk("down_proj", f, e)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, lora: LoRAConfig | None, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = Attention(cfg, lora, rngs)
        self.post_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = MLP(cfg, lora, rngs)

    def __call__(self, x, cos, sin, allowed):
        x = x + self.attn(self.input_norm(x), cos, sin, allowed)
        return x + self.mlp(self.post_norm(x))

    def cached(
        self, x: Array, cache_kv: tuple[Array, Array], positions: Array, cos: Array, sin: Array, allowed: Array
    ) -> tuple[Array, tuple[Array, Array]]:
        h, cache_kv = self.attn.cached(self.input_norm(x), cache_kv, positions, cos, sin, allowed)
        x = x + h
        return x + self.mlp(self.post_norm(x)), cache_kv


class LlamaModel(nnx.Module):
    """Causal LM. `__call__(tokens [B,S], mask [B,S]) -> logits [B,S,V]` in float32."""

    def __init__(self, cfg: ModelConfig, lora: LoRAConfig | None = None, *, rngs: nnx.Rngs):
        if lora is not None:
            lora.check(cfg)
        self.config = cfg
        self.embed = Embed(cfg.vocab_size, cfg.hidden_size, rngs)
        self.blocks = stacked(lambda r: Block(cfg, lora, r), cfg.num_layers, rngs)
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else Linear(cfg.hidden_size, cfg.vocab_size, bias=False, lora=None, rngs=rngs, name="lm_head")
        )

    def __call__(self, tokens, mask=None):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        if mask is None:
            mask = jnp.ones(tokens.shape, bool)
        pos = jnp.arange(tokens.shape[1], dtype=jnp.float32)
        cos, sin = self._rope(pos[None])
        allowed = attention_mask(mask, cfg.sliding_window)
        x = self.embed(tokens, dtype)
        x = scan_blocks(self.blocks, x, cos, sin, allowed, remat=cfg.remat)
        return self._logits(x)

    def cached(self, tokens: Array, positions: Array, cache: dict, mask: Array | None = None) -> tuple[Array, dict]:
        """Logits [B,T,V] of new `tokens` [B,T] at `positions` [B,T] (each row contiguous), attending to
        the cache's earlier tokens; returns (logits, cache with these tokens written). Equals
        `__call__` on the whole sequence (tested)."""
        cfg = self.config
        if mask is None:
            mask = jnp.ones(tokens.shape, bool)
        slots = write_rows(cache["mask"], mask.astype(bool), positions[:, 0])
        cos, sin = self._rope(positions.astype(jnp.float32))
        allowed = cached_attention_mask(slots, positions, cfg.sliding_window)
        x = self.embed(tokens, jnp.dtype(cfg.dtype))
        x, (k, v) = scan_blocks_cached(self.blocks, x, (cache["k"], cache["v"]), positions, cos, sin, allowed)
        return self._logits(x), {"k": k, "v": v, "mask": slots}

    def _rope(self, pos_bs):
        """cos, sin [B or 1, S, head_dim] at float positions [B or 1, S]."""
        freqs = pos_bs[:, :, None] * rope_inv_freq(self.config)[None, None, :]
        emb = jnp.concatenate([freqs, freqs], axis=-1)
        return jnp.cos(emb), jnp.sin(emb)

    def _logits(self, x):
        x = self.final_norm(x)
        if self.lm_head is None:
            return self.embed.attend(x)
        return self.lm_head(x).astype(jnp.float32)
