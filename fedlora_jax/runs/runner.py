"""The run loop (host side): sample -> block -> round -> ledger -> evaluate -> log -> checkpoint.
Its parts live in their own modules: the model (models.factory), the data (data.pipeline), the DP
mechanism (privacy.modes), the round (simulation), what a row may publish (publish), restarts
(resume), the end of the loop (loop_control), the outputs (reporting, artifacts)."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ..config.run_config import RunConfig
from ..core import numerics, randomness
from ..core.errors import UserError
from ..core.numerics import all_finite
from ..federated import aggregation, sampling
from ..federated.mesh import from_process_0, initialize_distributed, make_mesh, replicate, shard_base, sync
from ..federated.server import cosine_lr
from ..federated.simulation import Cohort, build_round, effective_base, init_state
from ..models.factory import build_model, build_model_config, build_tokenizer  # noqa: F401  (re-exported)
from ..privacy import mechanisms as modes
from . import artifacts, publish, reading, reporting, runfolder, writers
from . import resume as resume_lib
from .artifacts import load_for_eval  # noqa: F401  (re-exported: the loader of run and adapter folders)
from .checkpoint import Checkpointer
from .loop_control import StopOnSignal, closing
from .outdir import prepare_out

log = logging.getLogger("fedlora_jax")


def worst_participations(cfg: RunConfig) -> int:
    """The most rounds any client takes part in under the run's seeded sampling schedule."""
    return int(sampling.config_counts(cfg).max())


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

    from ..data.pipeline import prepare

    out, fl = Path(out_dir), cfg.fl
    if fl.distributed:  # multi-host: every host runs this same call
        initialize_distributed()
    _check(cfg)
    if resume and _finished(cfg, out):
        prepare_out(cfg, out, resume, overwrite)  # the config must still match
        log.info("run %s already finished (%d rounds); nothing to do", out, fl.rounds)
        return {**reading.read_json(out / "summary.json"), "already_finished": True}
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
    numerics.check_mechanism_finite(cfg, mechanism)  # an infinite noise or epsilon: refused before training
    ledger = mechanism.ledger
    evaluate = _evaluator(cfg, definition, base, data, tokenizer)  # bad evaluation data fails here
    if progress:  # the operator's console (not with --no-progress): under DP the clients' counts only on request
        log.info(reporting.data_line(data.stats, mechanism))
    if not resume:
        _check_budget(cfg, mechanism)
    prepare_out(cfg, out, resume, overwrite)
    sync("fedlora_jax: run folder ready")  # the other processes wait for process 0's run folder
    ckpt = Checkpointer(checkpoints_dir or out / "checkpoints")
    state = replicate(init_state(cfg, lora, fl.num_clients, mechanism), mesh)
    state, prog = resume_lib.restore(ckpt, state, ledger, out / "metrics.jsonl", fl.num_clients, resume)
    resume_lib.drop_stop_evaluations(cfg, prog.rows)  # the run goes on: a stop's final evaluation is superseded
    seed = from_process_0(resume_lib.noise_seed(cfg, mechanism, prog.meta))  # one secret for all hosts
    # central DP's client draw and DP-SGD's batch draws come from the secret root too (amplification)
    sample_seed = seed if mechanism.sampling_secret else cfg.seed
    batcher = data.batcher(
        fl.local_steps,
        fl.batch_size,
        seed if mechanism.record_level else cfg.seed,
        poisson=mechanism.record_level,
        tail=mechanism.batch_tail,
    )
    if ledger is not None:
        ledger.participations = prog.participations  # one array: the ledger's count is the batcher's
    round_fn = build_round(definition, cfg, mechanism, fl.num_clients, donate=True, mesh=mesh)
    ranks_all = np.asarray(cfg.lora.client_ranks or [cfg.lora.r] * fl.num_clients, np.int32)
    initial = evaluate(state) if prog.start == 0 else {
        "loss": prog.meta.get("initial_eval_loss"), "scores": prog.meta.get("initial_scores") or {}
    }  # fmt: skip
    meta = lambda done: resume_lib.checkpoint_meta(cfg, done, prog, ledger, seed, initial)
    if prog.start == 0 and cfg.checkpoint_every:
        # round 0 before any row is logged: a run killed at any later moment has a checkpoint to resume
        ckpt.save(0, state, meta(0))
        resume_lib.private(out / "checkpoints")
    stop_reason, rows = "completed", prog.rows
    if progress and prog.start == 0:
        log.info("compiling the round (the first round includes XLA compilation)")
    out_rows = writers.Writers(cfg, out, rows, prog.start)  # metrics.jsonl/.csv + logging.writers
    if prog.start == 0 and evaluate.active:  # TensorBoard / W&B: the evaluation before training at step 0
        out_rows.initial({"round": 0, "eval_loss": initial["loss"], **initial["scores"]})
    # the bar shows the rows the writers log (logging.log_every, eval rounds, last and stop rounds)
    desc = "rounds (compiling)"
    bar = tqdm(total=fl.rounds, initial=prog.start, disable=not progress, desc=desc, file=sys.stderr)
    bar.set_postfix(reporting.postfix(rows[-1] if rows else {}, rows, initial_eval=initial["loss"]))
    with StopOnSignal() as stop, closing(out_rows):
        for r in range(prog.start, fl.rounds):
            if stop_after is not None and r >= prog.start + stop_after:
                stop_reason = "stopped"
                break
            if stop.requested:
                stop_reason = "interrupted"
                break
            ids, valid = sampling.for_config(cfg, r, sample_seed, mechanism.cohort_tail)
            if mechanism.budget_exceeded(ids[valid]):
                stop_reason = f"privacy budget {cfg.dp.budget} would be exceeded in round {r + 1}"
                break
            t0 = time.time()
            data_ids = np.where(valid, ids, 0)  # padded Poisson slots (id N) read client 0's data, masked out
            came = sampling.reports_for(cfg, ids, valid, r, sample_seed, mechanism.client_sizes)  # dropout
            cohort = Cohort.of(batcher.block(data_ids, prog.participations), ids, ranks_all[data_ids], came)
            lr = cosine_lr(r, fl.rounds, fl.lr, fl.lr_min)
            before = jax.tree.map(jnp.copy, state)  # the round donates its input state (adapter-sized)
            state, m = round_fn(state, base, cohort, randomness.round_keys(seed, r), jnp.float32(lr))
            bar.set_description("rounds")  # the first call of the session traced and compiled the round
            # the round is charged before anything of it is looked at: a divergence stop publishes that
            # this round's release was non-finite, so the ledger must cover the round that triggered it
            if ledger is not None:
                ledger.record(ids[valid])  # also counts participations (the same array)
            else:
                np.add.at(prog.participations, ids[valid], 1)
            if not _finite(state):  # its adapter and metrics are not published; keep the last finite state
                state, stop_reason = before, f"diverged: the server state became non-finite in round {r + 1}"
                log.warning("run stopped: %s; the adapter after round %d is kept and exported", stop_reason, r)
                break
            row = publish.round_row(r, lr, m, ids, came, mechanism, prog.participations)
            if cfg.eval_every and ((r + 1) % cfg.eval_every == 0 or r + 1 == fl.rounds):
                ev = evaluate(state)
                row.update({"eval_loss": ev["loss"], **ev["scores"]})
            if cfg.dp.stats_every and mechanism.private and (r + 1) % cfg.dp.stats_every == 0:
                publish.write_dp_stats(cfg, out, mechanism, state.lora, r)
            row["seconds"] = time.time() - t0
            row = {k: reporting.finite_or_none(v) for k, v in row.items()}
            rows.append(row)
            bar.update(1)
            if out_rows.write(row, row["round"]):
                bar.set_postfix(reporting.postfix(row, rows, initial_eval=initial["loss"]))
            if cfg.checkpoint_every and ((r + 1) % cfg.checkpoint_every == 0 or r + 1 == fl.rounds):
                ckpt.save(r + 1, state, meta(r + 1))
        # "after" is the adapter that is exported, whatever stopped the loop: evaluated here unless
        # its round already was (an evaluation round); the row of that round gets the figures
        final = _final_eval(evaluate, state, rows, initial, out_rows)
        stopped_row = out_rows.flush_stop()  # the round where the run stops is always logged
        if stopped_row is not None:
            bar.set_postfix(reporting.postfix(stopped_row, rows, initial_eval=initial["loss"]))
        bar.close()
        done = rows[-1]["round"] if rows else prog.start
        if done and (ckpt.latest() or 0) < done:  # also keep where an early stop left off
            ckpt.save(done, state, meta(done))
        ckpt.close()
    resume_lib.private(out / "checkpoints")
    final_files = runfolder.Recording(out, *runfolder.FINAL_OUTPUTS)  # the manifest lists what follows
    saved = artifacts.save_final(cfg, out, definition, effective_base(base, state), state.lora, tokenizer, source)
    summary = reporting.write_outputs(
        out,
        rows,
        mechanism,
        prog.participations,
        source=source,
        artifacts=saved,
        initial_eval=initial["loss"],
        initial_scores=initial["scores"],
        final_eval=final,
        done=done,
        stop_reason=stop_reason,
        wall_seconds=prog.wall_seconds(),
        data_stats=data.stats,
    )
    artifacts.write_model_card(out, cfg, summary)
    final_files.done()
    return summary


