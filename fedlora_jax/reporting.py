"""What a run writes for people and plots: metrics rows (strict JSON), metrics.csv, metrics.png,
the progress bar's postfix, and summary.json."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .config_sections import WRITERS
from .errors import UserError
from .privacy import modes
from .writers import write_csv

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.figure import Figure

    from .privacy.modes import Mechanism


def _points(rows: list[dict], key: str, positive: bool = False) -> list[tuple]:
    """(round, value) of the rows where `key` is a finite number (positive: > 0, for a log axis)."""
    out = []
    for x in rows:
        v = x.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v > 0 or not positive):
            out.append((x["round"], v))
    return out


def plot_title(mechanism_name: str, privacy: dict | None) -> str:
    """The plot's title: the DP mode and the final honest epsilon (worst client) with its delta."""
    privacy = privacy or {}
    eps, delta = privacy.get("epsilon"), privacy.get("delta")
    if mechanism_name == "none" or eps is None:
        return f"dp.mode {mechanism_name} (no DP)" if mechanism_name == "none" else f"dp.mode {mechanism_name}"
    text = f"dp.mode {mechanism_name}: final honest epsilon {eps:.4g} (worst client)"
    return text + (f", delta {delta:.3g}" if delta is not None else "")


def _legend_below(ax) -> None:
    """A legend under the axes (never over the curves)."""
    n = len(ax.get_legend_handles_labels()[1])
    if n:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=1, fontsize="small", frameon=False)


def metrics_figure(rows: list[dict], *, initial_eval: float | None = None, title: str | None = None) -> Figure:
    """The metrics figure: losses (with the round-0 eval), epsilon (log axis when positive), scores.
    Rounds are integer ticks; None, NaN and (on a log axis) non-positive values are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    scores = [k for k in ("eval_exact_match", "eval_mc_accuracy") if _points(rows, k)]
    fig, axes = plt.subplots(1, 3 if scores else 2, figsize=(15 if scores else 11, 5), layout="constrained")
    for k in scores:
        axes[2].plot(*zip(*_points(rows, k)), "o-", label=k.replace("eval_", "").replace("_", " "))
    if scores:
        axes[2].set_ylabel("score")
        axes[2].set_ylim(0, 1)
    for name, label in (
        ("loss", "train loss (clients)"),
        ("unprotected_loss", "train loss (clients; outside the DP guarantee)"),
    ):
        pts = _points(rows, name)
        if pts:
            axes[0].plot(*zip(*pts), label=label)
    ev = _points(rows, "eval_loss")
    if isinstance(initial_eval, (int, float)) and math.isfinite(initial_eval):
        ev = [(0, initial_eval)] + ev  # the evaluation before any round
    if ev:
        axes[0].plot(*zip(*ev), "o-", label="eval loss (held out; round 0: before training)")
    axes[0].set_ylabel("loss (nats/token)")
    eps = _points(rows, "epsilon")
    if eps:
        pos = _points(rows, "epsilon", positive=True)
        log_axis = len(pos) == len(eps)
        axes[1].plot(*zip(*eps), label="honest epsilon (worst client)")
        paper = _points(rows, "epsilon_paper_tracker", positive=log_axis)
        if paper:
            axes[1].plot(*zip(*paper), "--", label="paper convention (not a bound)")
        if log_axis:
            axes[1].set_yscale("log")
    else:
        axes[1].text(0.5, 0.5, "no DP", ha="center", transform=axes[1].transAxes)
    axes[1].set_ylabel("epsilon")
    for ax in axes:
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        _legend_below(ax)
    if title:
        fig.suptitle(title)
    return fig


def plot_metrics(rows: list[dict], path: Path, *, initial_eval: float | None = None, title: str | None = None) -> None:
    """metrics.png (see metrics_figure)."""
    import matplotlib.pyplot as plt

    fig = metrics_figure(rows, initial_eval=initial_eval, title=title)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def finite_or_none(x: object) -> object:
    """Strict JSON: NaN and infinities become null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def read_rows(path: Path, upto: int) -> list[dict]:
    """Metrics rows of rounds <= upto. A truncated last line (a crash mid-write) is skipped."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # the round that was being written when the run stopped; it reruns
            raise UserError(
                f"{path}: line {i + 1} is not JSON; the run folder is damaged (resume needs its "
                f"metrics up to the last checkpoint)"
            ) from None
    return [r for r in rows if r.get("round", 0) <= upto]


def rewrite_rows(path: Path, rows: list[dict]) -> None:
    """Replace metrics.jsonl with `rows`, atomically (a kill leaves the old file or the new one)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(x, allow_nan=False) + "\n" for x in rows))
    os.replace(tmp, path)


