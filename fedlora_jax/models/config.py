"""Frozen configuration of the model architectures and of LoRA."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from ..core.choices import ATTENTION_IMPLS, DTYPES, REMAT  # noqa: F401  (the config's choices; re-exported)
from ..core.errors import UserError

DEFAULT_TARGETS = ("q_proj", "v_proj")  # LoRA's target modules unless told (as PEFT's default for Llama)

# The families we implement; each Hugging Face `model_type` maps onto one of them.
LLAMA_TYPES = ("llama", "mistral", "qwen2")
GPT2_TYPES = ("gpt2",)
SUPPORTED_MODEL_TYPES = LLAMA_TYPES + GPT2_TYPES

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GPT2_TARGETS = ("c_attn", "c_proj", "c_fc")
TARGET_ALIASES = {
    "q": "q_proj",
    "k": "k_proj",
    "v": "v_proj",
    "o": "o_proj",
    "gate": "gate_proj",
    "up": "up_proj",
    "down": "down_proj",
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer (Llama family or GPT-2).

    `model_type` is the Hugging Face name (llama, mistral, qwen2, gpt2). `rope_scaling` is a
    tuple of (key, value) pairs so the config stays hashable.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int = 0
    num_kv_heads: int | None = None
    head_dim: int | None = None
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    sliding_window: int | None = None
    activation: str = "silu"
    dtype: str = "float32"  # compute dtype: float32 or bfloat16
    attention: str = "einsum"  # ATTENTION_IMPLS
    remat: str = (
        "none"  # REMAT: none (keep every activation) | full (recompute each layer) | dots (keep matmul outputs)
    )

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise UserError(f"unknown architecture {self.model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads and self.head_dim is None:
            raise UserError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.kv_heads:
            raise UserError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.kv_heads}")
        if self.dtype not in DTYPES:
            raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.attention not in ATTENTION_IMPLS:
            raise UserError(f"attention must be one of {', '.join(ATTENTION_IMPLS)}, got {self.attention!r}")
        if self.remat not in REMAT:
            raise UserError(f"remat must be one of {', '.join(REMAT)}, got {self.remat!r}")

    @property
    def family(self) -> str:
        return "gpt2" if self.model_type in GPT2_TYPES else "llama"

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def target_names(self) -> tuple[str, ...]:
        return GPT2_TARGETS if self.family == "gpt2" else LLAMA_TARGETS

    def replace(self, **kw: Any) -> "ModelConfig":
        return dataclasses.replace(self, **kw)


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """LoRA adapters: rank r, scale alpha/r (alpha/sqrt(r) with rslora), target module names."""

    r: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    use_rslora: bool = False

    def __post_init__(self):
        if int(self.r) != self.r or self.r < 1:
            raise UserError(f"LoRA rank r must be an integer >= 1, got {self.r!r}")
        if not self.target_modules:
            raise UserError("LoRA target_modules is empty; name at least one module (e.g. q_proj, v_proj)")
        object.__setattr__(self, "target_modules", tuple(TARGET_ALIASES.get(t, t) for t in self.target_modules))

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def check(self, model: ModelConfig) -> None:
        """Raise if a target is not a module of `model` (naming the allowed ones)."""
        bad = [t for t in self.target_modules if t not in model.target_names]
        if bad:
            raise UserError(
                f"target module(s) {', '.join(map(repr, bad))} not in a {model.model_type} model; "
                f"allowed: {', '.join(model.target_names)}"
            )
