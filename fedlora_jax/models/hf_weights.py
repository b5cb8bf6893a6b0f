"""Checkpoint tensor names: our parameter tree <-> Hugging Face-named tensors.

With gguf_weights.py (which renames GGUF tensors to the Hugging Face names first), the only place
that knows checkpoint key names: one table maps the Hugging Face names onto our parameter tree.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from ..core.errors import UserError
from . import abstract_model
from .config import ModelConfig

# our module path -> (Hugging Face module name, kind); kinds: linear (HF weight is [out, in]),
# conv1d (GPT-2's Conv1D, weight [in, out]), norm (weight), layernorm (weight, bias), embed.
_LLAMA_TABLE = {
    ("embed",): ("model.embed_tokens", "embed"),
    ("final_norm",): ("model.norm", "norm"),
    ("lm_head",): ("lm_head", "linear"),
    ("blocks", "input_norm"): ("model.layers.{i}.input_layernorm", "norm"),
    ("blocks", "post_norm"): ("model.layers.{i}.post_attention_layernorm", "norm"),
    **{
        ("blocks", "attn", p): (f"model.layers.{{i}}.self_attn.{p}", "linear")
        for p in ("q_proj", "k_proj", "v_proj", "o_proj")
    },
    **{("blocks", "mlp", p): (f"model.layers.{{i}}.mlp.{p}", "linear") for p in ("gate_proj", "up_proj", "down_proj")},
}
_GPT2_TABLE = {
    ("wte",): ("transformer.wte", "embed"),
    ("wpe",): ("transformer.wpe", "embed"),
    ("ln_f",): ("transformer.ln_f", "layernorm"),
    ("blocks", "ln_1"): ("transformer.h.{i}.ln_1", "layernorm"),
    ("blocks", "ln_2"): ("transformer.h.{i}.ln_2", "layernorm"),
    ("blocks", "attn", "c_attn"): ("transformer.h.{i}.attn.c_attn", "conv1d"),
    ("blocks", "attn", "c_proj"): ("transformer.h.{i}.attn.c_proj", "conv1d"),
    ("blocks", "mlp", "c_fc"): ("transformer.h.{i}.mlp.c_fc", "conv1d"),
    ("blocks", "mlp", "c_proj"): ("transformer.h.{i}.mlp.c_proj", "conv1d"),
}
_PARAM_NAMES = {"kernel": "weight", "bias": "bias", "scale": "weight", "embedding": "weight"}
# buffers some checkpoints carry that are not parameters
_IGNORED = re.compile(r"(\.attn\.bias|\.attn\.masked_bias|rotary_emb\.inv_freq)$")


def module_table(cfg: ModelConfig) -> dict:
    return _GPT2_TABLE if cfg.family == "gpt2" else _LLAMA_TABLE


def hf_module_name(cfg: ModelConfig, module_path: tuple, layer: int | None) -> str:
    """Hugging Face (and PEFT) module name of one of our modules, e.g. model.layers.3.self_attn.q_proj."""
    name, _ = module_table(cfg)[tuple(module_path)]
    return name.format(i=layer) if layer is not None else name


def _flatten(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flatten(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _set(tree: dict, path: tuple, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _hf_param(cfg: ModelConfig, path: tuple) -> tuple[str, str, bool]:
    """(hf key format, kind, per_layer) of one of our base parameters."""
    module, leaf = path[:-1], path[-1]
    name, kind = module_table(cfg)[module]
    return f"{name}.{_PARAM_NAMES[leaf]}", kind, module[0] == "blocks"


def params_from_hf(cfg: ModelConfig, tensors: dict[str, np.ndarray]) -> dict:
    """Our base parameter tree from Hugging Face-named tensors; checks every name and shape."""
    _, abstract, _ = abstract_model(cfg)
    strip = "transformer." if cfg.family == "gpt2" else None
    if strip and not any(k.startswith(strip) for k in tensors):  # original OpenAI GPT-2 naming
        tensors = {strip + k: v for k, v in tensors.items()}
    used, base = set(), {}
    dtype = jnp.dtype(cfg.dtype)
    for path, spec in _flatten(abstract):
        fmt, kind, per_layer = _hf_param(cfg, path)
        keys = [fmt.format(i=i) for i in range(cfg.num_layers)] if per_layer else [fmt]
        arrays = []
        for key in keys:
            if key not in tensors:
                raise UserError(f"checkpoint is missing tensor {key!r} (needed for {'.'.join(path)})")
            a = np.asarray(tensors[key])
            transpose = kind == "linear" and path[-1] == "kernel"
            want = tuple(spec.shape[1:] if per_layer else spec.shape)
            want = want[::-1] if transpose else want  # in the checkpoint's own layout
            if a.shape != want:
                raise UserError(f"tensor {key!r} has shape {a.shape} but the config needs {want}")
            arrays.append(a.T if transpose else a)
            used.add(key)
        arr = np.stack(arrays) if per_layer else arrays[0]
        _set(base, path, jnp.asarray(arr, dtype=dtype))
    extra = [
        k
        for k in tensors
        if k not in used and not _IGNORED.search(k) and not (k == "lm_head.weight" and cfg.tie_word_embeddings)
    ]
    if extra:
        raise UserError(
            f"checkpoint has {len(extra)} tensor(s) this {cfg.model_type} model does not use, "
            f"e.g. {extra[0]!r}; is config.json the right one?"
        )
    return base


def params_to_hf(cfg: ModelConfig, base: dict) -> dict[str, np.ndarray]:
    """Hugging Face-named float32 tensors from our base parameter tree."""
    out = {}
    for path, value in _flatten(base):
        fmt, kind, per_layer = _hf_param(cfg, path)
        a = np.asarray(jax.device_get(value), dtype=np.float32)
        t = (lambda x: x.T) if kind == "linear" and path[-1] == "kernel" else (lambda x: x)
        if per_layer:
            for i in range(cfg.num_layers):
                out[fmt.format(i=i)] = np.ascontiguousarray(t(a[i]))
        else:
            out[fmt] = np.ascontiguousarray(t(a))
    return out
