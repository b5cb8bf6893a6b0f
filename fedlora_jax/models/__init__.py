"""Models as pure functions: split once into (definition, base, lora); `apply` is jittable and
vmappable over the LoRA parameters alone.

    definition, base, lora = init_model(config, lora_config, seed=0)
    logits = apply(definition, base, lora, tokens, mask)            # [B, S, V] float32
    jax.vmap(apply, in_axes=(None, None, 0, None, None))            # many adapters, one base

Decoding with a KV cache (static shapes; slot = position, so every step has the same shapes):

    cache = init_cache(definition, batch, max_len)
    logits, cache = apply_cached(definition, base, lora, prompt, positions, cache, mask)   # prefill
    logits, cache = apply_cached(definition, base, lora, next_tok[:, None], pos[:, None], cache)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ..core import randomness
from ..core.pytypes import Array, Key
from .config import SUPPORTED_MODEL_TYPES, LoRAConfig, ModelConfig
from .gpt2 import GPT2Model
from .layers import LoRAParam
from .llama import LlamaModel
from .loss import softmax_nll

Params = Any  # nested dict of arrays

__all__ = [
    "Definition",
    "LoRAConfig",
    "LoRAParam",
    "ModelConfig",
    "SUPPORTED_MODEL_TYPES",
    "apply",
    "apply_cached",
    "init_cache",
    "init_model",
    "init_lora",
    "abstract_model",
    "model_class",
    "token_nll",
    "mean_nll",
]


def model_class(cfg: ModelConfig) -> type[GPT2Model] | type[LlamaModel]:
    return GPT2Model if cfg.family == "gpt2" else LlamaModel


@dataclasses.dataclass(frozen=True)
class Definition:
    """The static part of a model: hashable, usable as a jit static argument or a closure."""

    graphdef: Any
    config: ModelConfig
    lora: LoRAConfig | None


def _build(cfg: ModelConfig, lora: LoRAConfig | None, key: Key) -> GPT2Model | LlamaModel:
    return model_class(cfg)(cfg, lora, rngs=nnx.Rngs(params=key))


def abstract_model(cfg: ModelConfig, lora: LoRAConfig | None = None) -> tuple[Definition, Params, Params]:
    """(definition, base shapes, lora shapes) without allocating any weights."""
    model = nnx.eval_shape(lambda: _build(cfg, lora, jax.random.key(0)))
    graphdef, lora_state, base_state = nnx.split(model, LoRAParam, ...)
    return (Definition(graphdef, cfg, lora), nnx.to_pure_dict(base_state), nnx.to_pure_dict(lora_state))


def init_model(cfg: ModelConfig, lora: LoRAConfig | None = None, *, seed: int = 0) -> tuple[Definition, Params, Params]:
    """A randomly initialised model (HF-style normal(0.02) weights), split into
    (definition, base, lora)."""
    definition, _, _ = abstract_model(cfg, lora)

    @jax.jit
    def make(key: Key) -> tuple[Params, Params]:
        _, lora_state, base_state = nnx.split(_build(cfg, lora, key), LoRAParam, ...)
        return nnx.to_pure_dict(base_state), nnx.to_pure_dict(lora_state)

    base, lora_params = make(randomness.key(seed, "model_init"))
    return definition, base, lora_params


def init_lora(definition: Definition, seed: int = 0) -> Params:
    """Fresh LoRA factors (A as PEFT initialises it, B = 0). Built under jit so the base weights
    that the constructor would create are dead code and never allocated."""

    @jax.jit
    def make(key: Key) -> Params:
        _, lora_state, _ = nnx.split(_build(definition.config, definition.lora, key), LoRAParam, ...)
        return nnx.to_pure_dict(lora_state)

    return make(randomness.key(seed, "lora_init"))


def apply(definition: Definition, base: Params, lora: Params, tokens: Array, mask: Array | None = None) -> Array:
    """Logits [B, S, V] (float32) of `tokens` [B, S] with attention `mask` [B, S] (1 = real token)."""
    model = nnx.merge(definition.graphdef, lora, base)
    return model(tokens, mask)


def init_cache(definition: Definition, batch: int, max_len: int) -> dict:
    """An empty KV cache: k, v [layers, batch, kv_heads, max_len, head_dim] in the compute dtype, and
    mask [batch, max_len] (which slots hold a real token; none yet)."""
    cfg = definition.config
    shape = (cfg.num_layers, batch, cfg.kv_heads, max_len, cfg.dim_head)
    dtype = jnp.dtype(cfg.dtype)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype), "mask": jnp.zeros((batch, max_len), bool)}


def apply_cached(
    definition: Definition,
    base: Params,
    lora: Params,
    tokens: Array,
    positions: Array,
    cache: dict,
    mask: Array | None = None,
) -> tuple[Array, dict]:
    """(logits [B, T, V] float32, new cache) of `tokens` [B, T] at absolute `positions` [B, T] (row b:
    p_b, p_b + 1, ...; p_b + T <= max_len), attending to the tokens already in `cache` at smaller
    positions; `mask` [B, T] marks real tokens (padding is written but never attended to). With the
    same adapter this equals `apply` on the whole sequence: the LoRA-applying forward, cached."""
    model = nnx.merge(definition.graphdef, lora, base)
    return model.cached(tokens, positions, cache, mask)


def token_nll(
    definition: Definition, base: Params, lora: Params, tokens: Array, mask: Array, loss_mask: Array | None = None
) -> tuple[Array, Array]:
    """Per-position negative log-likelihood of token t+1 given tokens <= t: returns
    (nll [B, S-1], weights [B, S-1]) where weights = loss_mask[:, 1:] (default: mask[:, 1:])."""
    logits = apply(definition, base, lora, tokens, mask)
    # every position scores its next token (the last a dummy 0) and the last is dropped from the
    # [B, S] result: slicing the [B, S, V] logits instead would copy them
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    nll = softmax_nll(logits, targets)[:, :-1]
    weights = (mask if loss_mask is None else loss_mask)[:, 1:].astype(jnp.float32)
    if loss_mask is not None:
        weights = weights * mask[:, 1:].astype(jnp.float32)
    return nll, weights


def mean_nll(
    definition: Definition, base: Params, lora: Params, tokens: Array, mask: Array, loss_mask: Array | None = None
) -> Array:
    """Mean NLL over the weighted positions (0 when there are none)."""
    nll, w = token_nll(definition, base, lora, tokens, mask, loss_mask)
    return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)
