"""The availability experiment: when clients come and go (diurnal availability), what does honest
accounting cost, and does BandMF (DP-FTRL) win it back?

Under `fl.availability: diurnal` the server can only pick among the clients awake now, so
amplification by sampling does not hold and central DP accounts each client's participations as
composed Gaussians. For each population N (cohort K, diurnal availability) and each target epsilon
(delta = 1e-5), four runs:
  central_claimed  DP-FedAvg, Poisson sampling, its noise multiplier the one that amplification by
                   sampling would call the target (the same config with every client always available,
                   dp.noise=calibrate): what paper-style accounting claims. The run reports its honest,
                   unamplified epsilon beside that claim.
  central_honest   DP-FedAvg, Poisson sampling, dp.noise=calibrate: accounted without amplification,
                   calibrated for a client picked in every round (the secret draw is not known ahead)
  bandmf           DP-FTRL with a banded matrix factorization (dp.mode bandmf), cyclic participation,
                   dp.noise=calibrate, band min(4, ceil(N / K), rounds)
  none             no DP (Poisson sampling)
The conventions are the population experiment's (populations.py): the synthetic tasks, few examples
per client, dp.scope global, clip 0.1. The table reports the held-out loss and exact match after the
last round, the claimed and honest epsilon and the noise multiplier; the figure plots held-out loss
over rounds, one panel per (N, epsilon), a line per mechanism.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

# the experiment helpers from their own modules (not the package: its __init__ imports this module)
from .grid import base_config, preflight, run_grid
from .populations import DELTA, _population
from .results import _plt, claim_outputs, read_metrics, save_figure, write_table

if TYPE_CHECKING:
    from collections.abc import Sequence

# populations N (cohort K each) per scale; cpu: the tiny model, tens of minutes; paper: SmolLM2 on an accelerator
GRIDS = {
    "smoke": {"populations": (40,), "cohort": 4, "epsilons": (8.0,), "rounds": 4},
    "cpu": {"populations": (1000, 10000), "cohort": 100, "epsilons": (2.0, 8.0), "rounds": 30},
    "paper": {"populations": (1000, 10000), "cohort": 100, "epsilons": (2.0, 8.0), "rounds": 100},
}
# every client awake in a window of each 24-round "day" (half of it on average, per client 0.25 to 0.75)
DIURNAL = ["fl.availability=diurnal", "fl.availability_period=24", "fl.availability_window=0.5"]
MECHANISMS = {
    # the amplified multiplier is added per run (dp.noise=multiplier, dp.noise_multiplier=z)
    "central_claimed": ["dp.mode=central", "fl.sampling=poisson", "dp.noise=multiplier"],
    "central_honest": ["dp.mode=central", "fl.sampling=poisson", "dp.noise=calibrate"],
    "bandmf": ["dp.mode=bandmf", "fl.sampling=cyclic", "dp.noise=calibrate"],  # with dp.band
}
MAX_BAND = 4  # BandMF's band: min(MAX_BAND, ceil(N / K) cyclic groups, rounds)
COLOURS = {"none": "0.45", "central_claimed": "tab:red", "central_honest": "tab:blue", "bandmf": "tab:green"}
EVAL_EVERY = {"smoke": 1, "cpu": 3, "paper": 10}  # held-out loss over rounds: the figure's points
OUTPUTS = ("availability.csv", "availability.md", "availability.png")
# the keys that label the table and figure: an override of them is refused (it would mislabel them)
LABELS = (
    "fl.num_clients",
    "fl.clients_per_round",
    "fl.availability",
    "fl.availability_period",
    "fl.availability_window",
    "fl.sampling",
    "dp.mode",
    "dp.epsilon",
    "dp.delta",
    "dp.noise",
    "dp.noise_multiplier",
    "dp.band",
    "dp.scope",
    "dp.clip_a",
    "dp.clip_b",
)


def claimed_noise(scale: str, run_overrides: Sequence[str], overrides: Sequence[str] = ()) -> tuple[float, float]:
    """(noise multiplier, epsilon) that amplification by sampling claims for a run: its mechanism built
    for the same config with every client always available and dp.noise=calibrate (Poisson sampling at
    q = K / N, PLD)."""
    from ..privacy import mechanisms
    from ..privacy.audit.canary import adapter_shapes

    cfg = base_config(scale, [*run_overrides, *overrides, "fl.availability=always", "dp.noise=calibrate"])
    mech = mechanisms.build(cfg, adapter_shapes(cfg))
    return float(mech.z), float(mech.ledger.epsilons(rounds=cfg.fl.rounds).max())


def runs_of(
    scale: str,
    overrides: Sequence[str] = (),
    examples_per_client: int = 2,
    populations: Sequence[int] | None = None,
    epsilons: Sequence[float] | None = None,
) -> dict[str, tuple[dict, list[str]]]:
    """{run name: (its coordinates, its overrides)} of a scale's grid (or the given part of it). The
    overrides that apply to every run are needed here: the claimed multiplier depends on them."""
    grid = GRIDS[scale]
    k = grid["cohort"]
    runs = {}
    for n in populations or grid["populations"]:
        pop = [*_population(n, k, grid["rounds"], examples_per_client, scale), *DIURNAL]
        pop.append(f"eval_every={EVAL_EVERY[scale]}")
        rounds = base_config(scale, [*pop, *overrides]).fl.rounds  # the band must fit the run
        coords = {"N": n, "K": k, "rounds": rounds}
        runs[f"N{n}_nodp"] = (
            {**coords, "epsilon": None, "mechanism": "none"},
            [*pop, "dp.mode=none", "fl.sampling=poisson"],
        )
        band = min(MAX_BAND, -(-n // k), rounds)
        for eps in epsilons or grid["epsilons"]:
            dp = [*pop, "dp.scope=global", "dp.clip_a=0.1", "dp.clip_b=0.1", f"dp.epsilon={eps}"]
            z, claimed = claimed_noise(scale, [*dp, *MECHANISMS["central_honest"]], overrides)
            extra = {
                "central_claimed": ([f"dp.noise_multiplier={z!r}"], {"epsilon_claimed": claimed}),
                "central_honest": ([], {}),
                "bandmf": ([f"dp.band={band}"], {"band": band}),
            }
            for mech, ov in MECHANISMS.items():
                more, info = extra[mech]
                runs[f"N{n}_eps{eps:g}_{mech}"] = (
                    {**coords, "epsilon": eps, "mechanism": mech, **info},
                    [*dp, *ov, *more],
                )
    return runs


def availability(
    scale: str,
    out: str | Path,
    overrides: Sequence[str] = (),
    examples_per_client: int = 2,
    populations: Sequence[int] | None = None,
    epsilons: Sequence[float] | None = None,
    **kw: Any,
) -> dict:
    """Diurnal availability at equal target epsilon: DP-FedAvg with the epsilon amplification would
    claim (and the honest one it has), DP-FedAvg accounted honestly, BandMF with cyclic participation,
    and no DP; held-out loss over rounds. populations: a list of N and epsilons: a list, to run part
    of the scale's grid."""
    out = Path(out)
    claim_outputs(out, OUTPUTS)
    preflight({}, {}, scale, out, overrides, LABELS)  # an override of a label: refused before the claimed noise
    grid = runs_of(scale, overrides, examples_per_client, populations, epsilons)
    s = run_grid({name: ov for name, (_, ov) in grid.items()}, scale, out, overrides, fixed=LABELS, **kw)
    files = write_outputs(grid, s, out, scale)
    return {"rows": files["rows"], "files": files["files"], "summaries": s}