def _check(cfg: RunConfig) -> None:
    """Cross-part checks of a config that the round's parts make (before anything loads)."""
    if cfg.lora.client_ranks is not None and len(cfg.lora.client_ranks) != cfg.fl.num_clients:
        raise UserError(f"lora.client_ranks has {len(cfg.lora.client_ranks)} entries for {cfg.fl.num_clients} clients")
    aggregation.get(cfg.fl.aggregation).check(cfg)


def _finished(cfg: RunConfig, out: Path) -> bool:
    """The run folder holds a completed run of all cfg.fl.rounds rounds."""
    if not ((out / "summary.json").exists() and (out / "config.yaml").exists()):
        return False
    done = reading.read_json(out / "summary.json")
    return done.get("stop_reason") == "completed" and done.get("rounds") == cfg.fl.rounds


_all_finite = jax.jit(all_finite)  # one small program (per state structure), not an op per leaf each round


def _finite(state) -> bool:
    """Every float of the server state (adapter, optimizer, mechanism state such as the adaptive clip) is finite."""
    leaves = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
    return bool(_all_finite(leaves)) if leaves else True


def _check_budget(cfg: RunConfig, mechanism) -> None:
    """dp.budget below one round's cost: no round could run (every draw costs the same)."""
    first_ids, first_valid = sampling.for_config(cfg, 0, tail=mechanism.cohort_tail)
    if mechanism.budget_exceeded(first_ids[first_valid]):
        raise UserError(
            f"dp.budget = {cfg.dp.budget:g} is below the first round's cost "
            f"(epsilon {mechanism.ledger.worst_after(first_ids[first_valid]):.4g}), so no round "
            f"could run; raise dp.budget or the noise"
        )


