"""Metric writers: where the metrics rows of a run go.

One small interface: `open(out, cfg, rows, start)`, `write(row, step)`, `close()`. The runner holds one
`Writers` (the fan-out) and calls `write` once per round:

- metrics.jsonl and metrics.csv get EVERY round (resume and the summary read metrics.jsonl);
- the optional writers chosen in `logging.writers` (tensorboard, wandb) and the progress bar get the
  rounds `logs` picks: every `logging.log_every`-th round, evaluation rounds, the last round,
  and the round where a run stops (the fan-out keeps the last unlogged row and writes it at `close`).

Privacy: a writer writes the row it is given, i.e. the metrics.jsonl row whose names the DP mode
chose (`Mechanism.published_name`, the `unprotected_` prefix), and nothing else: no config, no system
statistics, no console capture.

Resume: `open` receives the rows kept at a resume (rounds <= the checkpoint, `start`); rows logged
after the checkpoint were dropped and rerun (to the same values, `seconds` aside).
- jsonl/csv are rewritten from the kept rows (atomically).
- tensorboard writes into the same folder (RUN/tensorboard) with `purge_step = start + 1`: a
  SessionLog START that tells readers to drop the earlier events of steps > start. Every write is
  flushed, so what a killed session logged up to its checkpoint is on disk.
- wandb keeps its run id and the last step it sent in RUN/wandb/fedlora_run.json: a resumed session
  continues that run id and skips the steps already sent (W&B cannot take a step back).

tensorboardX and wandb are imported only when chosen; `check(cfg)` fails early (a UserError naming
the package and the pip extra) when one is chosen and not installed.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.errors import UserError
from . import reading, runfolder
from .metric_files import CsvWriter, JsonlWriter, Writer, rewrite_rows, write_csv  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    from ..config.run_config import RunConfig

# writer name -> (module imported, pip package, pip extra of fedlora-jax)
OPTIONAL = {
    "tensorboard": ("tensorboardX", "tensorboardX", "tensorboard"),
    "wandb": ("wandb", "wandb", "wandb"),
}


def _import(name: str):
    module, package, extra = OPTIONAL[name]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(
            f"logging.writers lists {name!r}, but the package {package!r} is not installed; "
            f"install it with: pip install 'fedlora-jax[{extra}]' (or pip install {package}), "
            f"or remove {name!r} from logging.writers"
        ) from None


def check(cfg: RunConfig) -> None:
    """Each chosen optional writer's package imports (a UserError naming the package and extra if not)."""
    for name in cfg.logging.writers:
        _import(name)


def scalars(row: dict) -> dict:
    """The numeric, finite values of a row except `round` (the step): what tensorboard and wandb get."""
    out = {}
    for k, v in row.items():
        if k == "round" or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(v):
            out[k] = v
    return out


class TensorBoardWriter(Writer):
    """RUN/tensorboard: one scalar per metrics key (the same names), step = round."""

    name = "tensorboard"

    def open(self, out: Path, cfg: RunConfig, rows: list[dict], start: int) -> None:
        tbx = _import("tensorboard")
        # purge_step: readers drop this folder's earlier events of steps >= start + 1 (logged after
        # the checkpoint by a killed session, rerun now); in a fresh folder there is nothing to drop
        self.w = tbx.SummaryWriter(str(out / "tensorboard"), purge_step=start + 1)
        if start == 0:  # the run's hyperparameters, once (the HPARAMS tab); a resume keeps them
            exp, ssi, sei = tbx.summary.hparams(hparams(cfg), {k: None for k in HPARAM_METRICS})
            fw = self.w._get_file_writer()
            for summary in (exp, ssi, sei):
                fw.add_summary(summary)

    def write(self, row: dict, step: int) -> None:
        for k, v in scalars(row).items():
            self.w.add_scalar(k, v, step)
        self.w.flush()  # on disk before the next checkpoint: a kill -9 must not lose logged rounds

    def close(self) -> None:
        self.w.close()


