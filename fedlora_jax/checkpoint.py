"""Orbax checkpoints of a run: the server state (adapter, server optimizer, SCAFFOLD controls,
stacked deltas, round) and JSON metadata (privacy ledger, round, config). Random keys are
derived from (seed, round), so the round number restores them."""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp

from .errors import UserError
from .pytypes import Tree


class Checkpointer:
    def __init__(self, folder: str | Path, max_to_keep: int = 2):
        self.manager = ocp.CheckpointManager(
            Path(folder).resolve(), options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep)
        )

    def save(self, round_done: int, state: Tree, meta: dict) -> None:
        self.manager.save(
            round_done, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        )
        self.manager.wait_until_finished()

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, state_template: Tree, step: int | None = None) -> tuple[Tree, dict]:
        step = self.latest() if step is None else step
        if step is None:
            raise UserError("no checkpoint to resume from in this run folder")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_template)
        r = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        )
        return r.state, r.meta

    def close(self) -> None:
        self.manager.close()
