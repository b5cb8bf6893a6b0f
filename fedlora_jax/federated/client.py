"""One client's local training, pure: written for ONE client, vmapped by the caller."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from ..adapters import lora as lora_lib
from ..core.numerics import DIVISION_FLOOR
from ..core.pytypes import Array, Tree
from ..models import Definition, mean_nll
from .algorithms import ClientHook


def tree_sq_norm(tree: Tree) -> Array:
    return sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree))


def dpsgd_grads(
    definition: Definition,
    base: Tree,
    lora: Tree,
    batch: dict[str, Array],
    clip: float,
    sigma: float,
    key: Array,
    expected: float,
    *,
    mask: Callable[[Tree], Tree] = lambda t: t,
    freeze_a: bool = False,
) -> tuple[Array, Tree]:
    """(mean loss of the taken examples, DP-SGD gradient) of one batch [capacity, seq]: each
    example's gradient of its own mean token NLL, clipped to L2 norm `clip` over the adapter,
    summed, plus N(0, sigma^2) per entry (leaf i uses fold_in(key, i)), divided by `expected`.
    Examples with an all-zero loss_mask (padding) have a zero gradient."""

    def one(t: Array, a: Array, m: Array) -> tuple[Array, Tree]:
        return jax.value_and_grad(lambda x: mean_nll(definition, base, mask(x), t[None], a[None], m[None]))(lora)

    losses, per_example_grads = jax.vmap(one)(batch["tokens"], batch["attention_mask"], batch["loss_mask"])
    if freeze_a:  # a frozen A is not trained: its gradient is neither clipped nor released
        per_example_grads = lora_lib.map_modules(lambda a, b: (jnp.zeros_like(a), b), per_example_grads)
    norms = jnp.sqrt(
        sum(jnp.sum(jnp.square(x), axis=tuple(range(1, x.ndim))) for x in jax.tree.leaves(per_example_grads))
    )
    scale = jnp.minimum(1.0, clip / jnp.maximum(norms, DIVISION_FLOOR))
    leaves, treedef = jax.tree.flatten(jax.tree.map(lambda x: jnp.tensordot(scale, x, axes=1), per_example_grads))
    noisy = [
        (x + sigma * jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)) / expected
        for i, x in enumerate(leaves)
    ]
    taken = jnp.any(batch["loss_mask"] > 0, axis=1)
    loss = jnp.sum(jnp.where(taken, losses, 0.0)) / jnp.maximum(jnp.sum(taken), 1)
    return loss, jax.tree.unflatten(treedef, noisy)


def client_update(
    definition: Definition,
    base: Tree,
    global_lora: Tree,
    batches: dict[str, Array],
    lr: Array | float,
    *,
    rank: Array | None = None,
    weight_decay: float = 0.0,
    hook: ClientHook | None = None,
    ctx: Any = None,
    freeze_a: bool = False,
    dpsgd: tuple[float, float, Array, float] | None = None,
) -> tuple[Tree, dict[str, Array], Tree | None]:
    """local_steps of AdamW (lr constant within the round) from the global adapter.

    batches: tokens/attention_mask/loss_mask of shape [steps, batch, seq] (lax.scan over steps).
    rank: this client's rank (traced scalar) when ranks differ; entries beyond it stay zero.
    hook, ctx: the algorithm's client hook (fedlora_jax.federated.algorithms) and this client's context from
    hook.context: it corrects each step's gradient (FedProx's proximal term, SCAFFOLD's c - c_i,
    after DP-SGD's noise) and computes the client's new state (SCAFFOLD's c_i) at the end.
    dpsgd: (clip, sigma, key, expected_batch) for record-level DP-SGD: each example's gradient
    (of its own mean token NLL) is clipped to L2 norm `clip` over the whole adapter, the clipped
    gradients are summed, N(0, sigma^2) is added per entry (a fresh key per step) and the sum is
    divided by the expected batch size (a constant, so the noise scale does not leak the draw).
    Padding examples have loss_mask 0 and so a zero gradient.
    Returns (local adapter, metrics {loss (mean data NLL over steps), first_loss, update_norm},
    the hook's new client state or None).
    """

    def mask(t: Tree) -> Tree:
        return t if rank is None else lora_lib.rank_mask(t, rank)

    start = mask(global_lora)
    opt = optax.inject_hyperparams(optax.adamw)(learning_rate=lr, weight_decay=weight_decay)
    train_a = not freeze_a

    hook = hook or ClientHook()

    def loss_fn(lo: Tree, batch: dict[str, Array]) -> Array:
        return mean_nll(definition, base, mask(lo), batch["tokens"], batch["attention_mask"], batch["loss_mask"])

    if dpsgd is not None:
        clip, sigma, dp_key, expected = dpsgd

    def step(
        carry: tuple[Tree, optax.OptState, Array], batch: dict[str, Array]
    ) -> tuple[tuple[Tree, optax.OptState, Array], Array]:
        lo, opt_state, i = carry
        if dpsgd is None:
            loss, grads = jax.value_and_grad(loss_fn)(lo, batch)
        else:
            loss, grads = dpsgd_grads(
                definition,
                base,
                lo,
                batch,
                clip,
                sigma,
                jax.random.fold_in(dp_key, i),
                expected,
                mask=mask,
                freeze_a=freeze_a,
            )
        grads = hook.correct(grads, lo, start, ctx)  # depends on no example: after the noise
        if not train_a:
            grads = lora_lib.map_modules(lambda a, b: (jnp.zeros_like(a), b), grads)
        updates, opt_state = opt.update(grads, opt_state, lo)
        if not train_a:  # no decay or momentum may move a frozen A
            updates = lora_lib.map_modules(lambda a, b: (jnp.zeros_like(a), b), updates)
        return (optax.apply_updates(lo, updates), opt_state, i + 1), loss

    (local, _, _), losses = jax.lax.scan(step, (start, opt.init(start), jnp.zeros((), jnp.int32)), batches)
    local = mask(local)
    new_state = hook.finish(ctx, start, local, losses.shape[0], lr)
    metrics = {
        "loss": jnp.mean(losses),
        "first_loss": losses[0],
        "update_norm": jnp.sqrt(tree_sq_norm(jax.tree.map(jnp.subtract, local, start))),
    }
    return local, metrics, new_state
