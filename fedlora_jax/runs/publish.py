"""What a round's metrics row may carry: the client-derived values only where (and under the name)
the DP mechanism allows, the mechanism's accounted values, and the privacy ledger's row."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from ..privacy import mechanisms as modes
from . import runfolder

if TYPE_CHECKING:
    from pathlib import Path

    from ..config.run_config import RunConfig
    from ..core.pytypes import Tree
    from ..privacy.mechanisms import Mechanism

log = logging.getLogger("fedlora_jax")


def round_row(
    r: int,
    lr: float,
    m: dict,
    ids: np.ndarray,
    valid: np.ndarray,
    mechanism: Mechanism,
    participations: np.ndarray,
) -> dict:
    """The row of round r (0-based) from the round's metrics m, before evaluation."""
    row = {"round": r + 1, "lr": lr}
    for name in modes.CLIENT_FIELDS:
        published = mechanism.published_name(name)
        if published is not None:
            row[published] = float(m[name]) if name != "dropped" else int(m[name])
    if mechanism.participation_public:
        row["clients"] = int(valid.sum())
    elif mechanism.published_name("clients") is not None:
        row[mechanism.published_name("clients")] = int(valid.sum())
    row["eval_loss"] = None
    dropped = int(m["dropped"])
    if dropped and mechanism.publish_client_metrics:
        finite = np.isfinite(np.asarray(m["client_loss"]))
        bad = [int(c) for c, ok, v in zip(ids, finite, valid) if v and not ok]
        log.warning(
            "round %d: %d client update(s) were not finite and were dropped (clients %s)%s",
            r + 1,
            dropped,
            bad or "with non-finite factors",
            " [outside the DP guarantee]" if mechanism.private else "",
        )
    row.update({k: float(v) for k, v in m["mechanism"].items()})  # accounted values (e.g. the clip)
    row.update(mechanism.privacy_row(participations))
    return row


def write_dp_stats(cfg: RunConfig, out: Path, mechanism: Mechanism, lora: Tree, r: int) -> None:
    """dp.stats_every: the noise-variance analysis of the global adapter after round r (0-based)."""
    from ..core import randomness
    from ..privacy.mechanisms.analysis import round_stats, write_stats_csv

    stats = round_stats(
        lora,
        mechanism.sigma_a,
        mechanism.sigma_b,
        randomness.key(cfg.seed, "noise_stats", r),
        f"round_{r + 1}_global",
        samples=cfg.dp.stats_samples,
    )
    with runfolder.writing(out, "dp_stats.csv"):
        write_stats_csv(out / "dp_stats.csv", stats, append=True)
