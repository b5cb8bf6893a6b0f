"""Memory planning for a run: what one chunk of clients costs, and the largest clients_per_chunk
that fits a device.

The estimate is analytic (documented below); `measure` asks XLA for the compiled round's own
memory analysis on the current backend, which is exact for that backend.

On a ('clients', 'model') mesh (fl.devices = [clients, model]) every figure is per device: the
base's split kernels count 1/model on each device (fedlora_jax.federated.mesh says which), a client's
activations that the split produces (MLP, attention heads, logits over the vocab) count 1/model,
the residual stream and the adapter copies count whole, and a chunk's clients are spread over
the 'clients' rows, so the largest chunk is `clients` times what one row holds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from ..core import randomness
from ..core.errors import UserError
from ..core.pytypes import Tree
from ..models import abstract_model
from . import mesh as mesh_lib
from . import sampling
from .mesh import CPU_TOKENS_PER_CHUNK, auto_chunk  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    from jax.sharding import Mesh

    from ..config.run_config import RunConfig
    from ..models import Definition, ModelConfig

ADAPTER_COPIES = 6  # local factors, start point, gradient, two AdamW moments, the release


def _nbytes(tree, dtype_bytes=None):
    return sum(int(np.prod(x.shape)) * (dtype_bytes or jnp.dtype(x.dtype).itemsize) for x in jax.tree.leaves(tree))


def step_batch(cfg: RunConfig) -> int:
    """Examples per local step: fl.batch_size, or under dpsgd the padded Poisson capacity (an
    upper bound that needs no data)."""
    if _record_level(cfg):
        from ..data.batches import poisson_capacity_bound

        return poisson_capacity_bound(cfg.fl.batch_size)
    return cfg.fl.batch_size


def _record_level(cfg) -> bool:
    from ..privacy.mechanisms import MECHANISMS

    return MECHANISMS[cfg.dp.mode].record_level


def estimate(cfg: RunConfig, model_config: ModelConfig) -> dict:
    """Bytes of the base (shared), and per client in a chunk: adapter copies and activations of
    one local step (lax.scan runs steps one after another; the layer scan keeps each layer's
    inputs for the backward pass); per device of the mesh fl.devices."""
    lc = cfg.lora.to_lora_config()
    _, base, lora = abstract_model(model_config, lc)
    item = jnp.dtype(model_config.dtype).itemsize
    base = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(model_config.dtype)), base)
    base_bytes = _nbytes(base, item)
    rows, m = mesh_lib.mesh_shape(cfg.fl.devices)
    adapter = _nbytes(lora, 4)
    b, s = step_batch(cfg), cfg.data.seq_len
    h, f, heads, v = (
        model_config.hidden_size,
        model_config.intermediate_size or 4 * model_config.hidden_size,
        model_config.num_heads,
        model_config.vocab_size,
    )
    # per layer and token: ~8 hidden-sized tensors (residual, norms, q/k/v/o), 3 MLP-sized ones,
    # and the attention probabilities (float32 softmax over s keys per head, kept for backward)
    # (on a mesh the MLP-sized tensors, the attention heads and the logits are split over 'model')
    per_layer = b * s * (8 * h * item + (3 * f * item + 2 * heads * s * 4) / m)
    logits = 3 * b * s * v * 4 / m  # logits, log-softmax and their gradient, float32
    activations = int(model_config.num_layers * per_layer + logits)
    per_client = ADAPTER_COPIES * adapter + activations
    if _record_level(cfg):  # one float32 gradient per example of the padded batch
        per_client += b * adapter
    return {
        "mesh": [rows, m],
        "base_bytes": base_bytes,
        "base_bytes_per_device": mesh_lib.per_device_bytes(base, m),
        "adapter_bytes": adapter,
        "activation_bytes_per_client": activations,
        "per_client_bytes": per_client,
    }


def largest_chunk(est: dict, device_bytes: float, cohort: int, headroom: float = 0.9) -> int:
    """The most clients per chunk that fit `device_bytes` per device (each 'clients' row of the mesh
    holds chunk / rows of them)."""
    rows = est.get("mesh", [1, 1])[0]
    base = est.get("base_bytes_per_device", est["base_bytes"])
    free = device_bytes * headroom - base
    if free < est["per_client_bytes"]:
        where = "per device" if est.get("mesh", [1, 1]) != [1, 1] else ""
        raise UserError(
            f"cannot fit one client: base {base / 2**30:.2f} GiB {where}+ one client "
            f"{est['per_client_bytes'] / 2**30:.2f} GiB > {headroom:.0%} of {device_bytes / 2**30:.2f} GiB; "
            "lower data.seq_len or fl.batch_size, use model.dtype bfloat16, split the base over more "
            "devices (fl.devices: [clients, model]), or a larger device"
        )
    return int(min(cohort, rows * (free // est["per_client_bytes"])))


def measure(
    cfg: RunConfig,
    definition: Definition,
    base_shapes: Tree,
    lora_shapes: Tree,
    chunk: int,
    cohort: int | None = None,
    mesh: Mesh | None = None,
) -> dict:
    """XLA's memory analysis of the compiled round for `cohort` clients (default: one chunk) run
    in chunks of `chunk` (shapes only: no data, no execution); with a mesh, per device of the
    partitioned program."""
    import dataclasses

    from ..privacy import mechanisms as modes
    from .simulation import BATCH_KEYS, Cohort, build_round, init_state

    if mesh is not None:
        base_shapes = jax.tree.map(
            lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
            base_shapes,
            mesh_lib.base_shardings(base_shapes, mesh),
        )
    k = cohort or chunk
    fl = dataclasses.replace(cfg.fl, num_clients=k, clients_per_round=k, clients_per_chunk=chunk)
    # the noise's value does not change the program's memory: every mechanism accepts a multiplier
    c = dataclasses.replace(cfg, fl=fl, dp=dataclasses.replace(cfg.dp, noise="multiplier"))
    mechanism = modes.build(c, lora_shapes, None)
    fn = build_round(definition, c, mechanism, k, mesh=mesh)
    state = jax.eval_shape(lambda lo: init_state(c, lo, k, mechanism), lora_shapes)
    shp = (k, fl.local_steps, step_batch(cfg), cfg.data.seq_len)
    sds = jax.ShapeDtypeStruct
    cohort = Cohort(
        {key: sds(shp, jnp.int32) for key in BATCH_KEYS},
        sds((k,), jnp.float32),
        sds((k,), jnp.int32),
        sds((k,), jnp.int32),
        sds((k,), jnp.bool_),
    )
    compiled = fn.lower(state, base_shapes, cohort, randomness.round_keys(cfg.seed, 0), sds((), jnp.float32)).compile()
    ma = compiled.memory_analysis()
    return {
        "temp_bytes": ma.temp_size_in_bytes,
        "argument_bytes": ma.argument_size_in_bytes,
        "output_bytes": ma.output_size_in_bytes,
    }


def cohort_slots(cfg: RunConfig, model_config: ModelConfig) -> int:
    """Client slots of every round: K, or under Poisson sampling the capacity the run pads its
    cohorts to (central DP picks the capacity's tail from its epsilon, so its mechanism says)."""
    from ..privacy import mechanisms as modes

    fl = cfg.fl
    tail = sampling.POISSON_TAIL
    if fl.sampling == "poisson" and modes.MECHANISMS[cfg.dp.mode].sampling_secret:
        _, _, lora = abstract_model(model_config, cfg.lora.to_lora_config())
        tail = modes.build(cfg, lora, None).cohort_tail
    return sampling.cohort_slots(fl.num_clients, fl.clients_per_round, fl.sampling, tail)


def plan(cfg: RunConfig, device_gib: float | None = None, do_measure: bool = False) -> dict:
    from ..models.factory import build_model_config

    mc = build_model_config(cfg)
    est = estimate(cfg, mc)
    out = {
        "model": cfg.model.source,
        "dtype": mc.dtype,
        "estimate": est,
        "clients_per_round": cfg.fl.clients_per_round,
        "cohort_slots": cohort_slots(cfg, mc),  # K, or the Poisson capacity every round is padded to
        "clients_per_chunk": cfg.fl.clients_per_chunk,
        "cohorts": sampling.cohort_distribution(cfg),  # realised sizes under sampling and availability
    }
    if cfg.fl.clients_per_chunk is None:  # what a run picks by itself (auto_chunk), per platform
        rows = mesh_lib.mesh_shape(cfg.fl.devices)[0]
        tokens = step_batch(cfg) * cfg.data.seq_len
        out["auto_clients_per_chunk"] = {
            "cpu": auto_chunk(out["cohort_slots"], tokens, "cpu", rows),
            "accelerator": out["cohort_slots"],
        }
    if device_gib is not None:
        out["device_gib"] = device_gib
        out["largest_clients_per_chunk"] = largest_chunk(est, device_gib * 2**30, out["cohort_slots"])
        # what the memory alone would hold: above the cohort, the cohort is the cap (a chunk holds no more)
        out["memory_clients_per_chunk"] = largest_chunk(est, device_gib * 2**30, 2**62)
        out["capped_by_cohort"] = out["memory_clients_per_chunk"] > out["largest_clients_per_chunk"]
    if do_measure:
        lc = cfg.lora.to_lora_config()
        definition, base, lora = abstract_model(mc, lc)
        base = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(mc.dtype)), base)
        lora = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), lora)
        mesh = mesh_lib.make_mesh(cfg.fl.devices)
        rows = mesh_lib.clients_size(mesh)  # one, then two clients on every 'clients' row
        m1 = measure(cfg, definition, base, lora, rows, mesh=mesh)
        m2 = measure(cfg, definition, base, lora, 2 * rows, mesh=mesh)
        out["measured"] = {
            "chunk_1": m1,
            "chunk_2": m2,
            "per_client_temp_bytes": m2["temp_bytes"] - m1["temp_bytes"],
            "backend": jax.default_backend(),
            "per_device": mesh is not None,
        }
    return out
