"""The experiments' run grids: the base run config of each scale, JAX's persistent compilation
cache, and run_grid (one folder per run under OUT/runs/, reused when its config is unchanged)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..config.run_config import FLSection, RunConfig, config_diff, load_config
from ..core.errors import UserError
from ..federated import algorithms as algorithms_lib

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

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


def base_config(scale: str, overrides: Sequence[str] = ()) -> RunConfig:
    """The base run config of a scale, with `a.b=value` overrides."""
    if scale not in SCALES:
        raise UserError(f"scale {scale!r} is not allowed; choose one of: {', '.join(SCALES)}")
    preset, ov = _BASE[scale]
    # the experiments compare training curves across DP settings, so their DP runs publish the
    # clients' training loss, marked 'unprotected_' (outside the guarantee) in every run folder
    return load_config(preset, [*ov, "dp.publish_client_metrics=true", *overrides])


def enable_compilation_cache(path: str | Path | None = None) -> None:
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
    runs: dict,
    scale: str,
    out: str | Path,
    overrides: Sequence[str] = (),
    reuse: bool = True,
    progress: bool = False,
    log: Callable[[str], object] = print,
    cache: bool = True,
    fixed: Sequence[str] = (),
) -> dict:
    """Run each named list of overrides on the scale's base config into OUT/runs/NAME; returns
    {name: summary} (with `seconds`). A finished run whose saved config equals the new one is
    reused, unless reuse=False. `overrides` apply to every run after its own. cache: use JAX's
    persistent compilation cache (see enable_compilation_cache). Without `progress`, a line per
    run is the progress, and datasets' progress bars are turned off for the process. fixed: keys
    that label the results (an override of them, or of a key the runs vary, is refused)."""
    from ..runs.runner import run

    if cache:
        enable_compilation_cache()
    if not progress:  # the per-run lines are the progress; no tokenization bar per run
        import datasets

        datasets.disable_progress_bars()
    out = Path(out)
    cfgs = {name: base_config(scale, [*ov, *overrides]) for name, ov in runs.items()}  # all errors before any run
    preflight(runs, cfgs, scale, out, overrides, fixed)
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


def preflight(
    runs: dict, cfgs: dict, scale: str, out: Path, overrides: Sequence[str], fixed: Sequence[str] = ()
) -> None:
    """Everything that would stop a grid part-way, checked before its first run:
    - an override of a key the grid sets per run, or of one that labels its results (`fixed`): the
      override would apply to every run while the table and figure kept the grid's labels;
    - each run's mechanism: its cross-field checks, and its calibration on the adapter's shapes where
      the model is on this machine (a hub id is not fetched here: its first run does that);
    - each existing run folder must be a run of this tool (it is replaced), never a foreign folder."""
    from ..models import hub
    from ..privacy import mechanisms as modes
    from ..privacy.audit import auditor as audit
    from ..runs.outdir import is_run_folder

    base = {name: base_config(scale, ov) for name, ov in runs.items()}
    first = next(iter(base.values()), None)
    varied = {k for c in base.values() for k in config_diff(first, c, ignore=())} if first is not None else set()
    for ov in overrides:
        key = ov.split("=", 1)[0].strip()
        for coord in sorted(varied | set(fixed)):
            if key == coord or coord.startswith(key + ".") or key.startswith(coord + "."):
                raise UserError(
                    f"--set {ov}: {coord} is a coordinate of this experiment's grid (its runs set it, and "
                    "it labels the table and figure), so an override would mislabel the results; pick "
                    "another --scale, or choose the grid through the experiment function's arguments"
                )
    for name, cfg in cfgs.items():
        modes.MECHANISMS[cfg.dp.mode].check_config(cfg)
        if cfg.model.source in ("tiny", "default") or hub.check_source(cfg.model.source) is not None:
            modes.build(cfg, audit.adapter_shapes(cfg), None)  # calibration too: the model is here
        folder = out / "runs" / name
        if folder.exists() and (not folder.is_dir() or (any(folder.iterdir()) and not is_run_folder(folder))):
            raise UserError(
                f"{str(folder)!r} exists and is not a run folder of this tool, so nothing was run and "
                "nothing was deleted; move it or choose another --out"
            )


def _train_loss(summary: dict) -> float:
    v = summary.get("final_train_loss", summary.get("unprotected_final_train_loss"))
    return math.nan if v is None else v


def _dp_overrides(epsilon, clip):
    return ["dp.mode=local", "dp.noise=classical", f"dp.epsilon={epsilon}", f"dp.clip_a={clip}", f"dp.clip_b={clip}"]


def _privacy_columns(s: dict) -> dict:
    p = s["privacy"]
    return {"epsilon_paper": p.get("epsilon_paper"), "epsilon_honest": p.get("epsilon"), "delta": p.get("delta")}
