"""Hugging Face config.json <-> ModelConfig (transformers 4 and 5 layouts)."""

from __future__ import annotations

from ..core.errors import UserError
from .config import SUPPORTED_MODEL_TYPES, ModelConfig

_REQUIRED = object()


def _config_int(d: dict, key: str, where: str, default=_REQUIRED, what: str = "") -> int:
    """A positive integer field of a config.json dict; UserError naming the file and key otherwise."""
    v = d.get(key)
    if v is None:
        if default is _REQUIRED:
            raise UserError(f"{where} has no {key!r}, which a {what} config needs")
        return default
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise UserError(f"{where} has {key} = {v!r}; it must be a positive integer")
    return v


def config_from_hf(d: dict, dtype: str = "float32", where: str = "config.json") -> ModelConfig:
    """ModelConfig from a Hugging Face config.json dict (transformers 4 and 5 layouts); `where` names
    the file in error messages."""
    if not isinstance(d, dict):
        raise UserError(f"{where} holds a JSON {type(d).__name__}, not an object of config keys")
    mt = d.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise UserError(
            f"{where} has unknown architecture (model_type) {mt!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )

    def need(key: str, default: object = _REQUIRED) -> int | None:
        return _config_int(d, key, where, default, mt)

    if mt == "gpt2":
        if d.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise UserError(f"unsupported GPT-2 activation {d.get('activation_function')!r}; supported: gelu_new")
        n_embd = need("n_embd")
        return ModelConfig(
            model_type="gpt2",
            vocab_size=need("vocab_size"),
            hidden_size=n_embd,
            num_layers=need("n_layer"),
            num_heads=need("n_head"),
            intermediate_size=need("n_inner", 4 * n_embd),
            norm_eps=d.get("layer_norm_epsilon", 1e-5),
            max_position_embeddings=need("n_positions"),
            tie_word_embeddings=True,
            activation="gelu_new",
            dtype=dtype,
        )
    if d.get("attention_bias") or d.get("mlp_bias"):
        raise UserError("Llama checkpoints with attention_bias or mlp_bias are not supported")
    if d.get("hidden_act", "silu") != "silu":
        raise UserError(f"unsupported activation {d.get('hidden_act')!r}; supported: silu")
    rope = dict(d.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
    if not rope and d.get("rope_scaling"):
        rope = dict(d["rope_scaling"])
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise UserError(f"unsupported rope scaling {kind!r}; supported: default, linear, llama3")
    sliding = None
    if mt == "mistral":
        sliding = d.get("sliding_window")
    elif mt == "qwen2" and d.get("use_sliding_window"):
        raise UserError("Qwen2 with use_sliding_window=true is not supported")
    return ModelConfig(
        model_type=mt,
        vocab_size=need("vocab_size"),
        hidden_size=need("hidden_size"),
        num_layers=need("num_hidden_layers"),
        num_heads=need("num_attention_heads"),
        num_kv_heads=need("num_key_value_heads", None),
        head_dim=need("head_dim", None),
        intermediate_size=need("intermediate_size"),
        norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=tuple(sorted(rope.items())) if kind != "default" else None,
        max_position_embeddings=need("max_position_embeddings", 2048),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        qkv_bias=(mt == "qwen2"),
        sliding_window=sliding,
        dtype=dtype,
    )


def config_to_hf(cfg: ModelConfig) -> dict:
    """A config.json dict that transformers loads into the equivalent model."""
    if cfg.family == "gpt2":
        return {
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "vocab_size": cfg.vocab_size,
            "n_embd": cfg.hidden_size,
            "n_layer": cfg.num_layers,
            "n_head": cfg.num_heads,
            "n_inner": cfg.intermediate_size,
            "n_positions": cfg.max_position_embeddings,
            "layer_norm_epsilon": cfg.norm_eps,
            "activation_function": "gelu_new",
            "tie_word_embeddings": True,
        }
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
    rope = {"rope_type": "default", **dict(cfg.rope_scaling or ()), "rope_theta": cfg.rope_theta}
    d = {
        "model_type": cfg.model_type,
        "architectures": [arch[cfg.model_type]],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.dim_head,
        "intermediate_size": cfg.intermediate_size,
        "rms_norm_eps": cfg.norm_eps,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": rope,
    }
    if cfg.rope_scaling:
        d["rope_scaling"] = dict(cfg.rope_scaling)
    if cfg.model_type == "mistral":
        d["sliding_window"] = cfg.sliding_window
    return d
