"""Building blocks shared by the architectures: LoRA linear, norms, RoPE, attention.

Modules hold parameters only; the compute dtype is taken from the input activations.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

from ..core.errors import UserError
from ..core.pytypes import Array
from .config import LoRAConfig, ModelConfig

if TYPE_CHECKING:
    from collections.abc import Callable


class LoRAParam(nnx.Param):
    """A trainable LoRA factor. Used as a filter to split adapters from the frozen base."""


def _lead(v, x):
    """Give a trailing-axis vector the rank of x (explicit broadcasting; rank promotion is off in tests)."""
    return v.reshape((1,) * (x.ndim - 1) + v.shape)


def _normal(rngs: nnx.Rngs, shape, std=0.02):
    return std * jax.random.normal(rngs.params(), shape, jnp.float32)


class Linear(nnx.Module):
    """y = x W + b (+ scale * x A^T B^T when LoRA targets this module).

    `kernel` is stored (in, out); LoRA factors use PEFT's layout: A (r, in), B (out, r).
    A is initialised like PEFT (kaiming-uniform with a=sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))),
    B is zero, so the adapted module starts equal to the base module.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool,
        lora: LoRAConfig | None,
        rngs: nnx.Rngs,
        name: str = "linear",
    ):
        self.kernel = nnx.Param(_normal(rngs, (in_features, out_features)))
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32)) if bias else None
        if lora is not None:
            if lora.r > min(in_features, out_features):
                raise UserError(
                    f"LoRA rank {lora.r} is larger than module {name} allows "
                    f"(min(in, out) = {min(in_features, out_features)})"
                )
            bound = 1.0 / math.sqrt(in_features)
            self.lora_a = LoRAParam(
                jax.random.uniform(rngs.params(), (lora.r, in_features), jnp.float32, -bound, bound)
            )
            self.lora_b = LoRAParam(jnp.zeros((out_features, lora.r), jnp.float32))
            self.lora_scale = float(lora.scale)
        else:
            self.lora_a = self.lora_b = None
            self.lora_scale = 0.0

    def __call__(self, x):
        dt = x.dtype
        y = x @ self.kernel[...].astype(dt)
        if self.bias is not None:
            y = y + _lead(self.bias[...].astype(dt), y)
        if self.lora_a is not None:
            h = x @ self.lora_a[...].astype(dt).T
            y = y + (h @ self.lora_b[...].astype(dt).T) * jnp.asarray(self.lora_scale, dt)
        return y


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return _lead(self.scale[...].astype(x.dtype), x) * y.astype(x.dtype)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, eps: float):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * _lead(self.scale[...], x) + _lead(self.bias[...], x)
        return y.astype(x.dtype)


class Embed(nnx.Module):
    def __init__(self, num: int, dim: int, rngs: nnx.Rngs):
        self.embedding = nnx.Param(_normal(rngs, (num, dim)))

    def __call__(self, ids, dtype):
        return jnp.take(self.embedding[...], ids, axis=0).astype(dtype)

    def attend(self, x: Array) -> Array:
        """Tied output projection: logits = x E^T (float32)."""
        return (x @ self.embedding[...].astype(x.dtype).T).astype(jnp.float32)


def rope_inv_freq(cfg: ModelConfig) -> jnp.ndarray:
    """Inverse frequencies of RoPE with Hugging Face's `default`, `linear` and `llama3` scaling."""
    d = cfg.dim_head
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    sc = dict(cfg.rope_scaling or ())
    kind = sc.get("rope_type", sc.get("type", "default"))
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / sc["factor"]
    if kind == "llama3":
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = jnp.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        return jnp.where(medium, smoothed, scaled)
    raise UserError(f"unsupported rope scaling {kind!r}; supported: default, linear, llama3")


