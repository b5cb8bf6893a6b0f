"""What a run writes for people and plots: metrics rows (strict JSON), metrics.csv, metrics.png,
the progress bar's postfix, and summary.json."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from ..config.sections import WRITERS
from ..core.errors import UserError
from ..privacy import mechanisms as modes
from .metric_files import rewrite_rows, write_csv  # noqa: F401  (rewrite_rows re-exported)

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.figure import Figure

    from ..privacy.mechanisms import Mechanism


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
    base = initial_eval if isinstance(initial_eval, (int, float)) and math.isfinite(initial_eval) else None
    if base is not None:
        ev = [(0, base)] + ev  # the evaluation before any round
    if ev:
        n = next((x["eval_loss_n"] for x in reversed(rows) if x.get("eval_loss_n") is not None), None)
        of = f"n = {n} held-out examples" if n is not None else "held out"
        axes[0].plot(*zip(*ev), "o-", label=f"eval loss ({of}; round 0: the base, before training)")
    if base is not None and base > 0:
        # the axis shows the base's loss and spans at least 10% of it: noise is not drawn as a trend
        vals = [v for line in axes[0].get_lines() for v in line.get_ydata()] + [base]
        lo, hi = min(vals), max(vals)
        if hi - lo < LOSS_AXIS_SPAN * base:
            lo = hi - LOSS_AXIS_SPAN * base
        pad = 0.05 * (hi - lo)
        axes[0].axhline(base, ls=":", color="grey", label=f"the base model (round 0): {base:.4f}")
        axes[0].set_ylim(lo - pad, hi + pad)
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


def postfix(row: dict, rows: list[dict], initial_eval: float | None = None) -> dict:
    """The progress bar shows the latest held-out loss (before the first eval round: the round-0 one),
    epsilon, the realised cohort where it is published, and (marked) client loss."""
    out = {}
    last_eval = next((x["eval_loss"] for x in reversed(rows) if x.get("eval_loss") is not None), initial_eval)
    if last_eval is not None:
        out["eval"] = f"{last_eval:.3f}"
    if row.get("epsilon") is not None:
        out["eps"] = f"{row['epsilon']:.3g}"
    for name in ("clients", modes.UNPROTECTED_PREFIX + "clients"):
        if row.get(name) is not None:
            out["cohort" if name == "clients" else "cohort(unprotected)"] = row[name]
    for name in ("loss", modes.UNPROTECTED_PREFIX + "loss"):
        if row.get(name) is not None:
            out["train" if name == "loss" else "train(unprotected)"] = f"{row[name]:.3f}"
    return out


def data_line(stats: dict, mechanism: Mechanism | None = None) -> str:
    """One line of data statistics for the console. The clients' example counts (and the dropped and
    truncated counts) are outside any DP guarantee: under DP they are printed only with
    dp.publish_client_metrics, marked so; otherwise the line names the held-out split alone."""
    if mechanism is not None and mechanism.private and not mechanism.publish_client_metrics:
        return (
            f"data: ready; eval {stats['eval']['examples']} held-out examples (the clients' example counts are "
            f"not shown under DP: dp.publish_client_metrics shows them, outside the guarantee)"
        )
    t = stats["train"]
    pc = t.get("per_client") or {}
    return (
        f"data: {stats['examples']} examples, {stats['kept']} kept, {stats['dropped']} dropped "
        f"(longer than data.seq_len {stats['seq_len']} or no response token), {stats['truncated']} truncated; "
        f"train {t['examples']} examples"
        + (f", per client {pc['min']} to {pc['max']} (mean {pc['mean']:.1f})" if pc else "")
        + f"; eval {stats['eval']['examples']}"
        + (" [outside the DP guarantee]" if mechanism is not None and mechanism.private else "")
    )


LOSS_AXIS_SPAN = 0.1  # the loss axis spans at least this share of the base's loss
SCORES = ("eval_exact_match", "eval_mc_accuracy", "eval_mc_accuracy_norm")  # the scores of eval_tasks


def _score_keys(rows: list[dict]) -> list[str]:
    return [k for k in SCORES if any(k in x for x in rows)]


def _plain_scores(scores: dict) -> dict:
    """The scores alone (no n, no interval): summary.json's initial_scores / final_scores."""
    return {k: v for k, v in scores.items() if k in SCORES}


def eval_block(ev: dict, round_: int) -> dict:
    """One evaluation as summary.json reports it: the round it is of, the held-out loss with its n and
    response-token count, each score as {value, n, ci95}."""
    sc = ev.get("scores") or {}
    out: dict = {"round": round_, "loss": ev.get("loss")}
    if ev.get("loss") is not None:
        out.update(n=sc.get("eval_loss_n"), tokens=sc.get("eval_loss_tokens"))
    for k in SCORES:
        if sc.get(k) is not None:
            lo, hi = sc.get(f"{k}_ci95_low"), sc.get(f"{k}_ci95_high")
            out[k] = {"value": sc[k], "n": sc.get(f"{k}_n"), "ci95": [lo, hi] if lo is not None else None}
    return out


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
    final_eval: dict | None = None,
    stop_reason: str,
    wall_seconds: float,
    data_stats: dict | None = None,
) -> dict:
    """metrics.jsonl/.csv, metrics.png and summary.json (artifacts: the saved adapter / merged model).
    final_eval: the exported adapter's evaluation ({'loss', 'scores'}), what summary.json calls "after"
    (default: the last evaluation in the rows)."""
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
    if final_eval is None:
        final_eval = {
            "loss": last("eval_loss"),
            "scores": {k: last(k) for k in _score_keys(rows) if any(x.get(k) is not None for x in rows)},
        }
    before = {"loss": initial_eval, "scores": initial_scores or {}}
    summary = {
        "rounds": done,
        "stop_reason": stop_reason,
        "initial_eval_loss": initial_eval,
        "final_eval_loss": final_eval["loss"],  # the exported adapter's
        "model": source,
        "initial_scores": _plain_scores(before["scores"]),
        "final_scores": _plain_scores(final_eval["scores"]),
        # every figure with its n (accuracies with a 95% interval); "after" is the exported adapter
        "eval": {"before": eval_block(before, 0), "after": eval_block(final_eval, done)},
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
