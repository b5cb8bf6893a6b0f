"""One client's local training, pure: written for ONE client, vmapped by the caller."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from . import lora as lora_lib
from .models import mean_nll


def tree_sq_norm(tree):
    return sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree))


def client_update(definition, base, global_lora, batches, lr, *, rank=None, weight_decay=0.0,
                  prox_mu=0.0, control=None, freeze_a=False):
    """local_steps of AdamW (lr constant within the round) from the global adapter.

    batches: tokens/attention_mask/loss_mask of shape [steps, batch, seq] (lax.scan over steps).
    rank: this client's rank (traced scalar) when ranks differ; entries beyond it stay zero.
    prox_mu: FedProx's proximal term mu/2 ||w - w_global||^2.
    control: (c_global, c_client) for SCAFFOLD; the gradient is corrected by c_global - c_client.
    Returns (local adapter, metrics {loss (mean over steps), first_loss, update_norm}, new c_client).
    """
    def mask(t):
        return t if rank is None else lora_lib.rank_mask(t, rank)

    start = mask(global_lora)
    opt = optax.inject_hyperparams(optax.adamw)(learning_rate=lr, weight_decay=weight_decay)
    train_a = not freeze_a

    def loss_fn(lo, batch):
        loss = mean_nll(definition, base, mask(lo), batch["tokens"], batch["attention_mask"], batch["loss_mask"])
        if prox_mu:
            loss = loss + 0.5 * prox_mu * tree_sq_norm(jax.tree.map(jnp.subtract, lo, start))
        return loss

    def step(carry, batch):
        lo, opt_state = carry
        loss, grads = jax.value_and_grad(loss_fn)(lo, batch)
        if control is not None:
            grads = jax.tree.map(lambda g, c, ci: g + c - ci, grads, control[0], control[1])
        if not train_a:
            grads = lora_lib.map_modules(lambda a, b: (jnp.zeros_like(a), b), grads)
        updates, opt_state = opt.update(grads, opt_state, lo)
        if not train_a:  # no decay or momentum may move a frozen A
            updates = lora_lib.map_modules(lambda a, b: (jnp.zeros_like(a), b), updates)
        return (optax.apply_updates(lo, updates), opt_state), loss

    (local, _), losses = jax.lax.scan(step, (start, opt.init(start)), batches)
    local = mask(local)
    new_control = None
    if control is not None:  # SCAFFOLD option II: c_i+ = c_i - c + (x - y_i) / (K lr)
        k = losses.shape[0]
        new_control = jax.tree.map(lambda ci, c, x, y: ci - c + (x - y) / (k * lr),
                                   control[1], control[0], start, local)
    metrics = {"loss": jnp.mean(losses), "first_loss": losses[0],
               "update_norm": jnp.sqrt(tree_sq_norm(jax.tree.map(jnp.subtract, local, start)))}
    return local, metrics, new_control
