"""The model's and LoRA's sections of the run config (model:, lora:) as frozen dataclasses: every
key, its default, its checks."""

from __future__ import annotations

import dataclasses

from ..core import choices  # the names a config may choose (the ground floor: no implementation)
from ..core.errors import UserError
from ..models.config import DEFAULT_TARGETS, LoRAConfig  # LoRA's default target modules; the model's LoRA config
from .checks import _at_least, _check_types, _choice, _positive, _strings

# the model keys that only the random `tiny` model reads (its shape); config.yaml marks them for others
TINY_SHAPE = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size")


@dataclasses.dataclass(frozen=True)
class ModelSection:
    source: str = "default"  # HF folder, hub id, GGUF path, 'default', or 'tiny' (random)
    dtype: str = "float32"
    # einsum (ours) | fused (jax.nn.dot_product_attention, XLA's implementation; not cuDNN's)
    attention: str = "einsum"
    # what the backward pass recomputes of each layer: none | full (everything: least memory) | dots
    # (keeps the matmul outputs, recomputes the elementwise rest; jax.checkpoint_policies)
    remat: str = "none"
    # only for source: tiny (a random Llama for tests and benchmarks)
    vocab_size: int = 512
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128

    def __post_init__(self):
        _check_types(self, "model.")
        if not self.source.strip():
            raise UserError(
                "model.source is empty; give a Hugging Face folder, a hub id, a GGUF file, 'default' or 'tiny'"
            )
        _choice("model.dtype", self.dtype, choices.DTYPES)
        _choice("model.attention", self.attention, choices.ATTENTION_IMPLS)
        _choice("model.remat", self.remat, choices.REMAT)
        for k in TINY_SHAPE:
            _at_least(f"model.{k}", getattr(self, k), 1)
        if self.hidden_size % self.num_heads:
            raise UserError(
                f"model.hidden_size {self.hidden_size} is not divisible by model.num_heads {self.num_heads}"
            )
        if (self.hidden_size // self.num_heads) % 2:
            raise UserError(
                f"model.hidden_size / model.num_heads = {self.hidden_size // self.num_heads} must be "
                "even (rotary position embeddings rotate pairs)"
            )
        if self.num_heads % self.num_kv_heads:
            raise UserError(
                f"model.num_heads {self.num_heads} is not a multiple of model.num_kv_heads {self.num_kv_heads}"
            )


@dataclasses.dataclass(frozen=True)
class LoRASection:
    r: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    use_rslora: bool = False
    freeze_a: bool = False  # FFA-LoRA: train B only
    client_ranks: tuple[int, ...] | None = None  # per-client ranks (<= r) for heterogeneous clients

    def to_lora_config(self) -> LoRAConfig:
        """The model's LoRAConfig (what the adapters look like): the one conversion from this section."""
        return LoRAConfig(r=self.r, alpha=self.alpha, target_modules=self.target_modules, use_rslora=self.use_rslora)

    def __post_init__(self):
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if self.client_ranks is not None:
            object.__setattr__(self, "client_ranks", tuple(self.client_ranks))
        _check_types(self, "lora.")
        _at_least("lora.r", self.r, 1)
        _positive("lora.alpha", self.alpha)
        _strings("lora.target_modules", self.target_modules)
        if self.client_ranks is not None:
            if not self.client_ranks:
                raise UserError("lora.client_ranks is an empty list; give one rank per client or leave it out")
            for x in self.client_ranks:
                if isinstance(x, bool) or not isinstance(x, int):
                    raise UserError(f"lora.client_ranks entries must be integers, got {x!r}")
            bad = [x for x in self.client_ranks if not 1 <= x <= self.r]
            if bad:
                raise UserError(f"lora.client_ranks must be in [1, r={self.r}], got {bad[0]}")
