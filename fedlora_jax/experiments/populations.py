"""The population experiment: how many clients does DP-FedLoRA need before it learns at a
meaningful epsilon, and which mechanism gets there first?

For each population N and cohort K (q = K / N; only K < N) and each honest epsilon (delta = 1e-5,
<= 1/N for every N here), every DP run is calibrated (dp.noise=calibrate) to that epsilon for the
mechanism it really runs:
  central          central DP-FedAvg, Poisson client sampling, fixed clip
  central_adaptive the same with adaptive clipping (Andrew et al. 2021; the quantile's noise is in
                   the ledger's effective multiplier)
  ffa_central      FFA-LoRA (A frozen, only B trained and released) under central DP
  local            the paper's local mechanism (each client's release noised), replace-one,
                   composed over the worst client's participations
and one run without DP per (N, K). Clients hold few examples (`examples_per_client`), as in
cross-device populations. The table reports the held-out loss and exact match after the last
round; the figure plots held-out loss against K, one panel per epsilon.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

# the experiment helpers from their own modules (not the package: its __init__ imports this module)
from .grid import run_grid
from .results import _plt, claim_outputs, save_figure, write_table

if TYPE_CHECKING:
    from collections.abc import Sequence

# (N, K) pairs per scale; cpu: the tiny model, minutes to an hour; paper: SmolLM2 on an accelerator
GRIDS = {
    "smoke": {"populations": ((40, 4),), "epsilons": (8.0,), "rounds": 2},
    "cpu": {
        "populations": ((100, 10), (1000, 10), (1000, 100), (10000, 10), (10000, 100), (10000, 1000)),
        "epsilons": (2.0, 8.0),
        "rounds": 30,
    },
    "paper": {
        "populations": ((100, 10), (1000, 10), (1000, 100), (10000, 100), (10000, 1000)),
        "epsilons": (2.0, 8.0),
        "rounds": 100,
    },
}
MECHANISMS = {
    "central": ["dp.mode=central", "fl.sampling=poisson", "dp.scope=global"],
    "central_adaptive": ["dp.mode=central", "fl.sampling=poisson", "dp.scope=global", "dp.adaptive_clip=true"],
    "ffa_central": ["dp.mode=central", "fl.sampling=poisson", "dp.scope=global", "lora.freeze_a=true"],
    "local": ["dp.mode=local", "dp.scope=global"],
}
DELTA = 1e-5
OUTPUTS = ("population.csv", "population.md", "population.png")
# the keys that label the table and figure: an override of them is refused (it would mislabel them);
# choose the grid through `populations` and `epsilons`
LABELS = ("fl.num_clients", "fl.clients_per_round", "dp.epsilon", "dp.delta", "dp.mode", "fl.sampling")
# the scale's model, with small per-client work (K clients x local_steps x batch_size per round)
# and a learning rate for the scale's model (cosine down to lr_min: the tiny model's 1e-2 -> 1e-3;
# SmolLM2's LoRA as the default preset, 5e-4 -> 1e-5, below the paper preset's 7B rates)
_LOCAL = {
    "smoke": ["fl.local_steps=1", "fl.batch_size=2", "fl.lr_min=1e-3"],
    "cpu": ["fl.local_steps=2", "fl.batch_size=4", "fl.clients_per_chunk=250", "eval_every=10", "fl.lr_min=1e-3"],
    "paper": [
        "model.source=default",  # SmolLM2-135M-Instruct, the offline GGUF
        "fl.local_steps=2",
        "fl.batch_size=4",
        "fl.clients_per_chunk=100",
        "fl.lr=5e-4",
        "fl.lr_min=1e-5",
        "data.max_examples=null",  # the paper preset caps the data at 20,000 examples; N = 10,000 needs 22,223
    ],
}


def _population(n: int, k: int, rounds: int, examples_per_client: int, scale: str) -> list[str]:
    # "paper" starts from the paper preset (7B); the population study uses SmolLM2 and the
    # synthetic verifiable tasks there too, so that exact match measures learning
    return [
        f"fl.num_clients={n}",
        f"fl.clients_per_round={k}",
        f"fl.rounds={rounds}",
        "data.source=synthetic",
        "data.template=plain",
        "data.seq_len=32",
        "data.partition=iid",
        "data.eval_fraction=0.1",
        f"data.synthetic_examples={int(n * examples_per_client / 0.9) + 1}",  # 10% held out
        f"dp.delta={DELTA}",
        "eval_tasks=[loss,exact_match]",
        *_LOCAL[scale],
    ]


def runs_of(
    scale: str,
    examples_per_client: int = 2,
    populations: Sequence[tuple[int, int]] | None = None,
    epsilons: Sequence[float] | None = None,
) -> dict[str, tuple[dict, list[str]]]:
    """{run name: (its coordinates, its overrides)} of a scale's grid (or the given part of it)."""
    grid = GRIDS[scale]
    runs = {}
    for n, k in populations or grid["populations"]:
        pop = _population(n, k, grid["rounds"], examples_per_client, scale)
        runs[f"N{n}_K{k}_nodp"] = ({"N": n, "K": k, "epsilon": None, "mechanism": "none"}, [*pop, "dp.mode=none"])
        for eps in epsilons or grid["epsilons"]:
            for mech, ov in MECHANISMS.items():
                clip = ["dp.clip_a=0.1", "dp.clip_b=0.1"]
                if mech == "central_adaptive":
                    # Andrew et al.'s count noise K/20, at least 2: the update's share of the
                    # calibrated multiplier z needs z < 2 x the count noise
                    clip.append(f"dp.clip_count_noise={max(k / 20, 2.0):g}")
                runs[f"N{n}_K{k}_eps{eps:g}_{mech}"] = (
                    {"N": n, "K": k, "epsilon": eps, "mechanism": mech},
                    [*pop, *ov, "dp.noise=calibrate", f"dp.epsilon={eps}", *clip],
                )
    return runs