def apply_rope(x_bshd: Array, cos_bsd: Array, sin_bsd: Array) -> Array:
    """Rotate-half RoPE (Hugging Face's convention), computed in float32."""
    x = x_bshd.astype(jnp.float32)
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = x * cos_bsd[:, :, None, :] + rot * sin_bsd[:, :, None, :]
    return out.astype(x_bshd.dtype)


def attention_mask(mask_bs: Array, sliding_window: int | None = None) -> Array:
    """Boolean [B, S(query), S(key)]: causal, key not padding, optional sliding window."""
    s = mask_bs.shape[1]
    q = jnp.arange(s)[:, None]
    k = jnp.arange(s)[None, :]
    allowed = k <= q
    if sliding_window is not None:
        allowed = allowed & (k > q - sliding_window)
    return allowed[None] & mask_bs[:, None, :].astype(bool)


def attention(
    q_bshd: Array, k_bskd: Array, v_bskd: Array, allowed_bst: Array, scale: float, impl: str = "einsum"
) -> Array:
    """Grouped-query attention; softmax in float32 with masked logits at the dtype minimum.
    impl "fused": jax.nn.dot_product_attention with the same mask and no `implementation` (XLA's:
    cuDNN's flash attention would need implementation="cudnn", a causal flag and sequence lengths);
    equal to the einsum path within float rounding (tested)."""
    b, s, h, d = q_bshd.shape
    kv = k_bskd.shape[2]
    if impl == "fused":
        out = jax.nn.dot_product_attention(q_bshd, k_bskd, v_bskd, mask=allowed_bst[:, None], scale=scale)
        return out.reshape(b, s, h * d)
    if kv == h:  # multi-head: no group axis of size 1 (measured 1.04-1.06x per round on CPU)
        logits = jnp.einsum("bshd,bthd->bhst", q_bshd, k_bskd, preferred_element_type=jnp.float32) * scale
        logits = jnp.where(allowed_bst[:, None], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(v_bskd.dtype)
        return jnp.einsum("bhst,bthd->bshd", probs, v_bskd).reshape(b, s, h * d)
    q = q_bshd.reshape(b, s, kv, h // kv, d)
    logits = jnp.einsum("bskgd,btkd->bkgst", q, k_bskd, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(allowed_bst[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_bskd.dtype)
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v_bskd)
    return out.reshape(b, s, h * d)


# ----------------------------------------------------------------------------- KV cache
# A cache holds keys and values of every layer in one static shape, k/v [layers, batch, kv_heads,
# max_len, head_dim], and `mask` [batch, max_len] (slot holds a real token). Slot = absolute position,
# so a step writes each row's new tokens at that row's position and attention masks slots by position:
# every decode step has the same shapes whatever the position (no recompilation per token).


def write_rows(cache: Array, new: Array, start_b: Array, axis: int = 1) -> Array:
    """`cache` [B, ...] with row b's `new` entries (T along `axis`) written at slots start_b .. start_b + T - 1."""

    def one(c: Array, n: Array, start: Array) -> Array:
        idx = [0] * c.ndim
        idx[axis - 1] = start
        return jax.lax.dynamic_update_slice(c, n, tuple(idx))

    return jax.vmap(one)(cache, new, start_b)


def cached_attention_mask(slots_bm: Array, positions_bt: Array, sliding_window: int | None = None) -> Array:
    """Boolean [B, T(query), M(slot)]: the slot holds a real token at a position <= the query's (and
    within the sliding window): `attention_mask` with keys addressed by position."""
    slot = jnp.arange(slots_bm.shape[1])[None, None, :]
    pos = positions_bt[:, :, None]
    allowed = slot <= pos
    if sliding_window is not None:
        allowed = allowed & (slot > pos - sliding_window)
    return allowed & slots_bm[:, None, :]


def cached_attention(q_bthd: Array, k_bkmd: Array, v_bkmd: Array, allowed_btm: Array, scale: float) -> Array:
    """`attention` against cached keys/values laid out [B, kv_heads, slots, head_dim]."""
    b, t, h, d = q_bthd.shape
    kv = k_bkmd.shape[1]
    q = q_bthd.reshape(b, t, kv, h // kv, d)
    logits = jnp.einsum("btkgd,bkmd->bkgtm", q, k_bkmd, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(allowed_btm[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_bkmd.dtype)
    out = jnp.einsum("bkgtm,bkmd->btkgd", probs, v_bkmd)
    return out.reshape(b, t, h * d)


def attend_cached(
    q_bthd: Array,
    k_btkd: Array,
    v_btkd: Array,
    cache_kv: tuple[Array, Array],
    positions_bt: Array,
    allowed_btm: Array,
    scale: float,
) -> tuple[Array, tuple[Array, Array]]:
    """Write the new keys/values at their positions, attend over the cache: (out [B,T,H*D], (k, v))."""
    start = positions_bt[:, 0]
    k = write_rows(cache_kv[0], k_btkd.swapaxes(1, 2).astype(cache_kv[0].dtype), start, axis=2)
    v = write_rows(cache_kv[1], v_btkd.swapaxes(1, 2).astype(cache_kv[1].dtype), start, axis=2)
    return cached_attention(q_bthd, k, v, allowed_btm, scale), (k, v)


def scan_blocks_cached(
    blocks: nnx.Module, x: Array, cache_kv: tuple[Array, Array], *args: Array
) -> tuple[Array, tuple[Array, Array]]:
    """`scan_blocks` for the cached forward: each layer's `cached(x, (k, v), *args)` reads and
    writes its slice of the cache; returns (x, (k, v)) with the layer axis first."""
    graphdef, state = nnx.split(blocks)

    def body(h: Array, xs: tuple[nnx.State, Array, Array]) -> tuple[Array, tuple[Array, Array]]:
        layer_state, k, v = xs
        h, kv = nnx.merge(graphdef, layer_state).cached(h, (k, v), *args)
        return h, kv

    x, kv = jax.lax.scan(body, x, (state, *cache_kv))
    return x, kv


# Models this shallow run their layers unrolled: measured 1.3x faster rounds on CPU at hidden 64-128
# with 2 layers (experiments/bench/scale_bench.py), at no extra compile time. Deeper models keep
# the scan, so compile time stays flat in depth (SmolLM2, 30 layers: unrolled would be 1.08x faster
# per round but compile 2.5x longer).
UNROLL_MAX_LAYERS = 4


# model.remat: what a layer's backward pass may keep from its forward (the rest is recomputed)
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,  # batched dots too: the round vmaps the model over clients
}


def scan_blocks(blocks: nnx.Module, x: Array, *args: Array, remat: str = "none") -> Array:
    """Run a module whose parameters carry a leading layer axis with lax.scan over layers,
    so compile time does not grow with depth (unrolled up to UNROLL_MAX_LAYERS layers); remat:
    each layer under jax.checkpoint with that policy (the same values, less activation memory)."""
    graphdef, state = nnx.split(blocks)

    def layer(h: Array, layer_state: nnx.State) -> Array:
        return nnx.merge(graphdef, layer_state)(h, *args)

    if remat != "none":
        layer = jax.checkpoint(layer, policy=REMAT_POLICIES[remat])

    def body(h: Array, layer_state: nnx.State) -> tuple[Array, None]:
        return layer(h, layer_state), None

    depth = jax.tree.leaves(state)[0].shape[0]
    x, _ = jax.lax.scan(body, x, state, unroll=depth if depth <= UNROLL_MAX_LAYERS else 1)
    return x


def stacked(make_block: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs) -> nnx.Module:
    """Create `num_layers` independent blocks as one module with a leading layer axis."""
    keys = jax.random.split(rngs.params(), num_layers)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: make_block(nnx.Rngs(0))))
    states = jax.vmap(lambda k: nnx.split(make_block(nnx.Rngs(k)))[1])(keys)
    return nnx.merge(graphdef, states)
