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
from jax.sharding import NamedSharding, PartitionSpec

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


def make_round(definition, cfg, noise: NoiseSpec, num_clients: int, donate: bool = False, mesh=None):
    """The jitted round for a run config. Nothing in it depends on values that change per round,
    so the second call compiles nothing. donate=True lets XLA reuse the old state's buffers (the
    caller must not touch the state it passed in again).

    Clients run in chunks of fl.clients_per_chunk (default: the whole cohort) under lax.scan,
    vmapped within a chunk; each chunk is folded into running sums, so memory grows with the
    chunk, not the cohort. A cohort that the chunk does not divide is padded with invalid clients.
    mesh: a jax.sharding.Mesh with a 'clients' axis; each chunk's clients are spread over it
    (base and adapter replicated)."""
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
        dpsgd = None
        if noise.mode == "dpsgd":  # record-level: clip and noise each step's per-example gradients
            dpsgd = (dp.clip_a, noise.sigma_a, mech.client_key(round_key, cid), float(fl.batch_size))
        local, metrics, new_c = client_update(
            definition, base, g, batches, lr, rank=rank if hetero else None, weight_decay=fl.weight_decay,
            prox_mu=prox_mu, control=control, freeze_a=cfg.lora.freeze_a, dpsgd=dpsgd)
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

    def accumulate(carry, g, released, finite, n_ex, ids, new_c):
        """Fold one chunk of released adapters into the running sums (never all clients at once)."""
        carry = dict(carry)
        f = finite.astype(jnp.float32)
        if noise.mode == "central":  # sum of clipped updates (unweighted: the sum's sensitivity is C)
            carry["sum"] = jax.tree.map(lambda s, r, x: s + jnp.tensordot(f, r - x[None], axes=1),
                                        carry["sum"], released, g)
        else:
            w = f * n_ex
            carry["wsum"] = carry["wsum"] + jnp.sum(w)
            if fl.aggregation == "stack":
                part = agg.stacked_product(definition, released, w)
                carry["sum"] = {k: carry["sum"][k] + part[k] for k in part}
            else:
                carry["sum"] = jax.tree.map(lambda s, r: s + jnp.tensordot(w, r, axes=1), carry["sum"], released)
        if scaffold:
            old = carry["controls"]
            cur = jax.tree.map(lambda c: c.at[ids].get(mode="fill", fill_value=0), old)
            keep = lambda n, o: jnp.where(finite.reshape((-1,) + (1,) * (n.ndim - 1)), n, o)
            new_c = jax.tree.map(keep, new_c, cur)
            carry["dc"] = jax.tree.map(lambda d, n, o: d + jnp.sum(n - o, axis=0), carry["dc"], new_c, cur)
            # padded slots carry the out-of-range id num_clients: their writes are dropped
            carry["controls"] = jax.tree.map(lambda o, n: o.at[ids].set(n, mode="drop"), old, new_c)
        return carry

    def round_fn(state, base, block, client_ids, ranks, valid, round_key, lr):
        g = state["lora"]
        base_eff = effective_base(base, state)
        k = client_ids.shape[0]
        c = min(fl.clients_per_chunk or k, k)
        if mesh is not None:  # every device gets the same number of client slots (padding if needed)
            c = -(-c // mesh.size) * mesh.size
        n_chunks = -(-k // c)
        pad = n_chunks * c - k

        def chunked(x, fill=0):  # [K, ...] -> [chunks, C, ...], padded with invalid clients
            x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
            x = x.reshape((n_chunks, c) + x.shape[1:])
            if mesh is not None:  # the client axis of each chunk is spread over the devices
                x = jax.lax.with_sharding_constraint(
                    x, NamedSharding(mesh, PartitionSpec(None, "clients", *([None] * (x.ndim - 2)))))
            return x

        xs = {"batches": {key: chunked(block[key]) for key in ("tokens", "attention_mask", "loss_mask")},
              "ids": chunked(client_ids, num_clients), "ranks": chunked(ranks, 1), "valid": chunked(valid, False),
              "n_ex": chunked(block["num_examples"])}
        carry = {"wsum": jnp.zeros((), jnp.float32)}
        if fl.aggregation == "stack" and noise.mode != "central":
            carry["sum"] = jax.tree.map(jnp.zeros_like, state["delta_w"])
        else:
            carry["sum"] = jax.tree.map(jnp.zeros_like, g)
        if scaffold:
            carry["controls"] = state["controls"]["clients"]
            carry["dc"] = jax.tree.map(jnp.zeros_like, g)

        def body(carry, x):
            released, metrics, new_c = jax.vmap(
                lambda b, i, r: one_client(state, base_eff, b, i, r, round_key, lr))(x["batches"], x["ids"], x["ranks"])
            finite = agg.all_finite(released) & jnp.isfinite(metrics["loss"]) & x["valid"]
            released = agg.zero_invalid(released, finite)
            carry = accumulate(carry, g, released, finite, x["n_ex"], x["ids"], new_c)
            return carry, {**metrics, "finite": finite}

        carry, per = jax.lax.scan(body, carry, xs)
        per = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:])[:k], per)
        finite = per["finite"]
        new_state = dict(state)
        if noise.mode == "central":
            # DP-FedAvg: noise on the sum of clipped updates, divided by the expected cohort size
            noisy = mech.add_noise(carry["sum"], jax.random.fold_in(round_key, SERVER_NOISE), sig_a, sig_b)
            aggregate = jax.tree.map(lambda x, t: x + t / fl.clients_per_round, g, noisy)
        elif fl.aggregation == "stack":
            wsum = jnp.maximum(carry["wsum"], 1e-30)
            new_state["delta_w"] = {key: state["delta_w"][key] + carry["sum"][key] / wsum for key in carry["sum"]}
            aggregate = g  # the product went into the base; adapters restart below
        else:
            aggregate = jax.tree.map(lambda s: s / jnp.maximum(carry["wsum"], 1e-30), carry["sum"])
        # a round where every client was dropped leaves the global adapter where it was
        aggregate = jax.tree.map(lambda a, x: jnp.where(jnp.any(finite), a, x), aggregate, g)
        pseudo_grad = jax.tree.map(jnp.subtract, g, aggregate)
        updates, new_state["opt"] = server_opt.update(pseudo_grad, state["opt"], g)
        new_g = optax.apply_updates(g, updates)
        if fl.aggregation == "stack":
            new_g = lora_lib.reinit(g, jax.random.fold_in(round_key, REINIT))
        new_state["lora"] = new_g
        if scaffold:
            new_state["controls"] = {
                "global": jax.tree.map(lambda c0, d: c0 + d / num_clients, state["controls"]["global"], carry["dc"]),
                "clients": carry["controls"]}
        new_state["round"] = state["round"] + 1
        n_ok = jnp.maximum(jnp.sum(finite), 1)
        out = {"loss": jnp.sum(jnp.where(finite, per["loss"], 0.0)) / n_ok,
               "first_loss": jnp.sum(jnp.where(finite, per["first_loss"], 0.0)) / n_ok,
               "update_norm": jnp.sum(jnp.where(finite, per["update_norm"], 0.0)) / n_ok,
               "dropped": jnp.sum(valid & ~finite), "client_loss": per["loss"]}
        return new_state, out

    return jax.jit(round_fn, donate_argnums=(0,) if donate else ())


def cosine_lr(round_index: int, rounds: int, lr: float, lr_min: float) -> float:
    """The paper's schedule: cosine over rounds from lr to lr_min, constant within a round."""
    return lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * round_index / rounds))
