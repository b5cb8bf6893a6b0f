"""The device mesh: a 2-D grid ('clients', 'model') of devices.

Each chunk's clients are spread over 'clients'; the frozen base is split over 'model' so that a
base too large for one chip fits several (Megatron-style tensor parallelism, expressed as
shardings and left to XLA's partitioner):

- column-parallel (output features split): q/k/v/gate/up projections, GPT-2's c_attn and c_fc,
  and the output head (vocab split);
- row-parallel (input features split): o/down projections and GPT-2's c_proj;
- embeddings split along the vocab; norms, biases of row-parallel layers and position embeddings
  replicated.

Adapters, optimizer state and the server state are replicated over 'model' (they are small: the
point of LoRA). A dimension that 'model' does not divide is replicated rather than split; `layout`
names every such leaf. The partitioned program computes the same function as the single-device
one; only the order of floating-point sums inside a split matmul differs.

Multi-host (TPU pods, multi-node GPU): call jax.distributed.initialize() before building the mesh
(the CLI does when fl.distributed is true); jax.devices() then lists every host's devices, every
host runs the same program on the same (deterministic) data, and the mesh spans them all.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ..core.errors import UserError
from ..core.pytypes import Array, Tree

if TYPE_CHECKING:
    from collections.abc import Sequence

AXES = ("clients", "model")
# the module names whose kernel (in, out) is split along `out` (column) or `in` (row)
COLUMN_PARALLEL = frozenset({"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "c_attn", "c_fc", "lm_head"})
ROW_PARALLEL = frozenset({"o_proj", "down_proj", "c_proj"})
EMBEDDINGS = frozenset({"embed", "wte"})  # [vocab, hidden]: split along the vocab


def mesh_shape(devices: int | Sequence[int]) -> tuple[int, int]:
    """(clients, model) from fl.devices: an int or [clients] (model 1), or [clients, model]."""
    shape = (int(devices),) if isinstance(devices, (int, np.integer)) else tuple(int(d) for d in devices)
    if len(shape) == 1:
        shape = (shape[0], 1)
    if len(shape) != 2 or min(shape) < 1:
        raise UserError(f"fl.devices must be N or [clients, model] with entries >= 1, got {list(devices)}")
    return shape


def make_mesh(devices: int | Sequence[int]) -> Mesh | None:
    """The ('clients', 'model') mesh over the first clients x model devices (None for one device)."""
    shape = mesh_shape(devices)
    n = math.prod(shape)
    if n == 1:
        return None
    available = jax.devices()
    if n > len(available):
        raise UserError(f"fl.devices = {list(shape)} needs {n} devices but {len(available)} are visible: {available}")
    return Mesh(np.array(available[:n]).reshape(shape), AXES)


def initialize_distributed() -> None:
    """jax.distributed.initialize() for fl.distributed: the cluster is detected (SLURM, Open MPI,
    TPU pods, ...), or given as JAX_COORDINATOR_ADDRESS (host:port of process 0),
    JAX_NUM_PROCESSES and JAX_PROCESS_ID in each process's environment."""
    if jax.distributed.is_initialized():
        return
    kw = {}
    if "JAX_NUM_PROCESSES" in os.environ or "JAX_PROCESS_ID" in os.environ:
        try:
            kw = {
                "num_processes": int(os.environ["JAX_NUM_PROCESSES"]),
                "process_id": int(os.environ["JAX_PROCESS_ID"]),
            }
        except (KeyError, ValueError):
            raise UserError(
                "fl.distributed: JAX_NUM_PROCESSES and JAX_PROCESS_ID must both be set to integers, got "
                f"{os.environ.get('JAX_NUM_PROCESSES')!r} and {os.environ.get('JAX_PROCESS_ID')!r}"
            ) from None
    try:
        jax.distributed.initialize(**kw)
    except (RuntimeError, ValueError) as e:
        raise UserError(
            f"fl.distributed is true but jax.distributed.initialize() failed ({' '.join(str(e).split())}); run "
            "under SLURM, Open MPI or a TPU pod, or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and "
            "JAX_PROCESS_ID in every process"
        ) from None


def model_size(mesh: Mesh | None) -> int:
    return 1 if mesh is None else int(mesh.shape.get("model", 1))


def clients_size(mesh: Mesh | None) -> int:
    return 1 if mesh is None else int(mesh.shape.get("clients", 1))


def _names(path) -> list[str]:
    return [str(getattr(p, "key", getattr(p, "name", p))) for p in path]


