"""The experiments' inputs and outputs: a run's per-round metrics, tables (CSV and markdown) and
figures (PNG)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..core.errors import UserError

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


OUTPUTS_MANIFEST = ".fedlora_jax_outputs.json"  # the tables and figures an experiment wrote into a folder


def _written(folder: Path) -> set[str]:
    try:
        return set(json.loads((folder / OUTPUTS_MANIFEST).read_text()))
    except (OSError, ValueError, TypeError):
        return set()


def claim_outputs(folder: str | Path, names: Sequence[str]) -> None:
    """Refuse (one sentence) to replace a file this tool did not write: each of `names` in `folder`
    must be absent or listed in the folder's manifest. Experiments call it before their first run."""
    folder = Path(folder)
    mine = _written(folder)
    for name in names:
        if (folder / name).exists() and name not in mine:
            raise UserError(
                f"{str(folder / name)!r} exists and was not written by this tool, so nothing was run and "
                "nothing was replaced; move it or choose another --out"
            )


def _record(path: Path) -> None:
    """Add a written file to its folder's manifest (what claim_outputs lets a rerun replace)."""
    mine = _written(path.parent) | {path.name}
    (path.parent / OUTPUTS_MANIFEST).write_text(json.dumps(sorted(mine), indent=1) + "\n")


def write_table(
    rows: list[dict], path_stem: str | Path, columns: Sequence[str] | None = None, title: str | None = None
) -> tuple[Path, Path]:
    """rows -> PATH.csv and PATH.md (floats to 4 significant digits in the markdown); never replaces a
    file this tool did not write (claim_outputs)."""
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    claim_outputs(stem.parent, [stem.with_suffix(".csv").name, stem.with_suffix(".md").name])
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
    _record(stem.with_suffix(".csv"))
    _record(stem.with_suffix(".md"))
    return stem.with_suffix(".csv"), stem.with_suffix(".md")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Figure, path: str | Path) -> Path:
    """tight_layout, write a PNG, close the figure; never replaces a file this tool did not write."""
    plt = _plt()
    path = Path(path)
    claim_outputs(path.parent, [path.name])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    _record(path)
    return path


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
