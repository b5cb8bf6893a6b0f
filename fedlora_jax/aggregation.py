"""Server-side aggregation of the clients' (released) adapters: one reduction over clients."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import lora as lora_lib

AGGREGATIONS = ("mean", "stack")


def normalized_weights(num_examples, valid):
    """p_k proportional to example counts over the valid (finite, participating) clients."""
    w = jnp.where(valid, num_examples, 0.0)
    return w / jnp.maximum(jnp.sum(w), 1e-30)


def weighted_mean(stacked, weights):
    """sum_k p_k x_k over the leading client axis (A and B averaged separately: the paper's code)."""
    return jax.tree.map(lambda x: jnp.tensordot(weights.astype(x.dtype), x, axes=1), stacked)


def stacked_product(definition, stacked, weights):
    """sum_k p_k scale B_k A_k per module: the paper's text (stacking [B_1..B_K][A_1;..;A_K],
    FLoRA). Returns {'a/b/module': kernel delta [layers, in, out]} (our kernel layout)."""
    scale = definition.lora.scale
    return {"/".join(path): scale * jnp.einsum("k,klor,klri->lio", weights.astype(m["lora_a"].dtype), m["lora_b"], m["lora_a"])
            for path, m in lora_lib.modules(stacked)}


def add_kernel_deltas(base, deltas):
    """Base parameters with {'a/b/module': delta [layers, in, out]} added to the kernels."""
    out = jax.tree.map(lambda x: x, base)
    for path, delta in deltas.items():
        node = out
        for k in path.split("/"):
            node = node[k]
        node["kernel"] = (node["kernel"] + delta).astype(node["kernel"].dtype)
    return out


def zero_invalid(stacked, valid):
    """Replace non-finite or non-participating clients' trees by zeros (so 0 * NaN never enters)."""
    def fn(x):
        v = valid.reshape((-1,) + (1,) * (x.ndim - 1))
        return jnp.where(v, x, jnp.zeros_like(x))
    return jax.tree.map(fn, stacked)


def all_finite(stacked):
    """Per client: is every entry of its tree finite?"""
    leaves = [jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1) for x in jax.tree.leaves(stacked)]
    return jnp.all(jnp.stack(leaves), axis=0)