def population(
    scale: str,
    out: str | Path,
    overrides: Sequence[str] = (),
    examples_per_client: int = 2,
    populations: Sequence[tuple[int, int]] | None = None,
    epsilons: Sequence[float] | None = None,
    **kw: Any,
) -> dict:
    """Utility against cohort size K at fixed honest epsilon, for populations N up to 10,000:
    central DP-FedAvg (fixed and adaptive clip), FFA-LoRA under central DP, the paper's local
    mechanism, and no DP; held-out loss and exact match after the last round. populations: a
    list of (N, K) and epsilons: a list, to run part of the scale's grid."""
    out = Path(out)
    grid = runs_of(scale, examples_per_client, populations, epsilons)
    claim_outputs(out, OUTPUTS)
    s = run_grid({name: ov for name, (_, ov) in grid.items()}, scale, out, overrides, fixed=LABELS, **kw)
    files = write_outputs(grid, s, out, scale)
    return {"rows": files.pop("rows"), "files": files["files"], "summaries": s}


def write_outputs(grid: dict, summaries: dict, out: Path, scale: str) -> dict:
    """The table (CSV + markdown, every run of `grid` that has a summary) and the figure."""
    rows = []
    for name, (coords, _) in grid.items():
        if name not in summaries:
            continue
        summ = summaries[name]
        p = summ.get("privacy", {})
        scores = summ.get("final_scores") or {}
        rows.append(
            {
                **coords,
                "q": coords["K"] / coords["N"],
                "noise_multiplier": p.get("noise_multiplier"),
                "epsilon_honest": p.get("epsilon"),
                "delta": p.get("delta"),
                "eval_loss": summ.get("final_eval_loss"),
                "exact_match": scores.get("eval_exact_match"),
                "seconds": summ.get("seconds"),
            }
        )
    cols = [
        "N",
        "K",
        "q",
        "mechanism",
        "epsilon",
        "epsilon_honest",
        "delta",
        "noise_multiplier",
        "eval_loss",
        "exact_match",
        "seconds",
    ]
    files = list(
        write_table(
            rows,
            out / "population",
            cols,
            f"population x cohort at fixed honest epsilon ({scale} scale, delta {DELTA:g}); "
            "eval loss and exact match after the last round",
        )
    )
    files.append(plot_population(rows, out / "population.png", scale))
    return {"rows": rows, "files": [str(f) for f in files]}


def plot_population(rows: list[dict], path: str | Path, scale: str = "") -> Path:
    """Held-out loss against K (log axis), one panel per epsilon, a line per (mechanism, N): the
    mechanism is the colour, N the marker and line style (no DP dashed grey)."""
    plt = _plt()
    epsilons = sorted({r["epsilon"] for r in rows if r["epsilon"] is not None}) or [None]  # no-DP runs only: one panel
    fig, axes = plt.subplots(1, len(epsilons), figsize=(6 * len(epsilons), 4.5), squeeze=False, sharey=True)
    colours = dict(zip(["none", *MECHANISMS], ["0.45", "tab:blue", "tab:green", "tab:orange", "tab:red"]))
    populations = sorted({r["N"] for r in rows})
    looks = {n: (m, ls) for n, m, ls in zip(populations, "osD^v", [":", "-.", "-", (0, (5, 1)), (0, (1, 1))])}
    for ax, eps in zip(axes[0], epsilons):
        for mech in ["none", *MECHANISMS]:
            for n in populations:
                pts = sorted(
                    (r["K"], r["eval_loss"])
                    for r in rows
                    if r["N"] == n
                    and r["mechanism"] == mech
                    and (r["epsilon"] == eps or mech == "none")
                    and r["eval_loss"] is not None
                )
                if pts:
                    marker, line = looks.get(n, ("o", "-"))
                    ax.plot(
                        *zip(*pts),
                        color=colours.get(mech),
                        marker=marker,
                        linestyle="--" if mech == "none" else line,
                        label=f"{mech}, N={n:,}",
                    )
        ax.set_xscale("log")
        ax.set_xlabel("clients per round K")
        ax.set_ylabel("held-out loss after the last round")
        ax.set_title("without DP" if eps is None else f"honest epsilon {eps:g} (delta {DELTA:g})")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if scale:
        fig.suptitle(f"DP-FedLoRA against cohort size, {scale} scale")
    return save_figure(fig, path)
