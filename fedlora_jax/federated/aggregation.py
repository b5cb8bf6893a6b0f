"""Server-side aggregation of the clients' released adapters: small objects the round composes
(optax's pattern: state in, state out), registered in one table.

An aggregator folds each chunk of released adapters into a running sum (`accumulate`), turns the
sum into the new global adapter at the end of the round (`finalize`), may restart the adapters after
the server step (`restart`), and may keep its own server state (`init_state`: a dict of arrays,
ServerState.agg, passed back to `zeros`, `finalize` and `effective_base`).
A new aggregation is one subclass with `@register` (the config's fl.aggregation choices are this table).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import jax
import jax.numpy as jnp

from ..adapters import lora as lora_lib
from ..core import choices
from ..core.errors import UserError
from ..core.numerics import DIVISION_FLOOR
from ..core.pytypes import Array, Key, Tree

if TYPE_CHECKING:
    from ..config.run_config import RunConfig
    from ..models import Definition

AGGREGATORS: dict[str, Aggregator] = choices.table("fl.aggregation")  # the config's fl.aggregation choices


def register(cls: type[Aggregator]) -> type[Aggregator]:
    """Class decorator: add an aggregator to the table under cls.name."""
    AGGREGATORS[cls.name] = cls()
    return cls


def names() -> tuple[str, ...]:
    return tuple(AGGREGATORS)


def get(name: str) -> Aggregator:
    if name not in AGGREGATORS:
        raise UserError(f"fl.aggregation = {name!r} is not allowed; choose one of: {', '.join(AGGREGATORS)}")
    return AGGREGATORS[name]


class Aggregator:
    name: ClassVar[str] = ""
    algorithms: ClassVar[tuple[str, ...] | None] = None  # the FL algorithms it runs with (None: all)
    mixed_ranks: ClassVar[bool] = False  # clients of different ranks can be combined

    def check(self, cfg: RunConfig) -> None:
        fl = cfg.fl
        if self.algorithms is not None and fl.algorithm not in self.algorithms:
            raise UserError(f"fl.aggregation {self.name} runs with {' or '.join(self.algorithms)}, not {fl.algorithm}")
        ranks = cfg.lora.client_ranks
        if ranks is not None and len(set(ranks)) > 1 and not self.mixed_ranks:
            raise UserError(
                f"mixed client ranks need an aggregation that combines them (stack); fl.aggregation {self.name} cannot"
            )

    def init_state(self, lora: Tree) -> dict:
        """The server state (a dict of arrays) this aggregator keeps across rounds ({}: none)."""
        return {}

    def zeros(self, state: dict, global_lora: Tree) -> Tree:
        raise NotImplementedError

    def accumulate(self, total: Tree, definition: Definition, released: Tree, weights: Array) -> Tree:
        """total + the weighted contribution of one chunk of released adapters [clients, ...]."""
        raise NotImplementedError

    def finalize(
        self, state: dict, total: Tree, weight_sum: Array, any_kept: Array, global_lora: Tree
    ) -> tuple[Tree, dict]:
        """(aggregate adapter, this aggregator's new state) at the end of a round."""
        raise NotImplementedError

    def restart(self, new_lora: Tree, global_lora: Tree, key: Key) -> Tree:
        """The global adapter after the server step (restarted for stacking)."""
        return new_lora

    def effective_base(self, base: dict, state: dict) -> dict:
        """The frozen base as the clients see it (stacking merges its sums into it)."""
        return base


@register
class Mean(Aggregator):
    """A and B averaged separately, weighted (the paper's code: FedAvg over the PEFT state dict). A
    round whose every release was dropped leaves the global adapter where it was."""

    name: ClassVar[str] = "mean"

    def zeros(self, state: dict, global_lora: Tree) -> Tree:
        return jax.tree.map(jnp.zeros_like, global_lora)

    def accumulate(self, total: Tree, definition: Definition, released: Tree, weights: Array) -> Tree:
        return jax.tree.map(jnp.add, total, weighted_mean(released, weights))

    def finalize(
        self, state: dict, total: Tree, weight_sum: Array, any_kept: Array, global_lora: Tree
    ) -> tuple[Tree, dict]:
        wsum = jnp.maximum(weight_sum, DIVISION_FLOOR)
        return jax.tree.map(lambda s, x: jnp.where(any_kept, s / wsum, x), total, global_lora), state


@register
class Stack(Aggregator):
    """sum_k p_k scale B_k A_k merged into the base each round (the paper's text: stacking
    [B_1..B_K][A_1;..;A_K], FLoRA); heterogeneous ranks allowed; the adapters restart each round."""

    name: ClassVar[str] = "stack"
    algorithms: ClassVar[tuple[str, ...]] = ("fedavg", "fedprox")
    mixed_ranks: ClassVar[bool] = True

    def init_state(self, lora: Tree) -> dict:
        return {
            "delta_w": {
                "/".join(p): jnp.zeros(
                    (m["lora_a"].shape[0], m["lora_a"].shape[-1], m["lora_b"].shape[-2]), m["lora_a"].dtype
                )
                for p, m in lora_lib.modules(lora)
            }
        }

    def zeros(self, state: dict, global_lora: Tree) -> dict[str, Array]:
        return jax.tree.map(jnp.zeros_like, state["delta_w"])

    def accumulate(
        self, total: dict[str, Array], definition: Definition, released: Tree, weights: Array
    ) -> dict[str, Array]:
        part = stacked_product(definition, released, weights)
        return {k: total[k] + part[k] for k in part}

    def finalize(
        self, state: dict, total: dict[str, Array], weight_sum: Array, any_kept: Array, global_lora: Tree
    ) -> tuple[Tree, dict]:
        wsum = jnp.maximum(weight_sum, DIVISION_FLOOR)
        # the product goes into the base; the adapter itself is restarted after the server step
        return global_lora, {"delta_w": {k: state["delta_w"][k] + total[k] / wsum for k in total}}

    def restart(self, new_lora: Tree, global_lora: Tree, key: Key) -> Tree:
        return lora_lib.reinit(global_lora, key)

    def effective_base(self, base: dict, state: dict) -> dict:
        if "delta_w" not in state:
            return base
        return lora_lib.add_to_kernels(base, ((k.split("/"), d) for k, d in state["delta_w"].items()))


def effective_base(base: dict, state: dict) -> dict:
    """The base an aggregator's state (ServerState.agg) implies (identity for mean)."""
    for a in AGGREGATORS.values():
        base = a.effective_base(base, state)
    return base


# ----------------------------------------------------------------------------- reductions


def normalized_weights(num_examples: Array, valid: Array) -> Array:
    """p_k proportional to example counts over the valid (finite, participating) clients."""
    w = jnp.where(valid, num_examples, 0.0)
    return w / jnp.maximum(jnp.sum(w), DIVISION_FLOOR)


def weighted_mean(stacked: Tree, weights: Array) -> Tree:
    """sum_k p_k x_k over the leading client axis (A and B averaged separately: the paper's code)."""
    return jax.tree.map(lambda x: jnp.tensordot(weights.astype(x.dtype), x, axes=1), stacked)


def stacked_product(definition: Definition, stacked: Tree, weights: Array) -> dict[str, Array]:
    """sum_k p_k scale B_k A_k per module: the paper's text (stacking [B_1..B_K][A_1;..;A_K],
    FLoRA). Returns {'a/b/module': kernel delta [layers, in, out]} (our kernel layout)."""
    scale = definition.lora.scale
    return {
        "/".join(path): scale
        * jnp.einsum("k,klor,klri->lio", weights.astype(m["lora_a"].dtype), m["lora_b"], m["lora_a"])
        for path, m in lora_lib.modules(stacked)
    }


def zero_invalid(stacked: Tree, valid: Array) -> Tree:
    """Replace non-finite or non-participating clients' trees by zeros (so 0 * NaN never enters)."""

    def fn(x: Array) -> Array:
        v = valid.reshape((-1,) + (1,) * (x.ndim - 1))
        return jnp.where(v, x, jnp.zeros_like(x))

    return jax.tree.map(fn, stacked)


def all_finite(stacked: Tree) -> Array:
    """Per client: is every entry of its tree finite?"""
    leaves = [jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1) for x in jax.tree.leaves(stacked)]
    return jnp.all(jnp.stack(leaves), axis=0)
