"""The paper's experiments and our ablations as functions.

Each experiment builds the run configs of a scale, runs them with `runner.run` (one folder per
run under OUT/runs/, reused when its config is unchanged), and writes its table as CSV and
markdown and its figure as PNG into OUT. The scripts in experiments/ and the notebooks call
these; nothing here is specific to a script.

Scales: `smoke` (seconds: tests), `cpu` (minutes on a laptop CPU: the tiny random Llama on the
synthetic verifiable tasks), `paper` (the paper's setting, a GPU/TPU job: Llama-2-7B on
alpaca-gpt4, 20 clients, 2 per round, 200 rounds, MMLU scored by log-likelihood).

The shared parts: grid.py (the scales' base configs, run_grid) and results.py (metrics, tables,
figures); the experiments by concept: privacy_utility.py (eps_clip, dp_modes), federation.py
(algorithms, aggregation), noise_variance.py (rank_variance, model_size), population in
populations.py, and availability (diurnal availability, honest accounting, BandMF) in availability.py.
Every name is importable from here.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

# the function, imported eagerly: it has its module's name, so this binding must come after the
# submodule's import (a lazy import would rebind `experiments.availability` to the module)
from .availability import availability
from .federation import aggregation, algorithms
from .grid import ADAPTIVE, ALGORITHMS, SCALES, base_config, enable_compilation_cache, run_grid  # noqa: F401  (re-exported)
from .noise_variance import model_size, rank_variance
from .privacy_utility import dp_modes, eps_clip
from .results import (  # noqa: F401  (re-exported)
    _plt,
    claim_outputs,
    plot_curves,
    read_metrics,
    save_figure,
    tail_mean,
    write_table,
)

if TYPE_CHECKING:
    from collections.abc import Sequence


def population(scale: str, out: str | Path, overrides: Sequence[str] = (), **kw: Any) -> dict:
    """Utility against cohort size at fixed honest epsilon for populations up to 10,000 clients
    (fedlora_jax.experiments.populations)."""
    from .populations import population as run_population  # it builds on this package's helpers

    return run_population(scale, out, overrides, **kw)


EXPERIMENTS = {
    "eps_clip": eps_clip,
    "algorithms": algorithms,
    "rank_variance": rank_variance,
    "model_size": model_size,
    "dp_modes": dp_modes,
    "aggregation": aggregation,
    "population": population,
    "availability": availability,
}


def main(name: str, argv: Sequence[str] | None = None) -> int:
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
