"""What a run carries across a restart: the checkpointed server state and the host-side progress
(rows, participations, the privacy ledger, the secret noise seed), restored in one place."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..config.run_config import RunConfig
from ..core import randomness
from ..core.errors import UserError
from . import reading
from .checkpoint import RESTORE_TODO, Checkpointer

if TYPE_CHECKING:
    from ..core.pytypes import Tree
    from ..privacy.accounting.ledger import Ledger
    from ..privacy.mechanisms import Mechanism


@dataclass
class Progress:
    """The host side of a run in progress (the jitted round holds the rest, in ServerState)."""

    start: int  # rounds already done
    rows: list[dict]  # the metrics rows logged so far
    participations: np.ndarray  # rounds each client took part in
    meta: dict = field(default_factory=dict)  # the latest checkpoint's metadata ({} on a fresh run)
    t_start: float = field(default_factory=time.time)

    @property
    def wall_before(self) -> float:
        return float(self.meta.get("wall_seconds", 0.0))

    def wall_seconds(self) -> float:
        return self.wall_before + time.time() - self.t_start


def restore(
    ckpt: Checkpointer, state: Tree, ledger: Ledger | None, metrics_path: Path, num_clients: int, resume: bool
) -> tuple[Tree, Progress]:
    """(state, Progress): the latest checkpoint's when resuming (a run killed before its first
    checkpoint logged nothing and starts afresh), else the fresh state at round 0."""
    progress = Progress(0, [], np.zeros(num_clients, np.int64))
    if not resume or ckpt.latest() is None:
        return state, progress
    state, meta = ckpt.restore(state)
    start = int(meta["round"])
    try:
        if ledger is not None:
            ledger.load_state_dict(meta["ledger"])
        participations = np.asarray(
            meta.get("participations") or (meta["ledger"] or {}).get("participations", progress.participations),
            np.int64,
        )
        if participations.shape != (num_clients,):
            raise ValueError(f"participations of {participations.shape} for {num_clients} clients")
    except UserError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        where = ckpt.folder / str(start)
        raise reading.damaged(where, f"its metadata cannot be read ({e!r})", RESTORE_TODO) from None
    # rows logged after the checkpoint are dropped (they rerun); the writers rewrite metrics.jsonl/.csv
    # from these before the first new row, so a second kill cannot repeat them
    return state, Progress(start, reading.read_rows(metrics_path, start), participations, meta, progress.t_start)


def drop_stop_evaluations(cfg: RunConfig, rows: list[dict]) -> None:
    """A stopped run's last row carries the exported adapter's evaluation (runner._final_eval) even
    where its round is not an evaluation round. A resumed run trains on from that round, so the row
    becomes what an uninterrupted run logs there: no evaluation (eval_loss null, no other eval_ field)."""
    every, rounds = cfg.eval_every, cfg.fl.rounds
    for row in rows:
        r = row.get("round")
        if isinstance(r, int) and not (every and (r % every == 0 or r == rounds)):
            for k in [k for k in row if k.startswith("eval_") and k != "eval_loss"]:
                del row[k]
            if "eval_loss" in row:
                row["eval_loss"] = None


def noise_seed(cfg: RunConfig, mechanism: Mechanism, meta: dict) -> int:
    """The secret root of the noise: restored on resume; else dp.noise_seed if the config fixes it;
    else (in a DP mode) fresh OS entropy, kept only in the checkpoints (the server's private state)."""
    if meta.get("noise_seed") is not None:
        return int(meta["noise_seed"])
    if cfg.dp.noise_seed is not None:
        return cfg.dp.noise_seed
    return secrets.randbits(randomness.ROOT_BITS) if mechanism.private else cfg.seed


def checkpoint_meta(
    cfg: RunConfig, done: int, progress: Progress, ledger: Ledger | None, seed: int, initial: dict
) -> dict:
    """The metadata saved beside the state (initial: the initial held-out loss and scores)."""
    return {
        "round": done,
        "ledger": ledger.state_dict() if ledger else None,
        "participations": progress.participations.tolist(),
        "initial_eval_loss": initial["loss"],
        "initial_scores": initial["scores"],
        "wall_seconds": progress.wall_seconds(),
        "noise_seed": seed,
        "config": cfg.to_dict(),
    }


def private(folder: Path) -> None:
    """checkpoints/ holds the server's private state (noise seed, participations): owner-only."""
    if folder.exists():
        try:
            folder.chmod(0o700)
        except OSError:  # a file system without modes: the README says not to publish the folder
            pass
