"""The run loop (host side): sample clients, assemble round blocks, account privacy, step the
jitted round, evaluate, log, checkpoint, resume, plot and export."""

from __future__ import annotations

import json
import logging
import secrets
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from . import aggregation, artifacts, randomness, reporting, sampling, writers
from .artifacts import load_for_eval  # noqa: F401  (re-exported: the loader of run and adapter folders)
from .checkpoint import Checkpointer
from .config import RunConfig
from .errors import UserError
from .mesh import initialize_distributed, make_mesh, replicate, shard_base
from .models.factory import build_model, build_model_config, build_tokenizer  # noqa: F401  (re-exported)
from .outdir import prepare_out
from .privacy import modes
from .simulation import cosine_lr, effective_base, init_state, make_round

log = logging.getLogger("fedlora_jax")


def _noise_seed(cfg: RunConfig, mechanism, meta: dict) -> int:
    """The secret root of the noise: restored on resume; else dp.noise_seed if the config fixes it;
    else (in a DP mode) fresh OS entropy, kept only in the checkpoints (the server's private state)."""
    if meta.get("noise_seed") is not None:
        return int(meta["noise_seed"])
    if cfg.dp.noise_seed is not None:
        return cfg.dp.noise_seed
    return secrets.randbits(63) if mechanism.private else cfg.seed


def _from_process_0(value: int) -> int:
    """Process 0's 63-bit integer on every process (sent as two 32-bit halves: jax's default
    integers are 32-bit)."""
    from jax.experimental import multihost_utils

    halves = np.array([value >> 32, value & 0xFFFFFFFF], np.uint32)
    hi, lo = (int(x) for x in np.asarray(multihost_utils.broadcast_one_to_all(halves)))
    return (hi << 32) | lo


def _private(folder: Path) -> None:
    """checkpoints/ holds the server's private state (noise seed, participations): owner-only."""
    if folder.exists():
        try:
            folder.chmod(0o700)
        except OSError:  # a file system without modes: the README says not to publish the folder
            pass


def worst_participations(cfg: RunConfig) -> int:
    """The most rounds any client takes part in under the run's seeded sampling schedule."""
    return int(sampling.config_counts(cfg).max())


class _closing:
    """Close the run's writers however the loop ends (a crash or a second Ctrl-C included)."""

    def __init__(self, w):
        self.w = w

    def __enter__(self):
        return self.w

    def __exit__(self, *exc):
        if exc[0] is None:
            self.w.close()
            return False
        try:  # the loop failed: still hand the last row to the thinned writers, close, keep the error
            self.w.flush_stop()
            self.w.close()
        except Exception:
            log.warning("closing the metric writers failed after an error", exc_info=True)
        return False