class WandbWriter(Writer):
    """RUN/wandb (wandb's own folder layout): the metrics keys, step = round; no config, no system
    statistics, no code or git state, no console capture."""

    name = "wandb"

    def open(self, out: Path, cfg: RunConfig, rows: list[dict], start: int) -> None:
        wandb = _import("wandb")
        folder = out / "wandb"
        folder.mkdir(exist_ok=True)
        self.state_path = folder / "fedlora_run.json"
        state = reading.read_json(self.state_path) if self.state_path.exists() else {}
        # last_step -1: nothing sent yet (step 0 is the evaluation before the first round)
        self.state = {"id": state.get("id") or secrets.token_hex(4), "last_step": state.get("last_step", -1)}
        self._save()
        self.run = wandb.init(
            project=cfg.logging.wandb_project,
            name=cfg.name,
            id=self.state["id"],
            resume="allow",
            dir=str(out),
            mode=cfg.logging.wandb_mode,
            settings=wandb.Settings(
                console="off",
                save_code=False,
                disable_git=True,
                disable_code=True,
                x_disable_stats=True,
                x_disable_meta=True,
                x_disable_machine_info=True,
                x_save_requirements=False,
                silent=True,
            ),
        )

    def _save(self):
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        tmp.write_text(json.dumps(self.state))
        os.replace(tmp, self.state_path)

    def write(self, row: dict, step: int) -> None:
        if step <= self.state["last_step"]:
            return  # sent by an earlier session of this run (a resume reruns it to the same values)
        self.run.log(scalars(row), step=step)
        self.state["last_step"] = step
        self._save()

    def amend(self, fields: dict, step: int) -> None:
        if step >= self.state["last_step"]:  # W&B takes more values at its current step, never an earlier one
            self.run.log(scalars(fields), step=step)
            self.state["last_step"] = step
            self._save()

    def close(self) -> None:
        self.run.finish()


# the metrics TensorBoard's HPARAMS tab shows beside the hyperparameters (scalars of the same names)
HPARAM_METRICS = ("eval_loss", "epsilon")


def hparams(cfg: RunConfig) -> dict:
    """The config as TensorBoard hyperparameters: dotted keys, numbers, strings and booleans (lists
    and None as text). dp.noise_seed is left out (it is the root of the DP noise)."""

    def flat(d: dict, prefix: str = ""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    out = {}
    for k, v in flat(cfg.to_dict()):
        if k == "dp.noise_seed":
            continue
        out[k] = v if isinstance(v, (bool, int, float, str)) else json.dumps(v)
    return out


def logs(cfg: RunConfig, step: int) -> bool:
    """Whether round `step` (1-based) goes to the thinned writers and the progress bar: every
    logging.log_every-th round, evaluation rounds and the last round (and, see Writers.flush_stop,
    the round where a run stops)."""
    return (
        step % cfg.logging.log_every == 0
        or step == cfg.fl.rounds
        or bool(cfg.eval_every and step % cfg.eval_every == 0)
    )


OPTIONAL_WRITERS = {"tensorboard": TensorBoardWriter, "wandb": WandbWriter}
# what the writers write in the run folder (the manifest lists it as the tool's)
LOG_FILES = ("metrics.jsonl", "metrics.jsonl.tmp", "metrics.csv", "metrics.csv.tmp", *OPTIONAL_WRITERS)


class Writers:
    """The fan-out the runner calls once per round: every writer of the run, thinned by `logs`."""

    def __init__(self, cfg, out: Path, rows: list[dict], start: int):
        self.cfg = cfg
        self.recording = runfolder.Recording(out, *LOG_FILES)  # recorded in the manifest at close
        self.writers: list[Writer] = [JsonlWriter(), CsvWriter()]
        self.writers += [OPTIONAL_WRITERS[n]() for n in cfg.logging.writers]
        self.pending: tuple[dict, int] | None = None  # the last row not yet given to the thinned writers
        opened = []
        try:
            for w in self.writers:
                w.open(out, cfg, rows, start)
                opened.append(w)
        except BaseException:
            for w in opened:
                w.close()
            raise

    def write(self, row: dict, step: int) -> bool:
        """Write one round's row; returns whether the thinned writers (and so the bar) got it."""
        logged = logs(self.cfg, step)
        for w in self.writers:
            if w.every_round or logged:
                w.write(row, step)
        self.pending = None if logged else (row, step)
        return logged

    def initial(self, row: dict) -> None:
        """The evaluation before the first round (step 0) to the thinned writers (TensorBoard, W&B);
        metrics.jsonl/.csv hold rounds only (summary.json has the round-0 figures)."""
        for w in self.writers:
            if not w.every_round:
                w.write(row, 0)

    def amend(self, row: dict, fields: dict, step: int) -> None:
        """`fields` were added to `row` (round `step`) after it was written: metrics.jsonl/.csv are
        rewritten from the rows at the end of the run; a thinned writer that logged the round gets
        the new fields at the same step (a pending row is written whole by flush_stop)."""
        if self.pending is not None and self.pending[1] == step:
            return
        for w in self.writers:
            if not w.every_round:
                w.amend(fields, step)

    def flush_stop(self) -> dict | None:
        """The run stops here: the last row goes to the thinned writers if it has not; returns it then."""
        if self.pending is None:
            return None
        row, step = self.pending
        self.pending = None
        for w in self.writers:
            if not w.every_round:
                w.write(row, step)
        return row

    def close(self) -> None:
        errors = []
        for w in self.writers:
            try:
                w.close()
            except Exception as e:  # close the others, then raise the first
                errors.append(e)
        self.recording.done()
        if errors:
            raise errors[0]