def _row(coords: dict, summ: dict) -> dict:
    p = summ.get("privacy", {})
    honest = p.get("epsilon")
    return {
        **coords,
        "band": coords.get("band"),
        # what the run claims: amplification's figure for central_claimed, its own accounting otherwise
        "epsilon_claimed": coords.get("epsilon_claimed", honest),
        "epsilon_honest": honest,
        "delta": p.get("delta"),
        "noise_multiplier": p.get("noise_multiplier"),
        # the most rounds a client took part in: outside the guarantee (a simulation's diagnostic)
        "max_participations": p.get("unprotected_max_participations"),
        "eval_loss": summ.get("final_eval_loss"),
        "exact_match": (summ.get("final_scores") or {}).get("eval_exact_match"),
        "seconds": summ.get("seconds"),
    }


def write_outputs(grid: dict, summaries: dict, out: Path, scale: str) -> dict:
    """The table (CSV + markdown, every run of `grid` that has a summary) and the figure (held-out loss
    over rounds, read from the run folders under OUT/runs/)."""
    rows, curves = [], {}
    for name, (coords, _) in grid.items():
        if name not in summaries:
            continue
        rows.append(_row(coords, summaries[name]))
        metrics = read_metrics(out / "runs" / name) if (out / "runs" / name / "metrics.jsonl").exists() else []
        start = summaries[name].get("initial_eval_loss")
        pts = [(0, start)] if start is not None else []
        pts += [(r["round"], r["eval_loss"]) for r in metrics if r.get("eval_loss") is not None]
        curves[name] = pts
    cols = [
        "N",
        "K",
        "rounds",
        "epsilon",
        "mechanism",
        "band",
        "noise_multiplier",
        "epsilon_claimed",
        "epsilon_honest",
        "delta",
        "max_participations",
        "eval_loss",
        "exact_match",
        "seconds",
    ]
    title = (
        f"diurnal availability at equal target epsilon ({scale} scale, delta {DELTA:g}); epsilon_claimed: what "
        "amplification by sampling would claim (central_claimed) or the run's own accounting; epsilon_honest: "
        "the run's accountant, without amplification; eval loss and exact match after the last round"
    )
    files = [*write_table(rows, out / "availability", cols, title)]
    files.append(plot_availability(rows, curves, grid, out / "availability.png", scale))
    return {"rows": rows, "files": [str(f) for f in files]}


