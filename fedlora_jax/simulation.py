"""The federated round as one jitted function.

round_fn(state, base, block, client_ids, ranks, valid, keys, lr) -> (state, metrics):
vmap(client_update) -> mechanism.release -> aggregate -> server optimizer step. The DP mechanism
(fedlora_jax.privacy.modes) owns every privacy decision; the round asks it and never branches on
the mode. keys: randomness.round_keys(seed, round), one key per randomness domain.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from . import aggregation as agg
from . import mesh as mesh_lib
from .algorithms import client_hook, server_optimizer
from .client import client_update
from .models import Definition
from .privacy.modes import Mechanism


def init_state(cfg, lora: dict, num_clients: int, mechanism: Mechanism | None = None) -> dict:
    """The server state: adapter, server optimizer, round, and what the aggregator, the algorithm's
    client hook (SCAFFOLD's controls, under 'hook') and the DP mechanism (e.g. an adaptive clip,
    under 'mech') carry."""
    fl = cfg.fl
    opt = server_optimizer(fl)
    state = {
        "lora": lora,
        "opt": opt.init(lora),
        "round": jnp.zeros((), jnp.int32),
        **agg.get(fl.aggregation).init_state(lora),
    }
    mstate = mechanism.init_state() if mechanism is not None else {}
    if mstate:
        state["mech"] = mstate
    hstate = client_hook(fl).init_state(lora, num_clients)
    if hstate:
        state["hook"] = hstate
    return state


def effective_base(base: dict, state: dict) -> dict:
    return agg.effective_base(base, state)


def make_round(
    definition: Definition,
    cfg,
    mechanism: Mechanism,
    num_clients: int,
    donate: bool = False,
    mesh: jax.sharding.Mesh | None = None,
):
    """The jitted round for a run config and its DP mechanism. Nothing in it depends on values that
    change per round, so the second call compiles nothing. donate=True lets XLA reuse the old state's
    buffers (the caller must not touch the state it passed in again).

    Clients run in chunks of fl.clients_per_chunk (default: the whole cohort) under lax.scan,
    vmapped within a chunk; each chunk is folded into running sums, so memory grows with the
    chunk, not the cohort. A cohort that the chunk does not divide is padded with invalid clients.
    mesh: a ('clients', 'model') jax.sharding.Mesh (fedlora_jax.mesh): each chunk's clients are
    spread over 'clients', the base is split over 'model' (adapters replicated)."""
    fl = cfg.fl
    server_opt = server_optimizer(fl)
    hetero = cfg.lora.client_ranks is not None
    hook = client_hook(fl)
    aggregator = agg.get(fl.aggregation)

    def one_client(state, base, batches, cid, rank, keys, lr):
        g = state["lora"]
        local, metrics, new_c = client_update(
            definition,
            base,
            g,
            batches,
            lr,
            rank=rank if hetero else None,
            weight_decay=fl.weight_decay,
            hook=hook,
            ctx=hook.context(state.get("hook", {}), cid),
            freeze_a=cfg.lora.freeze_a,
            dpsgd=mechanism.dpsgd_args(jax.random.fold_in(keys["dpsgd_noise"], cid)),
        )
        mstate = state.get("mech", {})
        released = mechanism.release(
            local, g, jax.random.fold_in(keys["client_noise"], cid), rank if hetero else None, mstate
        )
        kept = mechanism.kept(released, metrics["loss"])
        return released, {**metrics, "stat": mechanism.client_stat(local, g, mstate)}, new_c, kept

    def accumulate(carry, g, released, kept, n_ex, ids, new_c):
        """Fold one chunk of released adapters into the running sums (never all clients at once)."""
        carry = dict(carry)
        if mechanism.sums_updates:  # sum of clipped updates; the mechanism noises it in finalize
            f = kept.astype(jnp.float32)
            carry["sum"] = jax.tree.map(
                lambda s, r, x: s + jnp.tensordot(f, r - x[None], axes=1), carry["sum"], released, g
            )
        else:
            w = jnp.where(kept, mechanism.weight(n_ex), 0.0)
            carry["wsum"] = carry["wsum"] + jnp.sum(w)
            carry["sum"] = aggregator.accumulate(carry["sum"], definition, released, w)
        carry["hook"] = hook.accumulate(carry["hook"], new_c, kept, ids)
        return carry

    def round_fn(state, base, block, client_ids, ranks, valid, keys, lr):
        g = state["lora"]
        if mesh_lib.model_size(mesh) > 1:  # the base stays split however the caller placed it
            base = jax.lax.with_sharding_constraint(base, mesh_lib.base_shardings(base, mesh))
        base_eff = effective_base(base, state)
        cohort = client_ids.shape[0]
        c = min(fl.clients_per_chunk or cohort, cohort)
        spread = mesh_lib.clients_size(mesh)  # every 'clients' row gets as many slots (padding if needed)
        c = -(-c // spread) * spread
        n_chunks = -(-cohort // c)
        pad = n_chunks * c - cohort

        def chunked(x, fill=0):  # [K, ...] -> [chunks, C, ...], padded with invalid clients
            x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
            return mesh_lib.client_axis(x.reshape((n_chunks, c) + x.shape[1:]), mesh)

        xs = {
            "batches": {key: chunked(block[key]) for key in ("tokens", "attention_mask", "loss_mask")},
            "ids": chunked(client_ids, num_clients),
            "ranks": chunked(ranks, 1),
            "valid": chunked(valid, False),
            "n_ex": chunked(block["num_examples"]),
        }
        carry = {"wsum": jnp.zeros((), jnp.float32), "stat": jnp.zeros((), jnp.float32)}
        carry["sum"] = jax.tree.map(jnp.zeros_like, g) if mechanism.sums_updates else aggregator.zeros(state, g)
        carry["hook"] = hook.carry(state.get("hook", {}), g)

        def body(carry, x):
            released, metrics, new_c, kept = jax.vmap(lambda b, i, r: one_client(state, base_eff, b, i, r, keys, lr))(
                x["batches"], x["ids"], x["ranks"]
            )
            kept = kept & x["valid"]
            released = agg.zero_invalid(released, kept)
            carry = accumulate(carry, g, released, kept, x["n_ex"], x["ids"], new_c)
            carry["stat"] = carry["stat"] + jnp.sum(jnp.where(kept, metrics["stat"], 0.0))
            return carry, {**metrics, "kept": kept}

        carry, per = jax.lax.scan(body, carry, xs)
        per = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:])[:cohort], per)
        kept = per["kept"]
        new_state = dict(state)
        if mechanism.sums_updates:
            # the noise is added in every round, empty or all-dropped cohorts included
            aggregate = mechanism.finalize_sum(
                carry["sum"], g, keys["server_noise"], fl.clients_per_round, state.get("mech", {})
            )
        else:  # a function of the releases only (post-processing), empty rounds included
            aggregate, extra = aggregator.finalize(state, carry["sum"], carry["wsum"], jnp.any(kept), g)
            new_state.update(extra)
        pseudo_grad = jax.tree.map(jnp.subtract, g, aggregate)
        updates, new_state["opt"] = server_opt.update(pseudo_grad, state["opt"], g)
        new_state["lora"] = aggregator.restart(optax.apply_updates(g, updates), g, keys["lora_reinit"])
        if "hook" in state:
            new_state["hook"] = hook.finalize(state["hook"], carry["hook"], num_clients)
        if "mech" in state:
            new_state["mech"] = mechanism.update_state(
                state["mech"], carry["stat"], keys["clip_count_noise"], fl.clients_per_round
            )
        new_state["round"] = state["round"] + 1
        n_kept = jnp.sum(kept)
        denom = jnp.maximum(n_kept, 1)
        # client-derived values (the run loop publishes them only where the mechanism allows);
        # with no kept client the means are NaN, logged as null
        mean_kept = lambda v: jnp.where(n_kept > 0, jnp.sum(jnp.where(kept, v, 0.0)) / denom, jnp.nan)
        out = {
            "loss": mean_kept(per["loss"]),
            "first_loss": mean_kept(per["first_loss"]),
            "update_norm": mean_kept(per["update_norm"]),
            "dropped": jnp.sum(valid & ~kept),
            "client_loss": per["loss"],
            "mechanism": mechanism.round_values(state.get("mech", {})),
        }
        if mesh is not None:  # every device (every host) holds the whole new state and the metrics
            new_state, out = mesh_lib.replicate_constraint((new_state, out), mesh)
        return new_state, out

    return jax.jit(round_fn, donate_argnums=(0,) if donate else ())


def cosine_lr(round_index: int, rounds: int, lr: float, lr_min: float) -> float:
    """The paper's schedule: cosine over rounds from lr to lr_min, constant within a round
    (optax's cosine_decay_schedule with alpha = lr_min / lr)."""
    if lr == 0:
        return 0.0
    schedule = optax.cosine_decay_schedule(init_value=lr, decay_steps=rounds, alpha=lr_min / lr)
    return float(schedule(round_index))