def _evaluator(cfg: RunConfig, definition, base, data, tokenizer):
    """state -> {'loss': held-out loss or None, 'scores': the other figures of the metrics row: the
    loss's n and tokens, the other eval_tasks' scores with their n and 95% interval}. The loss covers
    every held-out example up to `eval_examples`, in batches of `eval_batch_size`."""
    from ..evaluation import RunEvaluator, heldout_eval, run_eval_examples

    extra = RunEvaluator(cfg, tokenizer, data.eval)
    has_loss = data.eval is not None and len(data.eval) > 0 and "loss" in cfg.eval_tasks
    n = run_eval_examples(cfg, len(data.eval)) if has_loss else 0

    def evaluate(state) -> dict:
        eff = effective_base(base, state)
        scores = extra(definition, eff, state.lora) if extra.tasks else {}
        if not has_loss:
            return {"loss": None, "scores": scores}
        r = heldout_eval(definition, eff, state.lora, data.eval, n, cfg.eval_batch_size)
        return {"loss": r["loss"], "scores": {"eval_loss_n": r["n"], "eval_loss_tokens": r["tokens"], **scores}}

    evaluate.active = has_loss or bool(extra.tasks)
    return evaluate


def _final_eval(evaluate, state, rows: list[dict], initial: dict, out_rows) -> dict:
    """The evaluation of the adapter the run exports (`state`, the last finite one): the last row's
    when that round was an evaluation round, else evaluated now and added to that row (and to the
    writers that have logged it). No round ran: the initial evaluation."""
    if not rows:
        return initial
    row = rows[-1]
    if not evaluate.active:
        return {"loss": None, "scores": {}}
    if any(k.startswith("eval_") and v is not None for k, v in row.items()):  # an evaluation round
        scores = {k: v for k, v in row.items() if k.startswith("eval_") and k != "eval_loss"}
        return {"loss": row.get("eval_loss"), "scores": scores}
    ev = evaluate(state)
    fields = {k: reporting.finite_or_none(v) for k, v in {"eval_loss": ev["loss"], **ev["scores"]}.items()}
    row.update(fields)
    out_rows.amend(row, fields, row["round"])
    return ev


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
            if (out / runfolder.MANIFEST).is_file():  # --resume needs the run's manifest too
                shutil.copy(out / runfolder.MANIFEST, scratch / "run" / runfolder.MANIFEST)
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
