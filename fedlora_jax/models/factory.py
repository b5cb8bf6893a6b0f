"""The model a run config names, in one path: `tiny` (a random Llama with a byte tokenizer) or a
loaded checkpoint (HF folder, hub id, GGUF, `default`) through models/hub.py."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from ..core.errors import UserError
from . import ModelConfig, init_model

# HF's std 0.02 head caps a random model's logits near uniform; the tiny model's head is scaled
# to std 0.25 so that LoRA alone can learn the synthetic tasks (DEVELOPERS.md)
if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..config.run_config import RunConfig
    from ..core.pytypes import Tree
    from . import Definition

TINY_HEAD_SCALE = 12.5
TINY_MAX_POSITIONS = 4096


def build_model_config(cfg: "RunConfig") -> ModelConfig:
    """The ModelConfig a run would load, with the run's attention implementation and remat policy."""
    return dataclasses.replace(_source_config(cfg), attention=cfg.model.attention, remat=cfg.model.remat)


def _source_config(cfg: "RunConfig") -> ModelConfig:
    """The ModelConfig a run would load, without loading weights (tiny: from the config; else
    from config.json or the GGUF metadata)."""
    m = cfg.model
    if m.source == "tiny":
        return ModelConfig(
            "llama",
            vocab_size=m.vocab_size,
            hidden_size=m.hidden_size,
            num_layers=m.num_layers,
            num_heads=m.num_heads,
            num_kv_heads=m.num_kv_heads,
            intermediate_size=m.intermediate_size,
            max_position_embeddings=TINY_MAX_POSITIONS,
            dtype=m.dtype,
        )
    from .hub import folder_config, resolve

    path = resolve(m.source)
    if path.is_file():
        from .gguf_weights import gguf_config  # metadata and shapes only, cached per file

        return gguf_config(path, m.dtype)
    return folder_config(path, m.dtype)


def build_tokenizer(cfg: "RunConfig") -> PreTrainedTokenizerBase:
    """The tokenizer a run would use, without loading weights."""
    if cfg.model.source == "tiny":
        from ..data.pipeline import byte_tokenizer

        return byte_tokenizer()
    from .hub import load_tokenizer, resolve

    tok = load_tokenizer(resolve(cfg.model.source))
    if tok is None:
        raise UserError(f"model {cfg.model.source!r} has no tokenizer files")
    return tok


def build_model(cfg: "RunConfig") -> tuple[Definition, Tree, Tree, PreTrainedTokenizerBase, str]:
    """(definition, base, lora, tokenizer, source description) for the config's model."""
    lc = cfg.lora.to_lora_config()
    m = cfg.model
    if m.source == "tiny":
        mc = build_model_config(cfg)
        definition, base, lora = init_model(mc, lc, seed=cfg.seed)
        # a frozen random head with HF's std 0.02 caps logits near uniform (|E x| ~ 0.02 sqrt(d) ~ 0.2),
        # so LoRA could hardly learn; std 0.25 lets the adapters express peaked predictions
        base = {**base, "lm_head": {"kernel": base["lm_head"]["kernel"] * TINY_HEAD_SCALE}}
        base = jax.tree.map(lambda x: x.astype(jnp.dtype(mc.dtype)), base)  # bfloat16 base weights if asked
        tok = build_tokenizer(cfg)
        if len(tok) > mc.vocab_size:
            raise UserError(f"model.vocab_size {mc.vocab_size} is smaller than the byte tokenizer's {len(tok)}")
        return definition, base, lora, tok, "tiny random Llama"
    from .hub import load_model

    lm = load_model(m.source, lc, dtype=m.dtype, seed=cfg.seed)
    if lm.tokenizer is None:
        raise UserError(f"model {m.source!r} has no tokenizer files")
    definition = lm.definition
    if (m.attention, m.remat) != (definition.config.attention, definition.config.remat):  # the same weights,
        from . import abstract_model  # another computation

        config = dataclasses.replace(definition.config, attention=m.attention, remat=m.remat)
        definition = abstract_model(config, lc)[0]
    return definition, lm.base, lm.lora, lm.tokenizer, lm.source
