"""The federated round as one jitted function, and the run loop around it.

round_fn(state, base, block, client_ids, ranks, valid, round_key, lr) -> (state, metrics):
vmap(client_update) -> privatize (DP mode) -> aggregate -> server optimizer step.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import aggregation as agg
from . import lora as lora_lib
from .client import client_update
from .privacy import mechanisms as mech
from .server import server_optimizer


# fold_in domains of the round key beside the client ids (client ids stay below these)
SERVER_NOISE = 2 ** 31 - 1
REINIT = 2 ** 31 - 2


@dataclasses.dataclass(frozen=True)
class NoiseSpec:
    """The DP noise of a run, resolved on the host (see resolve_noise)."""

    mode: str = "none"
    sigma_a: float = 0.0
    sigma_b: float = 0.0
    z: float = 0.0              # sigma / C per clipped tensor
    z_eff: float = math.inf     # the equivalent single-Gaussian multiplier of one release / round
    blocks: tuple = (0, 0)      # separately clipped A and B blocks of one release


def init_state(cfg, lora, num_clients: int):
    fl = cfg.fl
    opt = server_optimizer(fl)
    state = {"lora": lora, "opt": opt.init(lora), "round": jnp.zeros((), jnp.int32)}
    if fl.algorithm == "scaffold":
        zeros = jax.tree.map(jnp.zeros_like, lora)
        state["controls"] = {"global": zeros,
                             "clients": jax.tree.map(lambda x: jnp.zeros((num_clients,) + x.shape, x.dtype), lora)}
    if fl.aggregation == "stack":
        state["delta_w"] = {"/".join(p): jnp.zeros((m["lora_a"].shape[0], m["lora_a"].shape[-1], m["lora_b"].shape[-2]),
                                                   m["lora_a"].dtype)
                            for p, m in lora_lib.modules(lora)}
    return state


def effective_base(base, state):
    return agg.add_kernel_deltas(base, state["delta_w"]) if "delta_w" in state else base


def make_round(definition, cfg, noise: NoiseSpec, num_clients: int, donate: bool = False):
    """The jitted round for a run config. Nothing in it depends on values that change per round,
    so the second call compiles nothing. donate=True lets XLA reuse the old state's buffers (the
    caller must not touch the state it passed in again)."""
    fl, dp = cfg.fl, cfg.dp
    server_opt = server_optimizer(fl)
    hetero = cfg.lora.client_ranks is not None
    scaffold = fl.algorithm == "scaffold"
    prox_mu = fl.prox_mu if fl.algorithm == "fedprox" else 0.0
    global_scope = dp.scope == "global"
    sig_a, sig_b = noise.sigma_a, (noise.sigma_a if global_scope else noise.sigma_b)
    clip_b = dp.clip_a if global_scope else dp.clip_b

    def one_client(state, base, batches, cid, rank, round_key, lr):
        g = state["lora"]
        control = None
        if scaffold:
            control = (state["controls"]["global"],
                       jax.tree.map(lambda c: c[cid], state["controls"]["clients"]))
        local, metrics, new_c = client_update(
            definition, base, g, batches, lr, rank=rank if hetero else None, weight_decay=fl.weight_decay,
            prox_mu=prox_mu, control=control, freeze_a=cfg.lora.freeze_a)
        if noise.mode == "local":
            released = mech.privatize(local, g, mech.client_key(round_key, cid), clip_a=dp.clip_a, clip_b=clip_b,
                                      sigma_a=sig_a, sigma_b=sig_b, scope=dp.scope, target=dp.target)
            if hetero:  # post-processing: keep the padded entries of a low-rank client at zero
                released = lora_lib.rank_mask(released, rank)
            if cfg.lora.freeze_a:  # A is public (frozen and shared): only B is released
                released = lora_lib.map_modules(lambda a, a0, b, b0: (a0, b), released, g)
        elif noise.mode == "central":
            upd, _ = mech.clip(jax.tree.map(jnp.subtract, local, g), dp.clip_a, clip_b, dp.scope)
            released = jax.tree.map(jnp.add, g, upd)
        else:
            released = local
        return released, metrics, new_c

    def round_fn(state, base, block, client_ids, ranks, valid, round_key, lr):
        g = state["lora"]
        base_eff = effective_base(base, state)
        batches = {k: block[k] for k in ("tokens", "attention_mask", "loss_mask")}
        fn = lambda xs: one_client(state, base_eff, xs[0], xs[1], xs[2], round_key, lr)
        xs = (batches, client_ids, ranks)
        if fl.clients_per_chunk:
            released, metrics, new_c = jax.lax.map(fn, xs, batch_size=fl.clients_per_chunk)
        else:
            released, metrics, new_c = jax.vmap(fn)(xs)
        finite = agg.all_finite(released) & jnp.isfinite(metrics["loss"]) & valid
        released = agg.zero_invalid(released, finite)
        new_state = dict(state)
        if noise.mode == "central":
            # DP-FedAvg: noise on the sum of clipped updates, divided by the expected cohort size
            total = jax.tree.map(lambda r, x: jnp.tensordot(finite.astype(r.dtype), r - x[None], axes=1),
                                 released, g)
            noisy = mech.add_noise(total, jax.random.fold_in(round_key, SERVER_NOISE), sig_a, sig_b)
            aggregate = jax.tree.map(lambda x, t: x + t / fl.clients_per_round, g, noisy)
        else:
            p = agg.normalized_weights(block["num_examples"], finite)
            if fl.aggregation == "stack":
                deltas = agg.stacked_product(definition, released, p)
                new_state["delta_w"] = {k: state["delta_w"][k] + deltas[k] for k in deltas}
                aggregate = g  # the product went into the base; adapters restart below
            else:
                aggregate = agg.weighted_mean(released, p)
        # a round where every client was dropped leaves the global adapter where it was
        aggregate = jax.tree.map(lambda a, x: jnp.where(jnp.any(finite), a, x), aggregate, g)
        pseudo_grad = jax.tree.map(jnp.subtract, g, aggregate)
        updates, new_state["opt"] = server_opt.update(pseudo_grad, state["opt"], g)
        new_g = optax.apply_updates(g, updates)
        if fl.aggregation == "stack":
            new_g = lora_lib.reinit(g, jax.random.fold_in(round_key, REINIT))
        new_state["lora"] = new_g
        if scaffold:
            old = state["controls"]["clients"]
            cur = jax.tree.map(lambda c: c[client_ids], old)
            keep = lambda n, o: jnp.where(finite.reshape((-1,) + (1,) * (n.ndim - 1)), n, o)
            new_c = jax.tree.map(keep, new_c, cur)
            delta_c = jax.tree.map(lambda n, o: jnp.sum(n - o, axis=0) / num_clients, new_c, cur)
            new_state["controls"] = {
                "global": jax.tree.map(jnp.add, state["controls"]["global"], delta_c),
                "clients": jax.tree.map(lambda o, n: o.at[client_ids].set(n), old, new_c)}
        new_state["round"] = state["round"] + 1
        n_ok = jnp.maximum(jnp.sum(finite), 1)
        out = {"loss": jnp.sum(jnp.where(finite, metrics["loss"], 0.0)) / n_ok,
               "first_loss": jnp.sum(jnp.where(finite, metrics["first_loss"], 0.0)) / n_ok,
               "update_norm": jnp.sum(jnp.where(finite, metrics["update_norm"], 0.0)) / n_ok,
               "dropped": jnp.sum(valid & ~finite), "client_loss": metrics["loss"]}
        return new_state, out

    return jax.jit(round_fn, donate_argnums=(0,) if donate else ())


def cosine_lr(round_index: int, rounds: int, lr: float, lr_min: float) -> float:
    """The paper's schedule: cosine over rounds from lr to lr_min, constant within a round."""
    return lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * round_index / rounds))
