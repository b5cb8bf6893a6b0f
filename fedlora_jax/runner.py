"""The run loop (host side): sample clients, assemble round blocks, account privacy, step the
jitted round, evaluate, log, checkpoint, resume, plot and export."""

from __future__ import annotations

from .errors import UserError
import csv
import json
import logging
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from . import lora as lora_lib
from .checkpoint import Checkpointer
from .outdir import prepare_out
from .config import RunConfig, load_config
from .models import LoRAConfig, ModelConfig, init_model, mean_nll
from . import randomness, sampling
from .privacy import modes
from .simulation import cosine_lr, effective_base, init_state, make_round

log = logging.getLogger("fedlora_jax")


def build_model_config(cfg: RunConfig) -> ModelConfig:
    """The ModelConfig a run would load, without loading weights (tiny: from the config; else
    from config.json or the GGUF metadata)."""
    m = cfg.model
    if m.source == "tiny":
        return ModelConfig("llama", vocab_size=m.vocab_size, hidden_size=m.hidden_size, num_layers=m.num_layers,
                           num_heads=m.num_heads, num_kv_heads=m.num_kv_heads, intermediate_size=m.intermediate_size,
                           max_position_embeddings=4096, dtype=m.dtype)
    from .models.hub import folder_config, resolve
    path = resolve(m.source)
    if path.is_file():
        from .models.hub import read_gguf  # dequantizes to read the shapes: a few seconds
        return read_gguf(path, m.dtype)[0]
    return folder_config(path, m.dtype)


def build_tokenizer(cfg: RunConfig):
    """The tokenizer a run would use, without loading weights."""
    if cfg.model.source == "tiny":
        from .data.pipeline import byte_tokenizer
        return byte_tokenizer()
    from .models.hub import load_tokenizer, resolve
    tok = load_tokenizer(resolve(cfg.model.source))
    if tok is None:
        raise UserError(f"model {cfg.model.source!r} has no tokenizer files")
    return tok


def build_model(cfg: RunConfig):
    """(definition, base, lora, tokenizer, source description) for the config's model."""
    lc = LoRAConfig(r=cfg.lora.r, alpha=cfg.lora.alpha, target_modules=cfg.lora.target_modules,
                    use_rslora=cfg.lora.use_rslora)
    m = cfg.model
    if m.source == "tiny":
        mc = build_model_config(cfg)
        definition, base, lora = init_model(mc, lc, seed=cfg.seed)
        # a frozen random head with HF's std 0.02 caps logits near uniform (|E x| ~ 0.02 sqrt(d) ~ 0.2),
        # so LoRA could hardly learn; std 0.25 lets the adapters express peaked predictions
        base = {**base, "lm_head": {"kernel": base["lm_head"]["kernel"] * 12.5}}
        base = jax.tree.map(lambda x: x.astype(jnp.dtype(mc.dtype)), base)  # bfloat16 base weights if asked
        tok = build_tokenizer(cfg)
        if len(tok) > mc.vocab_size:
            raise UserError(f"model.vocab_size {mc.vocab_size} is smaller than the byte tokenizer's {len(tok)}")
        return definition, base, lora, tok, "tiny random Llama"
    from .models.hub import load_model
    lm = load_model(m.source, lc, dtype=m.dtype, seed=cfg.seed)
    if lm.tokenizer is None:
        raise UserError(f"model {m.source!r} has no tokenizer files")
    return lm.definition, lm.base, lm.lora, lm.tokenizer, lm.source


def worst_participations(cfg: RunConfig) -> int:
    """The most rounds any client takes part in under the run's seeded sampling schedule."""
    return int(sampling.config_counts(cfg).max())


def client_mesh(devices: int):
    """A 1-D mesh with a 'clients' axis over the first `devices` devices (None for one device).
    Multi-host: call jax.distributed.initialize() first; jax.devices() then lists every host's."""
    if devices <= 1:
        return None
    available = jax.devices()
    if devices > len(available):
        raise UserError(f"fl.devices = {devices} but only {len(available)} device(s) are visible: {available}")
    return jax.sharding.Mesh(np.array(available[:devices]), ("clients",))