def _split_axis(names: list[str], ndim: int) -> int | None:
    """The axis of a base leaf that 'model' splits (negative index), or None (replicated)."""
    if len(names) < 2:
        return None
    module, leaf = names[-2], names[-1]
    if leaf in ("kernel", "bias") and module in COLUMN_PARALLEL:
        return -1
    if leaf == "kernel" and module in ROW_PARALLEL:
        return -2
    if leaf == "embedding" and module in EMBEDDINGS and ndim >= 2:
        return -2
    return None


def _placements(base, model: int):
    """(path, leaf, axis 'model' would split or None, whether `model` divides it) per base leaf."""
    for path, x in jax.tree_util.tree_flatten_with_path(base)[0]:
        names = _names(path)
        axis = _split_axis(names, len(x.shape))
        yield "/".join(names), x, axis, axis is not None and x.shape[axis] % model == 0


def base_specs(base: Tree, model: int) -> Tree:
    """A PartitionSpec per base leaf for a 'model' axis of `model` devices."""
    specs = []
    for _, x, axis, divides in _placements(base, model):
        parts = [None] * len(x.shape)
        if model > 1 and divides:
            parts[axis] = "model"
        specs.append(PartitionSpec(*parts))
    return jax.tree.unflatten(jax.tree.structure(base), specs)


def layout(base: Tree, model: int) -> dict:
    """Which base leaves are split over 'model', and which could not be (dimension not divisible)."""
    placed = [(name, divides) for name, _, axis, divides in _placements(base, model) if axis is not None]
    return {"split": [n for n, d in placed if d], "not_divisible": [n for n, d in placed if not d]}


def base_shardings(base: Tree, mesh: Mesh) -> Tree:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), base_specs(base, model_size(mesh)))


def shard_base(base: Tree, mesh: Mesh | None) -> Tree:
    """The base placed on the mesh (split over 'model', replicated over 'clients'); unchanged
    without a mesh. Host (numpy) leaves go straight to their shards."""
    if mesh is None:
        return base
    return jax.device_put(base, base_shardings(base, mesh))


def replicate(tree: Tree, mesh: Mesh | None) -> Tree:
    """Every leaf whole on every device of the mesh (the server state); unchanged without a mesh."""
    if mesh is None:
        return tree
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def replicate_constraint(tree: Tree, mesh: Mesh) -> Tree:
    """Inside jit: every leaf whole on every device of the mesh."""
    return jax.lax.with_sharding_constraint(tree, NamedSharding(mesh, PartitionSpec()))


def per_device_bytes(base: Tree, model: int) -> int:
    """Bytes of the base that one device holds when split over `model` devices."""
    total = 0
    for s, x in zip(jax.tree.leaves(base_specs(base, model)), jax.tree.leaves(base)):
        n = int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
        total += n // model if "model" in tuple(s) else n
    return total


def client_axis(x: Array, mesh: Mesh | None) -> Array:
    """Constrain axis 1 (clients within a chunk) of x to the 'clients' axis of the mesh."""
    if mesh is None:
        return x
    spec = PartitionSpec(None, "clients", *([None] * (x.ndim - 2)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def from_process_0(value: int) -> int:
    """Process 0's 63-bit integer on every process of a multi-host run (sent as two 32-bit halves:
    jax's default integers are 32-bit); the value itself with one process."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    halves = np.array([value >> 32, value & 0xFFFFFFFF], np.uint32)
    hi, lo = (int(x) for x in np.asarray(multihost_utils.broadcast_one_to_all(halves)))
    return (hi << 32) | lo


def sync(name: str) -> None:
    """Every process waits here until all have arrived (nothing with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# With fl.clients_per_chunk unset, a CPU round vmaps about this many tokens per local step on each
# device: 1.11-1.26x faster than the whole cohort at once in four regimes (hidden 64-256, 32-256
# clients, sequence 32-128) and within 1% of the best chunk in each
# (experiments/bench/chunk_bench.py): the matmuls keep ~2,048 rows and a step's activations stay
# in cache. Accelerators run the whole cohort at once.
CPU_TOKENS_PER_CHUNK = 2048


def auto_chunk(cohort: int, tokens_per_client_step: int, platform: str, rows: int = 1) -> int:
    """Clients vmapped at once when fl.clients_per_chunk is unset: the whole cohort on an
    accelerator; on CPU about CPU_TOKENS_PER_CHUNK tokens per local step on each of the mesh's
    `rows` 'clients' rows, in chunks of equal size (the least padding)."""
    if platform != "cpu" or cohort < 1:
        return max(cohort, 1)
    target = max(1, rows * CPU_TOKENS_PER_CHUNK // max(tokens_per_client_step, 1))
    n_chunks = -(-cohort // target)
    return -(-cohort // n_chunks)
