"""The federated round as one jitted function, built from parts.

round_fn(state, base, cohort, keys, lr) -> (state, metrics):
vmap(client_fn) -> mechanism.release -> aggregator.accumulate (per chunk) -> finalize -> server
optimizer step. The parts (optax's pattern: small objects with init/update, composed):
  client_fn   local training of one client (fedlora_jax.federated.client.client_update, bound to the model)
  mechanism   every privacy decision (fedlora_jax.privacy.mechanisms); the round never branches on the mode
  aggregator  folds released adapters into sums and turns them into the aggregate (fedlora_jax.federated.aggregation)
  hook        what the FL algorithm adds on the clients and keeps on the server (fedlora_jax.federated.algorithms)
  server_opt  an optax transformation of the pseudo-gradient global - aggregate (fedlora_jax.federated.server)
`make_round` composes parts and reads no config; `round_parts` / `build_round` / `init_state` are
the only readers of a RunConfig here. keys: randomness.round_keys(seed, round), one per domain.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ..core import randomness
from ..core.pytypes import Array, ArrayLike, Key, Tree
from ..models import Definition
from ..privacy.mechanisms import Mechanism
from . import aggregation as agg
from . import mesh as mesh_lib
from .algorithms import ClientHook, client_hook, server_optimizer
from .client import client_update

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ..config.run_config import RunConfig

BATCH_KEYS = ("tokens", "attention_mask", "loss_mask")


class ServerState(NamedTuple):
    """The server's state between rounds (a pytree, checkpointed whole); parts without state hold {}."""

    lora: Tree  # the global adapter
    opt: optax.OptState  # the server optimizer's state
    round: jax.Array  # rounds done (int32 scalar)
    agg: dict  # the aggregator's (stack: the merged products, 'delta_w')
    hook: dict  # the algorithm's client hook's (SCAFFOLD: the control variates)
    mech: dict  # the DP mechanism's (adaptive clipping: the clip)


class Cohort(NamedTuple):
    """One round's clients in K static slots (a padded slot has valid False and id N)."""

    batches: dict  # tokens / attention_mask / loss_mask, [K, steps, batch, seq]
    num_examples: jax.Array  # [K] examples each client holds (aggregation weights)
    ids: jax.Array  # [K] int32 client ids
    ranks: jax.Array  # [K] int32 LoRA ranks (used when they differ)
    valid: jax.Array  # [K] bool

    @classmethod
    def of(
        cls,
        block: dict,
        ids: ArrayLike | Sequence[int],
        ranks: ArrayLike | Sequence[int],
        valid: ArrayLike | Sequence[bool],
    ) -> Cohort:
        """From a host block (data.batches: the batch arrays and num_examples) and the draw."""
        return cls(
            {k: jnp.asarray(block[k]) for k in BATCH_KEYS},
            jnp.asarray(block["num_examples"]),
            jnp.asarray(ids, jnp.int32),
            jnp.asarray(ranks, jnp.int32),
            jnp.asarray(valid, bool),
        )


def split_chunks(tree: Tree, n_chunks: int, size: int, fills: Tree, mesh: jax.sharding.Mesh | None = None) -> Tree:
    """[K, ...] leaves -> [n_chunks, size, ...], padded at the end with `fills` (a tree of scalars
    matching `tree`'s top level, or one scalar); each chunk's slots spread over the mesh's 'clients'."""

    def one(x: Array, fill: int | float | bool) -> Array:
        pad = n_chunks * size - x.shape[0]
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
        return mesh_lib.client_axis(x.reshape((n_chunks, size) + x.shape[1:]), mesh)

    return jax.tree.map(one, tree, fills)


@dataclass(frozen=True)
class RoundParts:
    """What a round is made of, read from a RunConfig once (round_parts)."""

    client_fn: Callable  # (base, global, batches, lr, rank, hook, ctx, dpsgd) -> (local, metrics, new_c)
    mechanism: Mechanism | None
    aggregator: agg.Aggregator
    hook: ClientHook
    server_opt: optax.GradientTransformation
    definition: Definition | None
    num_clients: int
    expected_cohort: int  # fl.clients_per_round: central DP's fixed denominator
    chunk: int | None = None  # clients vmapped at once (None: plan.auto_chunk)
    hetero: bool = False  # client ranks differ

    def init(self, lora: Tree) -> ServerState:
        return ServerState(
            lora=lora,
            opt=self.server_opt.init(lora),
            round=jnp.zeros((), jnp.int32),
            agg=self.aggregator.init_state(lora),
            hook=self.hook.init_state(lora, self.num_clients),
            mech=self.mechanism.init_state() if self.mechanism is not None else {},
        )


