"""Orbax checkpoints of a run: the server state (adapter, server optimizer, SCAFFOLD controls,
stacked deltas, round) and JSON metadata (privacy ledger, round, config). Random keys are
derived from (seed, round), so the round number restores them.

orbax writes the step folders itself: each save is wrapped in `runfolder.writing` (the run
folder's manifest lists the checkpoints/ tree as the tool's), an error that hides an OSError (orbax
raises ValueError for a full disk) is raised as that OSError, and a checkpoint that cannot be read
is `reading.damaged`."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from ..core.errors import UserError
from ..core.pytypes import Tree
from . import reading, runfolder

RESTORE_TODO = "delete that step's folder to resume from the checkpoint before it, or start again with --overwrite"


@contextlib.contextmanager
def _quiet_absl():
    """orbax logs each failed write of its threads (with tracebacks) and each unreadable metadata file
    before it raises or moves on: the error raised (or restore's one sentence) is enough."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        absl.setLevel(level)


class Checkpointer:
    def __init__(self, folder: str | Path, max_to_keep: int = 2):
        self.folder = Path(folder).resolve()
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep)
        with self._recorded(), _quiet_absl():  # the manager makes the folder (and reads what is there)
            self.manager = ocp.CheckpointManager(self.folder, options=options)

    def _recorded(self):
        """The run folder's manifest lists what orbax writes (process 0 keeps the manifest)."""
        if jax.process_index() > 0:
            return contextlib.nullcontext()
        return runfolder.writing(self.folder.parent, self.folder.name)

    def save(self, round_done: int, state: Tree, meta: dict) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        try:
            with self._recorded(), _quiet_absl():
                self.manager.save(round_done, args=args)
                self.manager.wait_until_finished()
        except Exception as e:
            os_error = reading.os_error_of(e, self.folder / str(round_done))
            if os_error is None:
                raise
            raise os_error from e

    def latest(self) -> int | None:
        with _quiet_absl():  # a damaged step's metadata is logged, then restore() says it in one sentence
            return self.manager.latest_step()

    def restore(self, state_template: Tree, step: int | None = None) -> tuple[Tree, dict]:
        step = self.latest() if step is None else step
        if step is None:
            raise UserError("no checkpoint to resume from in this run folder")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_template)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        try:
            with _quiet_absl():
                r = self.manager.restore(step, args=args)
        except Exception as e:
            what = " ".join(str(e).split())[:300] or type(e).__name__
            raise reading.damaged(self.folder / str(step), f"orbax cannot restore it ({what})", RESTORE_TODO) from None
        if not isinstance(r.meta, dict) or not isinstance(r.meta.get("round"), int):
            raise reading.damaged(self.folder / str(step), "its metadata is not a checkpoint's", RESTORE_TODO)
        return r.state, r.meta

    def close(self) -> None:
        self.manager.close()