def postfix(row: dict, rows: list[dict], initial_eval: float | None = None) -> dict:
    """The progress bar shows the latest held-out loss (before the first eval round: the round-0 one),
    epsilon and (marked) client loss."""
    out = {}
    last_eval = next((x["eval_loss"] for x in reversed(rows) if x.get("eval_loss") is not None), initial_eval)
    if last_eval is not None:
        out["eval"] = f"{last_eval:.3f}"
    if row.get("epsilon") is not None:
        out["eps"] = f"{row['epsilon']:.3g}"
    for name in ("loss", modes.UNPROTECTED_PREFIX + "loss"):
        if row.get(name) is not None:
            out["train" if name == "loss" else "train(unprotected)"] = f"{row[name]:.3f}"
    return out


def data_line(stats: dict) -> str:
    """One line of data statistics for the console."""
    t = stats["train"]
    pc = t.get("per_client") or {}
    return (
        f"data: {stats['examples']} examples, {stats['kept']} kept, {stats['dropped']} dropped "
        f"(longer than data.seq_len {stats['seq_len']} or no response token), {stats['truncated']} truncated; "
        f"train {t['examples']} examples"
        + (f", per client {pc['min']} to {pc['max']} (mean {pc['mean']:.1f})" if pc else "")
        + f"; eval {stats['eval']['examples']}"
    )


def write_outputs(
    out: Path,
    rows: list[dict],
    mechanism: Mechanism,
    participations: np.ndarray,
    *,
    source: str,
    artifacts: dict,
    initial_eval: float | None,
    initial_scores: dict,
    done: int,
    stop_reason: str,
    wall_seconds: float,
    data_stats: dict | None = None,
) -> dict:
    """metrics.jsonl/.csv, metrics.png and summary.json (artifacts: the saved adapter / merged model)."""
    metrics_path, csv_path = out / "metrics.jsonl", out / "metrics.csv"
    # rewrite the metrics (a resume may have dropped rows logged after its checkpoint)
    rewrite_rows(metrics_path, rows)
    write_csv(csv_path, rows)
    privacy = mechanism.summary(participations, rows[-1] if rows else None)
    if rows:
        plot_metrics(rows, out / "metrics.png", initial_eval=initial_eval, title=plot_title(mechanism.name, privacy))
    outputs = {
        "metrics_jsonl": str(metrics_path),
        "metrics_csv": str(csv_path),
        "plot": str(out / "metrics.png"),
        "checkpoints": str(out / "checkpoints"),
        "config": str(out / "config.yaml"),
    }
    outputs.update({name: str(out / name) for name in WRITERS if (out / name).is_dir()})
    outputs.update(artifacts)
    last = lambda k: next((x[k] for x in reversed(rows) if x.get(k) is not None), None)
    summary = {
        "rounds": done,
        "stop_reason": stop_reason,
        "initial_eval_loss": initial_eval,
        "final_eval_loss": last("eval_loss"),
        "model": source,
        "initial_scores": initial_scores,
        "final_scores": {
            k: last(k)
            for k in ("eval_exact_match", "eval_mc_accuracy", "eval_mc_accuracy_norm")
            if any(x.get(k) is not None for x in rows)
        },
    }
    train_name = mechanism.published_name("loss")
    if train_name is not None:
        summary[("final_train_loss" if train_name == "loss" else modes.UNPROTECTED_PREFIX + "final_train_loss")] = last(
            train_name
        )
    summary["privacy"] = privacy
    if data_stats is not None:
        # counts of the clients' data: outside any DP guarantee, so under DP only on request, marked
        if not mechanism.private:
            summary["data"] = data_stats
        elif mechanism.publish_client_metrics:
            summary[modes.UNPROTECTED_PREFIX + "data"] = data_stats
            privacy.setdefault("outside_guarantee", []).append(modes.UNPROTECTED_PREFIX + "data")
    summary.update(wall_seconds=wall_seconds, outputs=outputs)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False))
    return summary
