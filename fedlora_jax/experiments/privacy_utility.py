"""Utility against privacy: the paper's epsilon x clip ablation, and the DP modes (local, central,
DP-SGD) calibrated to one honest epsilon."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .grid import _dp_overrides, _privacy_columns, run_grid
from .results import plot_curves, read_metrics, tail_mean, write_table

if TYPE_CHECKING:
    from collections.abc import Sequence


def eps_clip(
    scale: str,
    out: str | Path,
    overrides: Sequence[str] = (),
    epsilons: Sequence[float] = (5, 10, 15, 25),
    clips: Sequence[float] = (0.1, 1.0),
    **kw: Any,
) -> dict:
    """The paper's epsilon x clip ablation: local DP with the paper's classical noise
    (sigma = C sqrt(2 ln(1.25/delta)) / epsilon per release) for each pair, plus no DP; training
    loss curves per clip, and a table with the honest epsilon of each noise level beside the
    paper-convention one."""
    out = Path(out)
    runs = {"no_dp": ["dp.mode=none"]}
    for c in clips:
        for e in epsilons:
            runs[f"eps{e}_clip{c}"] = _dp_overrides(e, c)
    s = run_grid(runs, scale, out, overrides, **kw)
    metrics = {k: read_metrics(out / "runs" / k) for k in runs}
    rows = [
        {
            "run": "no DP",
            "epsilon_paper": None,
            "clip": None,
            "epsilon_honest": None,
            "delta": None,
            "train_loss": tail_mean(metrics["no_dp"]),
            "eval_loss": s["no_dp"]["final_eval_loss"],
            "seconds": s["no_dp"].get("seconds"),
        }
    ]
    for c in clips:
        for e in epsilons:
            k = f"eps{e}_clip{c}"
            rows.append(
                {
                    "run": k,
                    "clip": c,
                    **_privacy_columns(s[k]),
                    "train_loss": tail_mean(metrics[k]),
                    "eval_loss": s[k]["final_eval_loss"],
                    "seconds": s[k].get("seconds"),
                }
            )
    cols = ["run", "epsilon_paper", "clip", "epsilon_honest", "delta", "train_loss", "eval_loss", "seconds"]
    files = list(
        write_table(
            rows, out / "eps_clip", cols, f"epsilon x clip ({scale} scale): train loss = mean of the last 5 rounds"
        )
    )
    panels = {
        f"clip {c}": {"no DP": metrics["no_dp"], **{f"eps {e} (paper)": metrics[f"eps{e}_clip{c}"] for e in epsilons}}
        for c in clips
    }
    files.append(plot_curves(panels, out / "eps_clip.png", title=f"epsilon x clip, {scale} scale"))
    return {"rows": rows, "files": [str(f) for f in files], "summaries": s}


def dp_modes(scale: str, out: str | Path, overrides: Sequence[str] = (), epsilon: float = 8.0, **kw: Any) -> dict:
    """Local (the paper) vs central (DP-FedAvg) vs record-level DP-SGD, each calibrated to the
    same honest epsilon at the same delta. They protect different units (a client's whole data
    under replace-one; a client's whole data under add/remove; one record), which the table says."""
    out = Path(out)
    runs = {
        "none": ["dp.mode=none"],
        "local": ["dp.mode=local", "dp.noise=calibrate", f"dp.epsilon={epsilon}", "dp.clip_a=0.1", "dp.clip_b=0.1"],
        "central": [
            "dp.mode=central",
            "fl.sampling=poisson",
            "dp.noise=calibrate",
            f"dp.epsilon={epsilon}",
            "dp.clip_a=0.1",
            "dp.clip_b=0.1",
        ],
        "dpsgd": ["dp.mode=dpsgd", "dp.noise=calibrate", f"dp.epsilon={epsilon}", "dp.clip_a=1.0"],
    }
    s = run_grid(runs, scale, out, overrides, **kw)
    unit = {
        "none": "-",
        "local": "a client's data (its releases), replace-one",
        "central": "a client's data, add/remove, Poisson client sampling",
        "dpsgd": "one training record, add/remove, Poisson batches",
    }
    rows = []
    for k in runs:
        p = s[k]["privacy"]
        rows.append(
            {
                "mode": k,
                "protects": unit[k],
                "noise_multiplier": p.get("noise_multiplier"),
                "epsilon_honest": p.get("epsilon"),
                "delta": p.get("delta"),
                "train_loss": tail_mean(read_metrics(out / "runs" / k)),
                "eval_loss": s[k]["final_eval_loss"],
                "seconds": s[k].get("seconds"),
            }
        )
    files = list(write_table(rows, out / "dp_modes", title=f"DP modes calibrated to epsilon {epsilon} ({scale} scale)"))
    files.append(
        plot_curves(
            {f"calibrated to epsilon {epsilon}": {k: read_metrics(out / "runs" / k) for k in runs}},
            out / "dp_modes.png",
        )
    )
    return {"rows": rows, "files": [str(f) for f in files], "summaries": s}