class _StopOnSignal:
    """SIGINT (Ctrl-C) during the loop: finish the round in progress, then stop cleanly. A second
    Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self._old = None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        import signal

        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


def _secondary(cfg: RunConfig, out: Path, **kw) -> dict:
    """A process other than 0 of a multi-host run: the same loop, its files in a private temporary
    folder (removed at the end), the checkpoints in the shared run folder."""
    import shutil
    import tempfile

    scratch = Path(tempfile.mkdtemp(prefix=f"fedlora_process{jax.process_index()}_"))
    try:
        if kw.get("resume"):  # the run's config, for the resume check
            (scratch / "run").mkdir()
            shutil.copy(out / "config.yaml", scratch / "run" / "config.yaml")
        s = run(cfg, scratch / "run", progress=False, checkpoints_dir=out / "checkpoints", **kw)
        return {
            "process": jax.process_index(),
            "processes": jax.process_count(),
            "run_folder": str(out),
            "rounds": s["rounds"],
            "stop_reason": s["stop_reason"],
        }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    checkpoints_dir: Path | None = None,
) -> dict:
    """Run (or resume) a federated simulation; returns the summary (also written to summary.json).

    In a DP mode, metrics, progress bar and summary carry only what the mechanism's guarantee covers
    (held-out evaluation, privatized aggregates, epsilon/delta); client training metrics only with
    dp.publish_client_metrics, and then under names marked 'unprotected_'."""
    from tqdm.auto import tqdm

    from .data.pipeline import prepare
    from .evaluation import RunEvaluator, heldout_loss, run_eval_examples

    t_start = time.time()
    out = Path(out_dir)
    fl = cfg.fl
    if fl.distributed:  # multi-host: every host runs this same call
        initialize_distributed()
    if cfg.lora.client_ranks is not None and len(cfg.lora.client_ranks) != fl.num_clients:
        raise UserError(f"lora.client_ranks has {len(cfg.lora.client_ranks)} entries for {fl.num_clients} clients")
    aggregation.get(fl.aggregation).check(cfg)
    if resume and (out / "summary.json").exists() and (out / "config.yaml").exists():
        done = json.loads((out / "summary.json").read_text())
        if done.get("stop_reason") == "completed" and done.get("rounds") == fl.rounds:
            prepare_out(cfg, out, resume, overwrite)  # the config must still match
            log.info("run %s already finished (%d rounds); nothing to do", out, fl.rounds)
            return {**done, "already_finished": True}
    if jax.process_index() > 0 and checkpoints_dir is None:
        # process 0 writes the run folder; the others compute with it (their orbax part writes the
        # checkpoints with process 0's, into the shared folder) and write their own files nowhere
        return _secondary(cfg, out, resume=resume, overwrite=overwrite, stop_after=stop_after)
    writers.check(cfg)  # a chosen writer's package is missing: say so before loading anything
    mesh = make_mesh(fl.devices)  # too few devices: say so before loading the model
    definition, base, lora, tokenizer, source = build_model(cfg)
    base = shard_base(base, mesh)  # split over 'model' when the mesh has that axis
    data = prepare(cfg, tokenizer)
    mechanism = modes.build(cfg, lora, [len(p) for p in data.parts])
    ledger = mechanism.ledger
    extra_eval = RunEvaluator(cfg, tokenizer, data.eval)  # bad evaluation data fails before the folder is made
    if progress:  # the operator's console (not with --no-progress); summary.json follows the DP rules
        log.info(reporting.data_line(data.stats))
    if not resume:
        first_ids, first_valid = sampling.for_config(cfg, 0)  # a budget check: every draw costs the same
        if mechanism.budget_exceeded(first_ids[first_valid]):
            raise UserError(
                f"dp.budget = {cfg.dp.budget:g} is below the first round's cost "
                f"(epsilon {mechanism.ledger.worst_after(first_ids[first_valid]):.4g}), so no round "
                f"could run; raise dp.budget or the noise"
            )
    prepare_out(cfg, out, resume, overwrite)
    if jax.process_count() > 1:  # the other processes wait for process 0's run folder
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("fedlora_jax: run folder ready")
    state = replicate(init_state(cfg, lora, fl.num_clients, mechanism), mesh)
    ckpt = Checkpointer(checkpoints_dir or out / "checkpoints")
    start = 0
    metrics_path = out / "metrics.jsonl"
    rows = []
    participations = np.zeros(fl.num_clients, np.int64)
    meta: dict = {}
    if resume and ckpt.latest() is not None:  # (killed before its first checkpoint: nothing was logged)
        state, meta = ckpt.restore(state)
        start = int(meta["round"])
        if ledger is not None:
            ledger.load_state_dict(meta["ledger"])
        participations = np.asarray(
            meta.get("participations") or (meta["ledger"] or {}).get("participations", participations), np.int64
        )
        # rows logged after the checkpoint are dropped (they rerun); the writers rewrite metrics.jsonl/.csv
        # from these before the first new row, so a second kill cannot repeat them
        rows = reporting.read_rows(metrics_path, start)
    noise_seed = _noise_seed(cfg, mechanism, meta)
    if jax.process_count() > 1:  # one secret for the whole multi-host run: process 0's
        noise_seed = _from_process_0(noise_seed)
    # central DP's client draw and DP-SGD's batch draws come from the secret root too (amplification)
    sample_seed = noise_seed if mechanism.sampling_secret else cfg.seed
    batcher = data.batcher(
        fl.local_steps,
        fl.batch_size,
        noise_seed if mechanism.record_level else cfg.seed,
        poisson=mechanism.record_level,
    )
    if ledger is not None:
        ledger.participations = participations  # one array: the ledger's count is the batcher's
    round_fn = make_round(definition, cfg, mechanism, fl.num_clients, donate=True, mesh=mesh)
    ranks_all = np.asarray(cfg.lora.client_ranks or [cfg.lora.r] * fl.num_clients, np.int32)

    def run_eval(st):
        if data.eval is None or len(data.eval) == 0 or "loss" not in cfg.eval_tasks:
            return None
        return heldout_loss(
            definition,
            effective_base(base, st),
            st["lora"],
            data.eval,
            run_eval_examples(cfg, len(data.eval)),
            fl.batch_size,
        )

    if start == 0:
        initial_eval = run_eval(state)
        initial_scores = extra_eval(definition, effective_base(base, state), state["lora"]) if extra_eval.tasks else {}
    else:
        initial_eval, initial_scores = meta.get("initial_eval_loss"), meta.get("initial_scores") or {}
    wall_before = float(meta.get("wall_seconds", 0.0))

    def checkpoint_meta(done):
        return {
            "round": done,
            "ledger": ledger.state_dict() if ledger else None,
            "participations": participations.tolist(),
            "initial_eval_loss": initial_eval,
            "initial_scores": initial_scores,
            "wall_seconds": wall_before + time.time() - t_start,
            "noise_seed": noise_seed,
            "config": cfg.to_dict(),
        }

    if start == 0 and cfg.checkpoint_every:
        # round 0 before any row is logged: a run killed at any later moment has a checkpoint to resume
        ckpt.save(0, state, checkpoint_meta(0))
        _private(out / "checkpoints")

    def publish(row, m, valid):
        """The client-derived values of a round, where (and under the name) the mechanism allows."""
        for field in modes.CLIENT_FIELDS:
            name = mechanism.published_name(field)
            if name is not None:
                row[name] = float(m[field]) if field != "dropped" else int(m[field])
        if mechanism.participation_public:
            row["clients"] = int(valid.sum())
        elif mechanism.published_name("clients") is not None:
            row[mechanism.published_name("clients")] = int(valid.sum())

    stop_reason = "completed"
    if progress and start == 0:
        log.info("compiling the round (the first round includes XLA compilation)")
    out_rows = writers.Writers(cfg, out, rows, start)  # metrics.jsonl/.csv (every round) + logging.writers
    # the bar shows the rows the writers log (logging.log_every, eval rounds, last and stop rounds)
    bar = tqdm(total=fl.rounds, initial=start, disable=not progress, desc="rounds (compiling)", file=sys.stderr)
    bar.set_postfix(reporting.postfix(rows[-1] if rows else {}, rows, initial_eval=initial_eval))
    compiling = True
    with _StopOnSignal() as stop, _closing(out_rows):
        for r in range(start, fl.rounds):
            if stop_after is not None and r >= start + stop_after:
                stop_reason = "stopped"
                break
            if stop.requested:
                stop_reason = "interrupted"
                break
            ids, valid = sampling.for_config(cfg, r, sample_seed)
            if mechanism.budget_exceeded(ids[valid]):
                stop_reason = f"privacy budget {cfg.dp.budget} would be exceeded in round {r + 1}"
                break
            t0 = time.time()
            data_ids = np.where(valid, ids, 0)  # padded Poisson slots (id N) read client 0's data, masked out
            block = batcher.block(data_ids, participations)
            lr = cosine_lr(r, fl.rounds, fl.lr, fl.lr_min)
            state, m = round_fn(
                state,
                base,
                {k: jnp.asarray(v) for k, v in block.items()},
                jnp.asarray(ids, jnp.int32),
                jnp.asarray(ranks_all[data_ids]),
                jnp.asarray(valid),
                randomness.round_keys(noise_seed, r),
                jnp.float32(lr),
            )
            if compiling:  # the first call of the session traced and compiled the round
                compiling = False
                bar.set_description("rounds")
            if ledger is not None:
                ledger.record(ids[valid])  # also counts participations (the same array)
            else:
                np.add.at(participations, ids[valid], 1)
            row = {"round": r + 1, "lr": lr}
            publish(row, m, valid)
            row["eval_loss"] = None
            dropped = int(m["dropped"])
            if dropped and mechanism.publish_client_metrics:
                bad = [
                    int(c) for c, ok, v in zip(ids, np.isfinite(np.asarray(m["client_loss"])), valid) if v and not ok
                ]
                tqdm.write(
                    f"round {r + 1}: {dropped} client update(s) were not finite and were dropped "
                    f"(clients {bad or 'with non-finite factors'})"
                    + (" [outside the DP guarantee]" if mechanism.private else ""),
                    file=sys.stderr,
                )
            row.update({k: float(v) for k, v in m["mechanism"].items()})  # accounted values (e.g. the clip)
            row.update(mechanism.privacy_row(participations))
            if cfg.eval_every and ((r + 1) % cfg.eval_every == 0 or r + 1 == fl.rounds):
                row["eval_loss"] = run_eval(state)
                row.update(extra_eval(definition, effective_base(base, state), state["lora"]))
            if cfg.dp.stats_every and mechanism.private and (r + 1) % cfg.dp.stats_every == 0:
                from .privacy.analysis import round_stats, write_stats_csv

                write_stats_csv(
                    out / "dp_stats.csv",
                    round_stats(
                        state["lora"],
                        mechanism.sigma_a,
                        mechanism.sigma_b,
                        randomness.key(cfg.seed, "noise_stats", r),
                        f"round_{r + 1}_global",
                        samples=cfg.dp.stats_samples,
                    ),
                    append=True,
                )
            row["seconds"] = time.time() - t0
            row = {k: reporting.finite_or_none(v) for k, v in row.items()}
            rows.append(row)
            bar.update(1)
            if out_rows.write(row, row["round"]):
                bar.set_postfix(reporting.postfix(row, rows, initial_eval=initial_eval))
            if cfg.checkpoint_every and ((r + 1) % cfg.checkpoint_every == 0 or r + 1 == fl.rounds):
                ckpt.save(r + 1, state, checkpoint_meta(r + 1))
        stopped_row = out_rows.flush_stop()  # the round where the run stops is always logged
        if stopped_row is not None:
            bar.set_postfix(reporting.postfix(stopped_row, rows, initial_eval=initial_eval))
        bar.close()
        done = rows[-1]["round"] if rows else start
        if done and (ckpt.latest() or 0) < done:  # also keep where an early stop left off
            ckpt.save(done, state, checkpoint_meta(done))
        ckpt.close()
    _private(out / "checkpoints")
    saved = artifacts.save_final(cfg, out, definition, effective_base(base, state), state["lora"], tokenizer, source)
    summary = reporting.write_outputs(
        out,
        rows,
        mechanism,
        participations,
        source=source,
        artifacts=saved,
        initial_eval=initial_eval,
        initial_scores=initial_scores,
        done=done,
        stop_reason=stop_reason,
        wall_seconds=wall_before + time.time() - t_start,
        data_stats=data.stats,
    )
    artifacts.write_model_card(out, cfg, summary)
    return summary
