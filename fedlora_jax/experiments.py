"""The paper's experiments and our ablations as functions.

Each experiment builds the run configs of a scale, runs them with `runner.run` (one folder per
run under OUT/runs/, reused when its config is unchanged), and writes its table as CSV and
markdown and its figure as PNG into OUT. The scripts in experiments/ and the notebooks call
these; nothing here is specific to a script.

Scales: `smoke` (seconds: tests), `cpu` (minutes on a laptop CPU: the tiny random Llama on the
synthetic verifiable tasks), `paper` (the paper's setting, a GPU/TPU job: Llama-2-7B on
alpaca-gpt4, 20 clients, 2 per round, 200 rounds, MMLU scored by log-likelihood).
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import numpy as np

from . import algorithms as algorithms_lib
from .config import FLSection, RunConfig, config_diff, load_config
from .errors import UserError

SCALES = ("smoke", "cpu", "paper")
ALGORITHMS = algorithms_lib.names()  # the seven of the paper, from the registry
_FL_DEFAULTS = FLSection()
ADAPTIVE = ("fedadagrad", "fedyogi", "fedadam")

_EVAL = ["eval_tasks=[loss,exact_match,multiple_choice]"]
_BASE = {
    "smoke": (
        "tiny",
        [
            "fl.rounds=3",
            "fl.num_clients=4",
            "fl.clients_per_round=2",
            "fl.local_steps=2",
            "fl.batch_size=4",
            "data.synthetic_examples=160",
            "data.seq_len=32",
            "eval_every=3",
            "eval_batches=1",
            "eval_limit=4",
            "checkpoint_every=0",
            *_EVAL,
        ],
    ),
    # a wider tiny model with all seven projections adapted at rank 16, so that it learns the
    # verifiable tasks visibly within 40 rounds (about 20 s a run on a 2-core CPU)
    "cpu": (
        "tiny",
        [
            "model.hidden_size=128",
            "model.intermediate_size=256",
            "lora.target_modules=[q,k,v,o,gate,up,down]",
            "lora.r=16",
            "lora.alpha=32",
            "fl.lr=1e-2",
            "fl.lr_min=1e-3",
            "fl.rounds=40",
            "eval_every=10",
            "eval_limit=64",
            "checkpoint_every=0",
            *_EVAL,
        ],
    ),
    "paper": ("paper", ["eval_tasks=[loss,multiple_choice]", "eval_choices=cais/mmlu:all", "eval_limit=2000"]),
}
# OpenFedLLM's (the paper's code base) server learning rate for the adaptive optimizers is 1e-3;
# the short CPU runs use 1e-2 so that the adaptive servers move within 40 rounds
_ADAPTIVE_SERVER_LR = {"smoke": 1e-2, "cpu": 1e-2, "paper": 1e-3}
_PAPER_DP = ["dp.mode=local", "dp.noise=classical", "dp.epsilon=25", "dp.clip_a=0.1", "dp.clip_b=0.1"]


def base_config(scale: str, overrides=()) -> RunConfig:
    """The base run config of a scale, with `a.b=value` overrides."""
    if scale not in SCALES:
        raise UserError(f"scale {scale!r} is not allowed; choose one of: {', '.join(SCALES)}")
    preset, ov = _BASE[scale]
    # the experiments compare training curves across DP settings, so their DP runs publish the
    # clients' training loss, marked 'unprotected_' (outside the guarantee) in every run folder
    return load_config(preset, [*ov, "dp.publish_client_metrics=true", *overrides])


def enable_compilation_cache(path=None) -> None:
    """Turn on JAX's persistent compilation cache (default ~/.cache/fedlora_jax/xla) unless one is
    set already: runs of one experiment share most programs (model init, evaluation), and a rerun
    compiles nothing."""
    import jax

    if jax.config.jax_compilation_cache_dir:
        return
    path = Path(path or Path.home() / ".cache" / "fedlora_jax" / "xla")
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def run_grid(
    runs: dict, scale: str, out, overrides=(), reuse: bool = True, progress: bool = False, log=print, cache: bool = True
) -> dict:
    """Run each named list of overrides on the scale's base config into OUT/runs/NAME; returns
    {name: summary} (with `seconds`). A finished run whose saved config equals the new one is
    reused, unless reuse=False. `overrides` apply to every run after its own. cache: use JAX's
    persistent compilation cache (see enable_compilation_cache). Without `progress`, a line per
    run is the progress, and datasets' progress bars are turned off for the process."""
    from .runner import run

    if cache:
        enable_compilation_cache()
    if not progress:  # the per-run lines are the progress; no tokenization bar per run
        import datasets

        datasets.disable_progress_bars()
    out = Path(out)
    cfgs = {name: base_config(scale, [*ov, *overrides]) for name, ov in runs.items()}  # all errors before any run
    summaries = {}
    for i, (name, cfg) in enumerate(cfgs.items()):
        folder = out / "runs" / name
        saved = folder / "summary.json"
        if reuse and saved.exists() and not config_diff(load_config(str(folder / "config.yaml")), cfg, ignore=()):
            summaries[name] = json.loads(saved.read_text())
            log(f"[{i + 1}/{len(cfgs)}] {name}: reused {folder}")
            continue
        t0 = time.time()
        s = run(cfg, folder, overwrite=True, progress=progress)
        s["seconds"] = time.time() - t0
        saved.write_text(json.dumps(s, indent=2))
        summaries[name] = s
        log(
            f"[{i + 1}/{len(cfgs)}] {name}: {s['seconds']:.1f} s, train loss {_train_loss(s):.4g}"
            + (f", epsilon {s['privacy']['epsilon']:.4g}" if s["privacy"].get("epsilon") is not None else "")
        )
    return summaries