def _eval_fn(definition):
    @jax.jit
    def f(base, lora, tokens, attn, loss_mask):
        return jax.vmap(lambda t, a, m: mean_nll(definition, base, lora, t, a, m))(tokens, attn, loss_mask)
    return f


def eval_batches(data, batch_size: int, max_batches: int):
    """Fixed evaluation batches [n, batch, seq] from held-out data (padded by repetition)."""
    if data is None or len(data) == 0:
        return None
    n = min(max_batches, math.ceil(len(data) / batch_size))
    idx = np.arange(n * batch_size) % len(data)
    shape = (n, batch_size, -1)
    return tuple(jnp.asarray(x[idx].reshape(shape)) for x in (data.tokens, data.attention_mask, data.loss_mask))


def _plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = [x["round"] for x in rows]
    scores = [k for k in ("eval_exact_match", "eval_mc_accuracy") if any(x.get(k) is not None for x in rows)]
    fig, axes = plt.subplots(1, 3 if scores else 2, figsize=(15 if scores else 10, 4))
    for k in scores:
        pts = [(x["round"], x[k]) for x in rows if x.get(k) is not None]
        axes[2].plot(*zip(*pts), "o-", label=k.replace("eval_", "").replace("_", " "))
    if scores:
        axes[2].set_xlabel("round")
        axes[2].set_ylabel("score")
        axes[2].set_ylim(0, 1)
        axes[2].legend()
    for name, label in (("loss", "train loss (clients)"),
                        ("unprotected_loss", "train loss (clients; outside the DP guarantee)")):
        pts = [(x["round"], x[name]) for x in rows if x.get(name) is not None]
        if pts:
            axes[0].plot(*zip(*pts), label=label)
    ev = [(x["round"], x["eval_loss"]) for x in rows if x.get("eval_loss") is not None]
    if ev:
        axes[0].plot(*zip(*ev), "o-", label="eval loss")
    axes[0].set_xlabel("round")
    axes[0].set_ylabel("loss (nats/token)")
    if axes[0].get_lines():
        axes[0].legend()
    if rows and rows[0].get("epsilon") is not None:
        axes[1].plot(r, [x["epsilon"] for x in rows], label="honest epsilon (worst client)")
        if rows[0].get("epsilon_paper_tracker") is not None:
            axes[1].plot(r, [x["epsilon_paper_tracker"] for x in rows], "--", label="paper convention (not a bound)")
        axes[1].set_yscale("log")
        axes[1].legend()
    else:
        axes[1].text(0.5, 0.5, "no DP", ha="center")
    axes[1].set_xlabel("round")
    axes[1].set_ylabel("epsilon")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _finite_or_none(x):
    """Strict JSON: NaN and infinities become null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _read_rows(path: Path, upto: int) -> list[dict]:
    """Metrics rows of rounds <= upto. A truncated last line (a crash mid-write) is skipped."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # the round that was being written when the run stopped; it reruns
            raise UserError(f"{path}: line {i + 1} is not JSON; the run folder is damaged (resume needs its "
                            f"metrics up to the last checkpoint)") from None
    return [r for r in rows if r.get("round", 0) <= upto]


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


