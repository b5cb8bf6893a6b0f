"""LoRA utilities over the pure-dict adapter tree: rank masks, frozen A, merging.

An adapter tree mirrors the model: ``lora['blocks']['attn']['q_proj'] = {'lora_a': [L, r, in],
'lora_b': [L, out, r]}`` with a leading layer axis (PEFT's per-layer layout otherwise).
PEFT's file format (reading and writing adapter folders) lives in `peft_io`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from ..core.pytypes import Array, Key
from ..models import Definition

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Sequence

# PEFT I/O moved to peft_io; these names stay importable from here for existing callers
_PEFT_IO = ("ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "save_peft", "read_peft_config", "check_peft_weights", "load_peft")


def __getattr__(name: str) -> Any:
    if name in _PEFT_IO:  # a compatibility shim, resolved by name (peft_io imports this module)
        import importlib
        import warnings

        warnings.warn(
            f"fedlora_jax.lora.{name} moved to fedlora_jax.adapters.peft_io.{name}; "
            "the old path goes in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module("fedlora_jax.adapters.peft_io"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def modules(tree: dict, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], dict]]:
    """Yield (module path, {'lora_a': A, 'lora_b': B}) for every adapted module."""
    for k, v in tree.items():
        if isinstance(v, dict) and "lora_a" in v:
            yield prefix + (k,), v
        elif isinstance(v, dict):
            yield from modules(v, prefix + (k,))


def map_modules(fn: Callable[..., tuple[Array, Array]], *trees: dict) -> dict:
    """Rebuild adapter trees applying fn(A_1, ..., A_n, B_1, ..., B_n) -> (A, B) per module."""

    def rec(*nodes: dict) -> dict:
        if "lora_a" in nodes[0]:
            a, b = fn(*[n["lora_a"] for n in nodes], *[n["lora_b"] for n in nodes])
            return {"lora_a": a, "lora_b": b}
        return {k: rec(*[n[k] for n in nodes]) for k in nodes[0]}

    return rec(*trees)


def rank_of(tree: dict) -> int:
    """The (padded) rank r of an adapter tree."""
    return next(modules(tree))[1]["lora_a"].shape[-2]


def rank_mask(tree: dict, rank: Array | int) -> dict:
    """Zero rows >= rank of every A and columns >= rank of every B. `rank` may be a traced scalar,
    so clients of different ranks share one padded shape under vmap; multiplying by the mask
    also makes the gradient of the masked entries exactly zero."""

    def fn(a: Array, b: Array) -> tuple[Array, Array]:
        keep = jnp.arange(a.shape[-2]) < rank
        keep_a = keep.reshape((1,) * (a.ndim - 2) + (-1, 1)).astype(a.dtype)
        keep_b = keep.reshape((1,) * (b.ndim - 1) + (-1,)).astype(b.dtype)
        return a * keep_a, b * keep_b

    return map_modules(fn, tree)


def delta_weights(definition: Definition, tree: dict) -> Iterator[tuple[tuple[str, ...], Array]]:
    """Yield (module path, scale * B @ A) with a leading layer axis: the update each module adds."""
    scale = definition.lora.scale
    for path, m in modules(tree):
        yield path, scale * jnp.einsum("lor,lri->loi", m["lora_b"], m["lora_a"])


def add_to_kernels(base: dict, deltas: Iterable[tuple[Sequence[str], Array]]) -> dict:
    """Base parameters with each (module path, delta [layers, in, out]) added to that module's
    kernel (our kernel layout is [in, out]); the kernel keeps its dtype."""
    out = jax.tree.map(lambda x: x, base)
    for path, delta in deltas:
        node = out
        for k in path:
            node = node[k]
        node["kernel"] = (node["kernel"] + delta).astype(node["kernel"].dtype)
    return out


def merge(definition: Definition, base: dict, tree: dict) -> dict:
    """Base parameters with scale * B A folded into each adapted kernel (kernel is [in, out])."""
    return add_to_kernels(base, ((p, jnp.swapaxes(d, -1, -2)) for p, d in delta_weights(definition, tree)))


def reinit(tree: dict, key: Key) -> dict:
    """Fresh factors of the same shapes: A ~ U(-1/sqrt(in), 1/sqrt(in)) as PEFT (and
    models.layers.Linear) initialise it, B = 0. Jittable; used when stacking restarts adapters."""
    i = 0

    def rec(node: dict, k: Key) -> dict:
        nonlocal i
        if "lora_a" in node:
            a = node["lora_a"]
            bound = 1.0 / jnp.sqrt(jnp.asarray(a.shape[-1], a.dtype))
            i += 1
            return {
                "lora_a": jax.random.uniform(jax.random.fold_in(k, i), a.shape, a.dtype, -bound, bound),
                "lora_b": jnp.zeros_like(node["lora_b"]),
            }
        return {name: rec(child, k) for name, child in node.items()}

    return rec(tree, key)