def _train_loss(summary: dict) -> float:
    v = summary.get("final_train_loss", summary.get("unprotected_final_train_loss"))
    return math.nan if v is None else v


def read_metrics(folder) -> list[dict]:
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


def write_table(rows: list[dict], path_stem, columns=None, title: str | None = None) -> tuple[Path, Path]:
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


def save_figure(fig, path) -> Path:
    """tight_layout, write a PNG, close the figure."""
    plt = _plt()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_curves(
    panels: dict, path, key: str = "loss", ylabel: str = "train loss (nats/token)", title: str | None = None
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


def _dp_overrides(epsilon, clip):
    return ["dp.mode=local", "dp.noise=classical", f"dp.epsilon={epsilon}", f"dp.clip_a={clip}", f"dp.clip_b={clip}"]


def _privacy_columns(s: dict) -> dict:
    p = s["privacy"]
    return {"epsilon_paper": p.get("epsilon_paper"), "epsilon_honest": p.get("epsilon"), "delta": p.get("delta")}


# ----------------------------------------------------------------------------- epsilon x clip


def eps_clip(scale: str, out, overrides=(), epsilons=(5, 10, 15, 25), clips=(0.1, 1.0), **kw) -> dict:
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


# ----------------------------------------------------------------------------- algorithms


def _dp_allows(algorithm: str) -> bool:
    """Whether the paper's local DP accepts this algorithm (the mechanism object decides)."""
    from .privacy.modes import MECHANISMS

    return not algorithms_lib.get(algorithm).hook(_FL_DEFAULTS).keeps_client_state or (
        MECHANISMS["local"].controls_private
    )


def algorithms(scale: str, out, overrides=(), algos=ALGORITHMS, **kw) -> dict:
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
            **{f"{m.replace('eval_', '')}_{t}": v for m, v in base_scores.items() for t in ("no_dp", "dp")},
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
    score_cols = ["algorithm"] + [f"{m}_{t}" for m in metrics_seen for t in ("no_dp", "dp")]
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


# ----------------------------------------------------------------------------- noise variance


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


def rank_variance(scale: str, out, overrides=(), ranks=None, **kw) -> dict:
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


def model_size(scale: str, out, overrides=(), rank: int = 8, **kw) -> dict:
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


# ----------------------------------------------------------------------------- DP modes


def dp_modes(scale: str, out, overrides=(), epsilon: float = 8.0, **kw) -> dict:
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


# ----------------------------------------------------------------------------- aggregation


def aggregation(scale: str, out, overrides=(), **kw) -> dict:
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


def population(scale: str, out, overrides=(), **kw) -> dict:
    """Utility against cohort size at fixed honest epsilon for populations up to 10,000 clients
    (fedlora_jax.population)."""
    from .population import population as run_population  # it builds on this module's helpers

    return run_population(scale, out, overrides, **kw)


EXPERIMENTS = {
    "eps_clip": eps_clip,
    "algorithms": algorithms,
    "rank_variance": rank_variance,
    "model_size": model_size,
    "dp_modes": dp_modes,
    "aggregation": aggregation,
    "population": population,
}


def main(name: str, argv=None) -> int:
    """The command line of the experiments/ scripts: --scale, --out, --set, --fresh."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog=f"experiments/{name}.py", description=(EXPERIMENTS[name].__doc__ or "").strip())
    p.add_argument("--scale", choices=SCALES, default="cpu")
    p.add_argument("--out", help="output folder (default experiments/results/NAME/SCALE)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override applied to every run, e.g. --set fl.rounds=10",
    )
    p.add_argument("--fresh", action="store_true", help="rerun runs that a previous call finished")
    p.add_argument("--progress", action="store_true", help="a progress bar per run (default at paper scale)")
    args = p.parse_args(argv)
    out = Path(args.out or Path("experiments") / "results" / name / args.scale)
    t0 = time.time()
    try:
        res = EXPERIMENTS[name](
            args.scale, out, args.set, reuse=not args.fresh, progress=args.progress or args.scale == "paper"
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for f in res["files"]:
        if f.endswith(".md"):
            print(Path(f).read_text())
    print(f"{name} ({args.scale} scale) took {time.time() - t0:.1f} s; wrote {', '.join(res['files'])}")
    return 0