def round_parts(
    definition: Definition | None, cfg: RunConfig, mechanism: Mechanism | None, num_clients: int
) -> RoundParts:
    """The one place a round reads its RunConfig."""
    fl = cfg.fl
    return RoundParts(
        client_fn=partial(client_update, definition, weight_decay=fl.weight_decay, freeze_a=cfg.lora.freeze_a),
        mechanism=mechanism,
        aggregator=agg.get(fl.aggregation),
        hook=client_hook(fl),
        server_opt=server_optimizer(fl),
        definition=definition,
        num_clients=num_clients,
        expected_cohort=fl.clients_per_round,
        chunk=fl.clients_per_chunk,
        hetero=cfg.lora.client_ranks is not None,
    )


def init_state(cfg: RunConfig, lora: Tree, num_clients: int, mechanism: Mechanism | None = None) -> ServerState:
    """The server state of a run config's round (mechanism None: no mechanism state)."""
    return round_parts(None, cfg, mechanism, num_clients).init(lora)


def build_round(
    definition: Definition,
    cfg: RunConfig,
    mechanism: Mechanism,
    num_clients: int,
    donate: bool = False,
    mesh: jax.sharding.Mesh | None = None,
) -> Callable[[ServerState, dict, Cohort, dict[str, Key], Array | float], tuple[ServerState, dict]]:
    """The jitted round of a run config and its DP mechanism (make_round of round_parts)."""
    return make_round(round_parts(definition, cfg, mechanism, num_clients), donate=donate, mesh=mesh)


def effective_base(base: dict, state: ServerState) -> dict:
    """The frozen base as the clients see it (the aggregator's state may merge into it)."""
    return agg.effective_base(base, state.agg)


