"""The experiments' inputs and outputs: a run's per-round metrics, tables (CSV and markdown) and
figures (PNG)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Sequence

    from matplotlib.figure import Figure


def read_metrics(folder: str | Path) -> list[dict]:
    """The per-round metrics a run wrote (metrics.jsonl). A DP run's client training metrics are
    published as 'unprotected_*' (outside the guarantee); the tables read them under the plain name."""
    rows = [json.loads(x) for x in (Path(folder) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    for r in rows:
        for k in [k for k in r if k.startswith("unprotected_")]:
            r.setdefault(k[len("unprotected_") :], r[k])
    return rows


def tail_mean(rows: list[dict], key: str = "loss", last: int = 5) -> float:
    """Mean of a metric over the last `last` rounds (a less noisy final figure than one round)."""
    vals = [r[key] for r in rows if r.get(key) is not None][-last:]
    return float(np.mean(vals)) if vals else math.nan


def _fmt(v):
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf"
        return f"{v:.4g}"
    return str(v)


def write_table(
    rows: list[dict], path_stem: str | Path, columns: Sequence[str] | None = None, title: str | None = None
) -> tuple[Path, Path]:
    """rows -> PATH.csv and PATH.md (floats to 4 significant digits in the markdown)."""
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    columns = columns or list(rows[0].keys())
    with stem.with_suffix(".csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    lines = ([f"**{title}**", ""] if title else []) + [
        "| " + " | ".join(columns) + " |",
        "| " + " | ".join("---" for _ in columns) + " |",
    ]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return stem.with_suffix(".csv"), stem.with_suffix(".md")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Figure, path: str | Path) -> Path:
    """tight_layout, write a PNG, close the figure."""
    plt = _plt()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_curves(
    panels: dict, path: str | Path, key: str = "loss", ylabel: str = "train loss (nats/token)", title: str | None = None
) -> Path:
    """panels: {panel title: {label: metrics rows}} -> one PNG with a panel each."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (name, series) in zip(axes[0], panels.items()):
        for label, rows in series.items():
            pts = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), label=label, marker="o" if len(pts) < 8 else None)
        ax.set_title(name)
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)