def plot_availability(rows: list[dict], curves: dict, grid: dict, path: str | Path, scale: str = "") -> Path:
    """Held-out loss over rounds, one panel per (N, epsilon) (N down, epsilon across), a line per
    mechanism (no DP dashed grey in every panel of its N)."""
    plt = _plt()
    pops = sorted({r["N"] for r in rows})
    epsilons = sorted({r["epsilon"] for r in rows if r["epsilon"] is not None}) or [None]
    fig, axes = plt.subplots(
        len(pops), len(epsilons), figsize=(6 * len(epsilons), 4 * len(pops)), squeeze=False, sharey=True
    )
    for i, n in enumerate(pops):
        for j, eps in enumerate(epsilons):
            ax = axes[i][j]
            for name, (coords, _) in grid.items():
                mech = coords["mechanism"]
                if coords["N"] != n or (mech != "none" and coords["epsilon"] != eps) or not curves.get(name):
                    continue
                row = next(
                    r for r in rows if r["N"] == n and r["mechanism"] == mech and r["epsilon"] == coords["epsilon"]
                )
                label = mech if mech == "none" else f"{mech}, honest eps {_num(row['epsilon_honest'])}"
                if mech == "central_claimed":
                    label = f"{mech} (claims eps {_num(row['epsilon_claimed'])}), honest {_num(row['epsilon_honest'])}"
                ax.plot(
                    *zip(*curves[name]),
                    color=COLOURS.get(mech),
                    linestyle="--" if mech == "none" else "-",
                    marker="o" if len(curves[name]) < 12 else None,
                    label=label,
                )
            ax.set_xlabel("round")
            ax.set_ylabel("held-out loss (nats/token)")
            what = "without DP" if eps is None else f"target epsilon {eps:g} (delta {DELTA:g})"
            ax.set_title(f"N = {n:,}, K = {rows[0]['K']}, {what}")
            ax.legend(fontsize=7)
    if scale:
        fig.suptitle(f"DP-FedLoRA under diurnal availability, {scale} scale")
    return save_figure(fig, path)


def _num(v) -> str:
    return "?" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3g}"