def make_round(
    parts: RoundParts, *, donate: bool = False, mesh: jax.sharding.Mesh | None = None
) -> Callable[[ServerState, dict, Cohort, dict[str, Key], Array | float], tuple[ServerState, dict]]:
    """The jitted round of its parts. Nothing in it depends on values that change per round, so
    the second call compiles nothing. donate=True lets XLA reuse the old state's buffers (the
    caller must not touch the state it passed in again).

    Clients run in chunks of parts.chunk (default mesh.auto_chunk: the whole cohort on accelerators,
    ~2,048 tokens per local step on CPU) under lax.scan, vmapped within
    a chunk; each chunk is folded into running sums, so memory grows with the chunk, not the cohort.
    A cohort that the chunk does not divide is padded with invalid clients.
    mesh: a ('clients', 'model') jax.sharding.Mesh (fedlora_jax.federated.mesh): each chunk's clients are
    spread over 'clients', the base is split over 'model' (adapters replicated)."""
    mechanism, aggregator, hook, server_opt = parts.mechanism, parts.aggregator, parts.hook, parts.server_opt
    num_clients, hetero = parts.num_clients, parts.hetero

    def one_client(
        state: ServerState,
        base: dict,
        batches: dict[str, Array],
        cid: Array,
        rank: Array,
        keys: dict[str, Key],
        lr: Array,
    ) -> tuple[Tree, dict[str, Array], Tree | None, Array]:
        global_lora = state.lora
        rank = rank if hetero else None
        local, metrics, new_c = parts.client_fn(
            base,
            global_lora,
            batches,
            lr,
            rank=rank,
            hook=hook,
            ctx=hook.context(state.hook, cid),
            dpsgd=mechanism.dpsgd_args(randomness.client_key(keys["dpsgd_noise"], cid)),
        )
        released = mechanism.release(
            local, global_lora, randomness.client_key(keys["client_noise"], cid), rank, state.mech
        )
        kept = mechanism.kept(released, metrics["loss"])
        return released, {**metrics, "stat": mechanism.client_stat(local, global_lora, state.mech)}, new_c, kept

    def accumulate(
        carry: dict, global_lora: Tree, released: Tree, kept: Array, n_ex: Array, ids: Array, new_c: Tree | None
    ) -> dict:
        """Fold one chunk of released adapters into the running sums (never all clients at once)."""
        carry = dict(carry)
        if mechanism.sums_updates:  # sum of clipped updates; the mechanism noises it in finalize
            f = kept.astype(jnp.float32)
            carry["sum"] = jax.tree.map(
                lambda s, r, x: s + jnp.tensordot(f, r - x[None], axes=1), carry["sum"], released, global_lora
            )
        else:
            w = jnp.where(kept, mechanism.weight(n_ex), 0.0)
            carry["wsum"] = carry["wsum"] + jnp.sum(w)
            carry["sum"] = aggregator.accumulate(carry["sum"], parts.definition, released, w)
        carry["hook"] = hook.accumulate(carry["hook"], new_c, kept, ids)
        return carry

    def round_fn(
        state: ServerState, base: dict, cohort: Cohort, keys: dict[str, Key], lr: Array | float
    ) -> tuple[ServerState, dict]:
        global_lora = state.lora
        if mesh_lib.model_size(mesh) > 1:  # the base stays split however the caller placed it
            base = jax.lax.with_sharding_constraint(base, mesh_lib.base_shardings(base, mesh))
        base_eff = effective_base(base, state)
        size = cohort.ids.shape[0]
        spread = mesh_lib.clients_size(mesh)  # every 'clients' row gets as many slots (padding if needed)
        platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
        tokens = math.prod(cohort.batches["tokens"].shape[2:])  # [K, steps, batch, seq]: per local step
        c = min(parts.chunk or mesh_lib.auto_chunk(size, tokens, platform, spread), size)
        c = -(-c // spread) * spread
        n_chunks = -(-size // c)
        fills = Cohort({k: 0 for k in cohort.batches}, 0, num_clients, 1, False)
        xs = split_chunks(cohort, n_chunks, c, fills, mesh)
        carry = {"wsum": jnp.zeros((), jnp.float32), "stat": jnp.zeros((), jnp.float32)}
        carry["sum"] = (
            jax.tree.map(jnp.zeros_like, global_lora)
            if mechanism.sums_updates
            else aggregator.zeros(state.agg, global_lora)
        )
        carry["hook"] = hook.carry(state.hook, global_lora)

        def body(carry: dict, x: Cohort) -> tuple[dict, dict]:
            released, metrics, new_c, kept = jax.vmap(lambda b, i, r: one_client(state, base_eff, b, i, r, keys, lr))(
                x.batches, x.ids, x.ranks
            )
            kept = kept & x.valid
            released = agg.zero_invalid(released, kept)
            carry = accumulate(carry, global_lora, released, kept, x.num_examples, x.ids, new_c)
            carry["stat"] = carry["stat"] + jnp.sum(jnp.where(kept, metrics["stat"], 0.0))
            return carry, {**metrics, "kept": kept}

        carry, per = jax.lax.scan(body, carry, xs)
        per = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:])[:size], per)
        kept = per["kept"]
        agg_state, mech_state = state.agg, state.mech
        if mechanism.sums_updates:
            # the noise is added in every round, empty or all-dropped cohorts included
            aggregate, mech_state = mechanism.finalize_sum_with_state(
                carry["sum"], global_lora, keys["server_noise"], parts.expected_cohort, state.mech
            )
        else:  # a function of the releases only (post-processing), empty rounds included
            aggregate, agg_state = aggregator.finalize(
                state.agg, carry["sum"], carry["wsum"], jnp.any(kept), global_lora
            )
        pseudo_grad = jax.tree.map(jnp.subtract, global_lora, aggregate)
        updates, opt_state = server_opt.update(pseudo_grad, state.opt, global_lora)
        new_state = ServerState(
            lora=aggregator.restart(optax.apply_updates(global_lora, updates), global_lora, keys["lora_reinit"]),
            opt=opt_state,
            round=state.round + 1,
            agg=agg_state,
            hook=hook.finalize(state.hook, carry["hook"], num_clients) if state.hook else state.hook,
            mech=mechanism.update_state(mech_state, carry["stat"], keys["clip_count_noise"], parts.expected_cohort)
            if state.mech
            else state.mech,
        )
        n_kept = jnp.sum(kept)
        denom = jnp.maximum(n_kept, 1)
        # client-derived values (the run loop publishes them only where the mechanism allows);
        # with no kept client the means are NaN, logged as null
        mean_kept = lambda v: jnp.where(n_kept > 0, jnp.sum(jnp.where(kept, v, 0.0)) / denom, jnp.nan)
        out = {
            "loss": mean_kept(per["loss"]),
            "first_loss": mean_kept(per["first_loss"]),
            "update_norm": mean_kept(per["update_norm"]),
            "dropped": jnp.sum(cohort.valid & ~kept),
            "client_loss": per["loss"],
            "mechanism": mechanism.round_values(state.mech),
        }
        if mesh is not None:  # every device (every host) holds the whole new state and the metrics
            new_state, out = mesh_lib.replicate_constraint((new_state, out), mesh)
        return new_state, out

    return jax.jit(round_fn, donate_argnums=(0,) if donate else ())
