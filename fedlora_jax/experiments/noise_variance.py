"""The noise of the LoRA product (B + beta)(A + alpha) under the paper's local DP, Monte Carlo beside
the exact formula: against the rank (the paper's Table III and Fig. 5) and the model size (Table IV)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .grid import _PAPER_DP, base_config, run_grid
from .results import _plt, save_figure, write_table

if TYPE_CHECKING:
    from collections.abc import Sequence


def _stats_summary(folder) -> dict:
    """Means over modules and layers of the last dp_stats.csv round."""
    with (Path(folder) / "dp_stats.csv").open() as f:
        rows = list(csv.DictReader(f))
    last = rows[-1]["round_client"]
    rows = [
        {k: float(v) for k, v in r.items() if k not in ("round_client", "layer")}
        for r in rows
        if r["round_client"] == last
    ]
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    # the Monte-Carlo estimate is an average of per-layer estimates: its standard error
    mean["mc_total_var_se"] = float(np.sqrt(np.sum([r["mc_total_var_se"] ** 2 for r in rows])) / len(rows))
    mean["layers"] = len(rows)
    return mean


def _variance_rows(s: dict, out: Path, labels: dict) -> list[dict]:
    rows = []
    for k, label in labels.items():
        st = _stats_summary(out / "runs" / k)
        p = s[k]["privacy"]
        rows.append(
            {
                **label,
                "sigma_A": p["sigma_a"],
                "sigma_B": p["sigma_b"],
                "A_norm": st["A_norm"],
                "B_norm": st["B_norm"],
                "E_update": st["mean_orig_update"],
                "E_noisy_update": st["mean_noisy_update"],
                "Var_Balpha": st["Var_Balpha"],
                "Var_betaA": st["Var_betaA"],
                "Var_ba": st["Var_ba"],
                "Var_exact": st["Total_Var"],
                "Var_mc": st["mc_total_var"],
                "Var_mc_se": st["mc_total_var_se"],
                "mc_over_exact": st["mc_total_var"] / st["Total_Var"],
            }
        )
    return rows


def _stats_overrides(scale):
    rounds = base_config(scale).fl.rounds
    return [*_PAPER_DP, f"dp.stats_every={rounds}", "dp.stats_samples=200"]


# the rank sweep needs projections at least as wide as the largest rank
_RANKS = {
    "smoke": ((2, 4, 8), []),
    "cpu": (
        (8, 16, 32, 64, 128),
        ["model.hidden_size=256", "model.intermediate_size=512", "model.num_kv_heads=4", "lora.target_modules=[q,v]"],
    ),
    "paper": ((8, 16, 32, 64, 128), []),
}


def rank_variance(
    scale: str, out: str | Path, overrides: Sequence[str] = (), ranks: Sequence[int] | None = None, **kw: Any
) -> dict:
    """Paper Table III / Fig. 5: train with the paper's local DP at each LoRA rank, then measure
    the expectation and variance of the noisy product (B + beta)(A + alpha) of the final global
    factors by Monte Carlo beside the exact formula (per module and layer, averaged)."""
    out = Path(out)
    default_ranks, model = _RANKS[scale] if scale in _RANKS else ((), [])
    ranks = tuple(ranks or default_ranks)
    runs = {f"rank{r}": [*model, f"lora.r={r}", f"lora.alpha={2 * r}", *_stats_overrides(scale)] for r in ranks}
    s = run_grid(runs, scale, out, overrides, **kw)
    rows = _variance_rows(s, out, {f"rank{r}": {"rank": r} for r in ranks})
    files = list(
        write_table(
            rows,
            out / "rank_variance",
            title=f"noise of the LoRA product against rank ({scale} "
            "scale), means over modules and layers; Var = sum of entry variances",
        )
    )
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ranks, [r["Var_exact"] for r in rows], "-", label="exact formula")
    ax.errorbar(
        ranks,
        [r["Var_mc"] for r in rows],
        yerr=[2 * r["Var_mc_se"] for r in rows],
        fmt="o",
        label="Monte Carlo (2 s.e.)",
    )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("LoRA rank r")
    ax.set_ylabel("total variance of the noisy update")
    ax.legend()
    files.append(save_figure(fig, out / "rank_variance.png"))
    return {"rows": rows, "files": [str(f) for f in files], "summaries": s}


_SIZES = {
    "smoke": {
        "small": ["model.hidden_size=32", "model.intermediate_size=64"],
        "large": ["model.hidden_size=64", "model.intermediate_size=128"],
    },
    "cpu": {
        "small (d=128)": ["model.hidden_size=128", "model.intermediate_size=256"],
        "large (d=512)": [
            "model.hidden_size=512",
            "model.intermediate_size=1024",
            "model.num_heads=8",
            "model.num_kv_heads=4",
        ],
    },
    "paper": {
        "Llama-2-7B": ["model.source=meta-llama/Llama-2-7b-hf"],
        "Llama-2-13B": ["model.source=meta-llama/Llama-2-13b-hf"],
    },
}


def model_size(scale: str, out: str | Path, overrides: Sequence[str] = (), rank: int = 8, **kw: Any) -> dict:
    """Paper Table IV: two model sizes at the same rank; the noise variance grows with the
    projection's m and n (the exact formula's m s_b^2 ||A||^2, n s_a^2 ||B||^2 and m n r terms)."""
    out = Path(out)
    names = {
        label: "size_" + "".join(ch for ch in label.split(" ")[0] if ch.isalnum() or ch in "-_.")
        for label in _SIZES[scale]
    }
    runs = {
        names[label]: [*ov, f"lora.r={rank}", f"lora.alpha={2 * rank}", *_stats_overrides(scale)]
        for label, ov in _SIZES[scale].items()
    }
    s = run_grid(runs, scale, out, overrides, **kw)
    rows = _variance_rows(s, out, {names[label]: {"model": label, "rank": rank} for label in _SIZES[scale]})
    files = list(
        write_table(
            rows,
            out / "model_size",
            title=f"noise of the LoRA product against model size "
            f"({scale} scale, rank {rank}), means over modules and layers",
        )
    )
    return {"rows": rows, "files": [str(f) for f in files], "summaries": s}
