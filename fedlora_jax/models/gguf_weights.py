"""GGUF files in: dequantized tensors under their Hugging Face names, and the ModelConfig."""

from __future__ import annotations

import functools
import os
import re
from typing import Any

import numpy as np

from ..core.errors import UserError
from .config import ModelConfig
from .gguf_tokenizer import open_gguf

_GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's convert-time q/k row permutation (interleaved -> rotate-half RoPE)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf(path: str | os.PathLike, dtype: str = "float32") -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Dequantize a GGUF file into (config, Hugging Face-named float32 tensors)."""
    from gguf.quants import dequantize

    reader = open_gguf(path)
    where = f"GGUF file {str(path)!r}"
    cfg = _config(reader, where, dtype)
    arch, n_heads, n_kv = cfg.model_type, cfg.num_heads, cfg.kv_heads
    tensors = {}
    for t in reader.tensors:
        try:
            a = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        except NotImplementedError as e:
            raise UserError(
                f"{where} stores tensor {t.name!r} as {t.tensor_type.name}, which the installed "
                "gguf package cannot dequantize; use a Q4_0, Q4_1, Q8_0, F16 or F32 file"
            ) from e
        if t.name in _GGUF_NAMES:
            name = _GGUF_NAMES[t.name]
        else:
            m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", t.name)
            if not m or m.group(2) not in _GGUF_LAYER:
                raise UserError(f"unexpected tensor {t.name!r} in {where}")
            name = f"model.layers.{m.group(1)}.{_GGUF_LAYER[m.group(2)]}.{m.group(3)}"
            if arch == "llama" and m.group(2) in ("attn_q", "attn_k"):
                a = _unpermute(a, n_heads if m.group(2) == "attn_q" else n_kv)
        tensors[name] = a
    return cfg, tensors


@functools.lru_cache(maxsize=8)
def _cached_config(path: str, mtime_ns: int, size: int, dtype: str) -> ModelConfig:
    return _config(open_gguf(path), f"GGUF file {path!r}", dtype)


def gguf_config(path: str | os.PathLike, dtype: str = "float32") -> ModelConfig:
    """The ModelConfig of a GGUF file from its metadata and tensor shapes, without dequantizing
    (cached per file, size and modification time: experiments build one config per run)."""
    st = os.stat(path)
    return _cached_config(str(path), st.st_mtime_ns, st.st_size, dtype)


def _config(reader, where: str, dtype: str) -> ModelConfig:
    def field(name: str, default: Any = None) -> Any:
        f = reader.fields.get(name)
        return default if f is None else f.contents()

    arch = field("general.architecture")
    if arch not in ("llama", "qwen2"):
        raise UserError(f"unsupported GGUF architecture {arch!r} in {where}; supported: llama, qwen2")
    names = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise UserError(
            "GGUF files with rope_freqs (llama3 rope scaling) are not supported; load the Hugging Face folder instead"
        )
    for key in ("attention.head_count", "embedding_length", "block_count", "feed_forward_length"):
        if not isinstance(field(f"{arch}.{key}"), int):
            raise UserError(f"{where} has no integer metadata {arch}.{key}, which a {arch} model needs")
    if "token_embd.weight" not in names:
        raise UserError(f"{where} has no token_embd.weight tensor, which a {arch} model needs")
    n_heads, n_kv = field(f"{arch}.attention.head_count"), field(f"{arch}.attention.head_count_kv")
    hidden = field(f"{arch}.embedding_length")
    return ModelConfig(
        model_type=arch,
        vocab_size=int(names["token_embd.weight"].shape[-1]),  # GGUF lists dimensions innermost first
        hidden_size=hidden,
        num_layers=field(f"{arch}.block_count"),
        num_heads=n_heads,
        num_kv_heads=n_kv or n_heads,
        head_dim=field(f"{arch}.attention.key_length", hidden // n_heads),
        intermediate_size=field(f"{arch}.feed_forward_length"),
        norm_eps=float(field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(field(f"{arch}.rope.freq_base", 10000.0)),
        max_position_embeddings=field(f"{arch}.context_length", 2048),
        tie_word_embeddings="output.weight" not in names,
        qkv_bias=(arch == "qwen2"),
        dtype=dtype,
    )