def run(cfg: RunConfig, out_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
        progress: bool = True, stop_after: int | None = None) -> dict:
    """Run (or resume) a federated simulation; returns the summary (also written to summary.json).

    In a DP mode, metrics, progress bar and summary carry only what the mechanism's guarantee covers
    (held-out evaluation, privatized aggregates, epsilon/delta); client training metrics only with
    dp.publish_client_metrics, and then under names marked 'unprotected_'."""
    from tqdm.auto import tqdm

    from .data.pipeline import prepare
    from .evaluation import RunEvaluator

    t_start = time.time()
    out = Path(out_dir)
    fl = cfg.fl
    if cfg.lora.client_ranks is not None:
        if len(cfg.lora.client_ranks) != fl.num_clients:
            raise UserError(f"lora.client_ranks has {len(cfg.lora.client_ranks)} entries for {fl.num_clients} clients")
        if fl.aggregation == "mean" and len(set(cfg.lora.client_ranks)) > 1:
            raise UserError("mixed client ranks need fl.aggregation stack (averaging A and B of different ranks "
                            "is not defined)")
    if fl.aggregation == "stack" and fl.algorithm not in ("fedavg", "fedprox"):
        raise UserError(f"fl.aggregation stack merges into the base each round; it runs with fedavg or fedprox, "
                        f"not {fl.algorithm}")
    if resume and (out / "summary.json").exists() and (out / "config.yaml").exists():
        done = json.loads((out / "summary.json").read_text())
        if done.get("stop_reason") == "completed" and done.get("rounds") == fl.rounds:
            prepare_out(cfg, out, resume, overwrite)  # the config must still match
            log.info("run %s already finished (%d rounds); nothing to do", out, fl.rounds)
            return {**done, "already_finished": True}
    definition, base, lora, tokenizer, source = build_model(cfg)
    data = prepare(cfg, tokenizer)
    mechanism = modes.build(cfg, lora, [len(p) for p in data.parts])
    ledger = mechanism.ledger
    extra_eval = RunEvaluator(cfg, tokenizer, data.eval)  # bad evaluation data fails before the folder is made
    if not resume:
        first_ids, first_valid = sampling.for_config(cfg, 0)
        if mechanism.budget_exceeded(first_ids[first_valid]):
            raise UserError(f"dp.budget = {cfg.dp.budget:g} is below the first round's cost "
                            f"(epsilon {mechanism.ledger.worst_after(first_ids[first_valid]):.4g}), so no round "
                            f"could run; raise dp.budget or the noise")
    prepare_out(cfg, out, resume, overwrite)
    batcher = data.batcher(fl.local_steps, fl.batch_size, cfg.seed, poisson=mechanism.record_level)
    state = init_state(cfg, lora, fl.num_clients)
    ckpt = Checkpointer(out / "checkpoints")
    start = 0
    metrics_path = out / "metrics.jsonl"
    rows = []
    participations = np.zeros(fl.num_clients, np.int64)
    meta: dict = {}
    if resume:
        state, meta = ckpt.restore(state)
        start = int(meta["round"])
        if ledger is not None:
            ledger.load_state_dict(meta["ledger"])
        participations = np.asarray(meta.get("participations") or
                                    (meta["ledger"] or {}).get("participations", participations), np.int64)
        rows = _read_rows(metrics_path, start)  # rows logged after the checkpoint are dropped: they rerun
    if ledger is not None:
        ledger.participations = participations  # one array: the ledger's count is the batcher's
    round_fn = make_round(definition, cfg, mechanism, fl.num_clients, donate=True, mesh=client_mesh(fl.devices))
    evaluate = _eval_fn(definition)
    ev = eval_batches(data.eval, fl.batch_size, cfg.eval_batches)
    ranks_all = np.asarray(cfg.lora.client_ranks or [cfg.lora.r] * fl.num_clients, np.int32)

    def run_eval(st):
        if ev is None or "loss" not in cfg.eval_tasks:
            return None
        return float(jnp.mean(evaluate(effective_base(base, st), st["lora"], *ev)))

    if start == 0:
        initial_eval = run_eval(state)
        initial_scores = extra_eval(definition, effective_base(base, state), state["lora"]) if extra_eval.tasks else {}
    else:
        initial_eval, initial_scores = meta.get("initial_eval_loss"), meta.get("initial_scores") or {}
    wall_before = float(meta.get("wall_seconds", 0.0))

    def checkpoint_meta(done):
        return {"round": done, "ledger": ledger.state_dict() if ledger else None,
                "participations": participations.tolist(), "initial_eval_loss": initial_eval,
                "initial_scores": initial_scores, "wall_seconds": wall_before + time.time() - t_start,
                "config": cfg.to_dict()}

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
    bar = tqdm(total=fl.rounds, initial=start, disable=not progress, desc="rounds", file=sys.stderr)
    with _StopOnSignal() as stop:
        for r in range(start, fl.rounds):
            if stop_after is not None and r >= start + stop_after:
                stop_reason = "stopped"
                break
            if stop.requested:
                stop_reason = "interrupted"
                break
            ids, valid = sampling.for_config(cfg, r)
            if mechanism.budget_exceeded(ids[valid]):
                stop_reason = f"privacy budget {cfg.dp.budget} would be exceeded in round {r + 1}"
                break
            t0 = time.time()
            block = batcher.block(ids, participations)
            lr = cosine_lr(r, fl.rounds, fl.lr, fl.lr_min)
            state, m = round_fn(state, base, {k: jnp.asarray(v) for k, v in block.items()},
                                jnp.asarray(ids, jnp.int32), jnp.asarray(ranks_all[ids]), jnp.asarray(valid),
                                randomness.round_keys(cfg.seed, r), jnp.float32(lr))
            if ledger is not None:
                ledger.record(ids[valid])  # also counts participations (the same array)
            else:
                np.add.at(participations, ids[valid], 1)
            row = {"round": r + 1, "lr": lr}
            publish(row, m, valid)
            row["eval_loss"] = None
            dropped = int(m["dropped"])
            if dropped and mechanism.publish_client_metrics:
                bad = [int(c) for c, ok, v in zip(ids, np.isfinite(np.asarray(m["client_loss"])), valid) if v and not ok]
                tqdm.write(f"round {r + 1}: {dropped} client update(s) were not finite and were dropped "
                           f"(clients {bad or 'with non-finite factors'})"
                           + (" [outside the DP guarantee]" if mechanism.private else ""), file=sys.stderr)
            row.update(mechanism.privacy_row(participations))
            if cfg.eval_every and ((r + 1) % cfg.eval_every == 0 or r + 1 == fl.rounds):
                row["eval_loss"] = run_eval(state)
                row.update(extra_eval(definition, effective_base(base, state), state["lora"]))
            if cfg.dp.stats_every and mechanism.private and (r + 1) % cfg.dp.stats_every == 0:
                from .privacy.analysis import round_stats, write_stats_csv
                write_stats_csv(out / "dp_stats.csv",
                                round_stats(state["lora"], mechanism.sigma_a, mechanism.sigma_b,
                                            randomness.key(cfg.seed, "noise_stats", r), f"round_{r + 1}_global",
                                            samples=cfg.dp.stats_samples), append=True)
            row["seconds"] = time.time() - t0
            row = {k: _finite_or_none(v) for k, v in row.items()}
            rows.append(row)
            with metrics_path.open("a") as f:
                f.write(json.dumps(row, allow_nan=False) + "\n")
            bar.update(1)
            bar.set_postfix(_postfix(row, rows))
            if cfg.checkpoint_every and ((r + 1) % cfg.checkpoint_every == 0 or r + 1 == fl.rounds):
                ckpt.save(r + 1, state, checkpoint_meta(r + 1))
        bar.close()
        done = rows[-1]["round"] if rows else start
        if done and (ckpt.latest() or 0) < done:  # also keep where an early stop left off
            ckpt.save(done, state, checkpoint_meta(done))
        ckpt.close()
    summary = _write_outputs(cfg, out, rows, state, base, definition, tokenizer, source, mechanism,
                             participations, initial_eval, initial_scores, done, stop_reason,
                             wall_before + time.time() - t_start)
    return summary


