"""The federation's choices, each without and with the paper's local DP: the seven FL algorithms
(the paper's Tables I and II) and the aggregation modes (mean, stack, frozen A)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..federated import algorithms as algorithms_lib
from .grid import _ADAPTIVE_SERVER_LR, _FL_DEFAULTS, _PAPER_DP, ADAPTIVE, ALGORITHMS, run_grid
from .results import _plt, plot_curves, read_metrics, save_figure, tail_mean, write_table

if TYPE_CHECKING:
    from collections.abc import Sequence

ARMS = ("no_dp", "dp")  # each algorithm's two runs: without DP, and with the paper's local DP


def _dp_allows(algorithm: str) -> bool:
    """Whether the paper's local DP accepts this algorithm (the mechanism object decides)."""
    from ..privacy.mechanisms import MECHANISMS

    return not algorithms_lib.get(algorithm).hook(_FL_DEFAULTS).keeps_client_state or (
        MECHANISMS["local"].controls_private
    )


def algorithms(
    scale: str, out: str | Path, overrides: Sequence[str] = (), algos: Sequence[str] = ALGORITHMS, **kw: Any
) -> dict:
    """Seven FL algorithms with and without the paper's local DP (epsilon 25 per release by the
    paper's convention, clip 0.1): Table I (training loss) and Table II (benchmark scores)."""
    out = Path(out)
    runs = {}
    for a in algos:
        extra = [f"fl.algorithm={a}"] + ([f"fl.server_lr={_ADAPTIVE_SERVER_LR[scale]}"] if a in ADAPTIVE else [])
        runs[f"{a}_nodp"] = extra + ["dp.mode=none"]
        if _dp_allows(a):  # SCAFFOLD's controls are not covered by local DP: the run would be refused
            runs[f"{a}_dp"] = extra + _PAPER_DP
    s = run_grid(runs, scale, out, overrides, **kw)
    metrics = {k: read_metrics(out / "runs" / k) for k in runs}
    refused = {"final_eval_loss": None, "privacy": {"epsilon": None}, "final_scores": {}}
    loss_rows, score_rows = [], []
    for a in algos:
        n, d = f"{a}_nodp", f"{a}_dp"
        sd = s.get(d, refused)
        loss_rows.append(
            {
                "algorithm": a + ("" if d in s else " (DP refused: controls not private)"),
                "train_loss_no_dp": tail_mean(metrics[n]),
                "train_loss_dp": tail_mean(metrics.get(d, [])),
                "eval_loss_no_dp": s[n]["final_eval_loss"],
                "eval_loss_dp": sd["final_eval_loss"],
                "epsilon_honest_dp": sd["privacy"]["epsilon"],
            }
        )
        row = {"algorithm": a}
        for tag, summ in (("no_dp", s[n]), ("dp", sd)):
            for m, v in (summ.get("final_scores") or {}).items():
                row[f"{m.replace('eval_', '')}_{tag}"] = v
        score_rows.append(row)
    base_scores = next(iter(s.values())).get("initial_scores") or {}
    score_rows.append(
        {
            "algorithm": "base model (no fine-tuning)",
            **{f"{m.replace('eval_', '')}_{t}": v for m, v in base_scores.items() for t in ARMS},
        }
    )
    files = list(
        write_table(
            loss_rows,
            out / "algorithms_loss",
            title=f"Table I analogue ({scale} scale): train loss "
            "(mean of the last 5 rounds) and held-out loss, without and with local DP",
        )
    )
    metrics_seen = sorted(
        {
            k.rsplit("_", 2)[0] if k.endswith("_no_dp") else k.rsplit("_", 1)[0]
            for r in score_rows
            for k in r
            if k != "algorithm"
        }
    )
    score_cols = ["algorithm"] + [f"{m}_{t}" for m in metrics_seen for t in ARMS]
    files += list(
        write_table(
            score_rows,
            out / "algorithms_scores",
            score_cols,
            f"Table II analogue ({scale} scale): held-out scores of the final global adapter",
        )
    )
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4))
    x = np.arange(len(algos))
    ax.bar(x - 0.2, [r["train_loss_no_dp"] for r in loss_rows], 0.4, label="no DP")
    ax.bar(x + 0.2, [r["train_loss_dp"] for r in loss_rows], 0.4, label="local DP (paper: eps 25, clip 0.1)")
    ax.set_xticks(x, algos)
    ax.set_ylabel("train loss, last 5 rounds")
    ax.legend()
    files.append(save_figure(fig, out / "algorithms.png"))
    return {"loss_rows": loss_rows, "score_rows": score_rows, "files": [str(f) for f in files], "summaries": s}


def aggregation(scale: str, out: str | Path, overrides: Sequence[str] = (), **kw: Any) -> dict:
    """Mean of A and B (the paper) vs stacking (the exact product sum, merged into the base each
    round) vs frozen A (FFA-LoRA: only B trained and released), each without and with the
    paper's local DP noise."""
    out = Path(out)
    modes = {
        "mean": ["fl.aggregation=mean"],
        "stack": ["fl.aggregation=stack"],
        "frozen_a": ["fl.aggregation=mean", "lora.freeze_a=true"],
    }
    runs = {}
    for m, ov in modes.items():
        runs[f"{m}_nodp"] = [*ov, "dp.mode=none"]
        runs[f"{m}_dp"] = [*ov, *_PAPER_DP]
    s = run_grid(runs, scale, out, overrides, **kw)
    metrics = {k: read_metrics(out / "runs" / k) for k in runs}
    rows = [
        {
            "aggregation": m,
            "train_loss_no_dp": tail_mean(metrics[f"{m}_nodp"]),
            "train_loss_dp": tail_mean(metrics[f"{m}_dp"]),
            "eval_loss_no_dp": s[f"{m}_nodp"]["final_eval_loss"],
            "eval_loss_dp": s[f"{m}_dp"]["final_eval_loss"],
            "epsilon_honest_dp": s[f"{m}_dp"]["privacy"]["epsilon"],
        }
        for m in modes
    ]
    files = list(
        write_table(
            rows,
            out / "aggregation",
            title=f"aggregation modes ({scale} scale), local DP as in the "
            "paper (eps 25 per release by its convention, clip 0.1)",
        )
    )
    files.append(
        plot_curves(
            {"no DP": {m: metrics[f"{m}_nodp"] for m in modes}, "local DP": {m: metrics[f"{m}_dp"] for m in modes}},
            out / "aggregation.png",
        )
    )
    return {"rows": rows, "files": [str(f) for f in files], "summaries": s}
