"""GPT-2: learned positions, LayerNorm, fused qkv (c_attn), GELU (tanh), tied embeddings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .config import LoRAConfig, ModelConfig
from .layers import Embed, LayerNorm, Linear, attention, attention_mask, scan_blocks, stacked


def _lora_for(name: str, lora: LoRAConfig | None):
    return lora if lora is not None and name in lora.target_modules else None


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, lora, rngs):
        e = cfg.hidden_size
        self.c_attn = Linear(e, 3 * e, bias=True, lora=_lora_for("c_attn", lora), rngs=rngs, name="c_attn")
        self.c_proj = Linear(e, e, bias=True, lora=_lora_for("c_proj", lora), rngs=rngs, name="c_proj")
        self.shape = (cfg.num_heads, cfg.dim_head)

    def __call__(self, x, allowed):
        b, s, e = x.shape
        h, d = self.shape
        q, k, v = jnp.split(self.c_attn(x), 3, axis=-1)
        q, k, v = (t.reshape(b, s, h, d) for t in (q, k, v))
        return self.c_proj(attention(q, k, v, allowed, d**-0.5))


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
        x = scan_blocks(self.blocks, x, attention_mask(mask))
        return self.wte.attend(self.ln_f(x))