def _postfix(row: dict, rows: list[dict]) -> dict:
    """The progress bar shows the latest held-out loss, epsilon and (marked) client loss."""
    out = {}
    last_eval = next((x["eval_loss"] for x in reversed(rows) if x.get("eval_loss") is not None), None)
    if last_eval is not None:
        out["eval"] = f"{last_eval:.3f}"
    if row.get("epsilon") is not None:
        out["eps"] = f"{row['epsilon']:.3g}"
    for name in ("loss", modes.UNPROTECTED_PREFIX + "loss"):
        if row.get(name) is not None:
            out["train" if name == "loss" else "train(unprotected)"] = f"{row[name]:.3f}"
    return out


def _write_outputs(cfg, out, rows, state, base, definition, tokenizer, source, mechanism, participations,
                   initial_eval, initial_scores, done, stop_reason, wall_seconds) -> dict:
    """metrics.jsonl/.csv, metrics.png, the adapter or merged model, summary.json."""
    metrics_path, csv_path = out / "metrics.jsonl", out / "metrics.csv"
    # rewrite the metrics (a resume may have dropped rows logged after its checkpoint)
    metrics_path.write_text("".join(json.dumps(x, allow_nan=False) + "\n" for x in rows))
    fields = list(dict.fromkeys(k for x in rows for k in x)) or ["round"]
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    if rows:
        _plot(rows, out / "metrics.png")
    outputs = {"metrics_jsonl": str(metrics_path), "metrics_csv": str(csv_path), "plot": str(out / "metrics.png"),
               "checkpoints": str(out / "checkpoints"), "config": str(out / "config.yaml")}
    if cfg.fl.aggregation == "stack":
        from .models.hub import LoadedModel, save_merged
        final_base = effective_base(base, state)
        save_merged(out / "merged_model", LoadedModel(definition, base, {}, tokenizer, {}, source), final_base)
        outputs["merged_model"] = str(out / "merged_model")
    else:
        lora_lib.save_peft(out / "adapter", definition, state["lora"], None if cfg.model.source == "tiny" else source)
        outputs["adapter"] = str(out / "adapter")
    last = lambda k: next((x[k] for x in reversed(rows) if x.get(k) is not None), None)
    summary = {"rounds": done, "stop_reason": stop_reason, "initial_eval_loss": initial_eval,
               "final_eval_loss": last("eval_loss"), "model": source, "initial_scores": initial_scores,
               "final_scores": {k: last(k) for k in ("eval_exact_match", "eval_mc_accuracy", "eval_mc_accuracy_norm")
                                if any(x.get(k) is not None for x in rows)}}
    train_name = mechanism.published_name("loss")
    if train_name is not None:
        summary[("final_train_loss" if train_name == "loss" else modes.UNPROTECTED_PREFIX + "final_train_loss")] = \
            last(train_name)
    summary["privacy"] = mechanism.summary(participations, rows[-1] if rows else None)
    summary.update(wall_seconds=wall_seconds, outputs=outputs)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False))
    return summary


