"""What a run writes for people and plots: metrics rows (strict JSON), metrics.csv, metrics.png,
the progress bar's postfix, and summary.json."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

from .errors import UserError
from .privacy import modes


def plot_metrics(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = [x["round"] for x in rows]
    scores = [k for k in ("eval_exact_match", "eval_mc_accuracy") if any(x.get(k) is not None for x in rows)]
    fig, axes = plt.subplots(1, 3 if scores else 2, figsize=(15 if scores else 10, 4))
    for k in scores:
        pts = [(x["round"], x[k]) for x in rows if x.get(k) is not None]
        axes[2].plot(*zip(*pts), "o-", label=k.replace("eval_", "").replace("_", " "))
    if scores:
        axes[2].set_xlabel("round")
        axes[2].set_ylabel("score")
        axes[2].set_ylim(0, 1)
        axes[2].legend()
    for name, label in (
        ("loss", "train loss (clients)"),
        ("unprotected_loss", "train loss (clients; outside the DP guarantee)"),
    ):
        pts = [(x["round"], x[name]) for x in rows if x.get(name) is not None]
        if pts:
            axes[0].plot(*zip(*pts), label=label)
    ev = [(x["round"], x["eval_loss"]) for x in rows if x.get("eval_loss") is not None]
    if ev:
        axes[0].plot(*zip(*ev), "o-", label="eval loss")
    axes[0].set_xlabel("round")
    axes[0].set_ylabel("loss (nats/token)")
    if axes[0].get_lines():
        axes[0].legend()
    if rows and rows[0].get("epsilon") is not None:
        axes[1].plot(r, [x["epsilon"] for x in rows], label="honest epsilon (worst client)")
        if rows[0].get("epsilon_paper_tracker") is not None:
            axes[1].plot(r, [x["epsilon_paper_tracker"] for x in rows], "--", label="paper convention (not a bound)")
        axes[1].set_yscale("log")
        axes[1].legend()
    else:
        axes[1].text(0.5, 0.5, "no DP", ha="center")
    axes[1].set_xlabel("round")
    axes[1].set_ylabel("epsilon")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def finite_or_none(x):
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


def postfix(row: dict, rows: list[dict]) -> dict:
    """The progress bar shows the latest held-out loss, epsilon and (marked) client loss."""
    out = {}
    last_eval = next((x["eval_loss"] for x in reversed(rows) if x.get("eval_loss") is not None), None)
    if last_eval is not None:
        out["eval"] = f"{last_eval:.3f}"
    if row.get("epsilon") is not None:
        out["eps"] = f"{row['epsilon']:.3g}"
    for name in ("loss", modes.UNPROTECTED_PREFIX + "loss"):
        if row.get(name) is not None:
            out["train" if name == "loss" else "train(unprotected)"] = f"{row[name]:.3f}"
    return out


def write_outputs(
    out: Path,
    rows: list[dict],
    mechanism,
    participations,
    *,
    source: str,
    artifacts: dict,
    initial_eval,
    initial_scores: dict,
    done: int,
    stop_reason: str,
    wall_seconds: float,
) -> dict:
    """metrics.jsonl/.csv, metrics.png and summary.json (artifacts: the saved adapter / merged model)."""
    metrics_path, csv_path = out / "metrics.jsonl", out / "metrics.csv"
    # rewrite the metrics (a resume may have dropped rows logged after its checkpoint)
    rewrite_rows(metrics_path, rows)
    fields = list(dict.fromkeys(k for x in rows for k in x)) or ["round"]
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    if rows:
        plot_metrics(rows, out / "metrics.png")
    outputs = {
        "metrics_jsonl": str(metrics_path),
        "metrics_csv": str(csv_path),
        "plot": str(out / "metrics.png"),
        "checkpoints": str(out / "checkpoints"),
        "config": str(out / "config.yaml"),
    }
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
    summary["privacy"] = mechanism.summary(participations, rows[-1] if rows else None)
    summary.update(wall_seconds=wall_seconds, outputs=outputs)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False))
    return summary