def load_for_eval(target: str, model: str | None = None):
    """(definition, base, lora, tokenizer, run config or None) for a run folder (its final
    adapter, or its merged model for stacking) or a PEFT adapter folder (with --model, or the
    adapter's base_model_name_or_path)."""
    from .models import abstract_model
    from .models.hub import load_model

    t = Path(target)
    if (t / "config.yaml").exists():
        cfg = load_config(str(t / "config.yaml"))
        if (t / "merged_model").exists():
            lm = load_model(str(t / "merged_model"))
            return lm.definition, lm.base, {}, lm.tokenizer, cfg
        definition, base, _, tok, _ = build_model(cfg)
        if not (t / "adapter").exists():
            raise UserError(f"run folder {target!r} has no adapter/ (did the run finish?)")
        lc = lora_lib.read_peft_config(t / "adapter")
        definition = abstract_model(definition.config, lc)[0]
        return definition, base, lora_lib.load_peft(t / "adapter", definition), tok, cfg
    if (t / lora_lib.ADAPTER_CONFIG).exists():
        lc = lora_lib.read_peft_config(t)
        src = model or json.loads((t / lora_lib.ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
        if not src:
            raise UserError(f"adapter {target!r} does not name its base model; pass --model")
        lm = load_model(src, dtype="float32")
        try:
            lc.check(lm.config)
            definition = abstract_model(lm.config, lc)[0]
            lora = lora_lib.load_peft(t, definition)
        except ValueError as e:
            raise UserError(f"adapter {target!r} does not match model {src!r}: {e}") from e
        return definition, lm.base, lora, lm.tokenizer, None
    raise UserError(f"{target!r} is neither a run folder (config.yaml) nor a PEFT adapter folder (adapter_config.json)")
