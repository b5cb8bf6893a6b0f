"""The run loop (host side): sample clients, assemble round blocks, account privacy, step the
jitted round, evaluate, log, checkpoint, resume, plot and export."""

from __future__ import annotations

from .errors import UserError
import csv
import json
import math
import shutil
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from . import lora as lora_lib
from .checkpoint import Checkpointer
from .outdir import prepare_out
from .config import RunConfig, config_diff, load_config
from .models import LoRAConfig, ModelConfig, init_model, mean_nll
from .privacy import accounting as acc
from .privacy import mechanisms as mech
from .simulation import NoiseSpec, cosine_lr, effective_base, init_state, make_round

METRIC_FIELDS = ["round", "lr", "loss", "first_loss", "update_norm", "dropped", "clients", "eval_loss",
                 "eval_exact_match", "eval_mc_accuracy", "eval_mc_accuracy_norm",
                 "epsilon", "delta", "epsilon_mean", "epsilon_rdp", "epsilon_paper", "epsilon_paper_tracker", "seconds"]


def build_model_config(cfg: RunConfig) -> ModelConfig:
    """The ModelConfig a run would load, without loading weights (tiny: from the config; else
    from config.json or the GGUF metadata)."""
    m = cfg.model
    if m.source == "tiny":
        return ModelConfig("llama", vocab_size=m.vocab_size, hidden_size=m.hidden_size, num_layers=m.num_layers,
                           num_heads=m.num_heads, num_kv_heads=m.num_kv_heads, intermediate_size=m.intermediate_size,
                           max_position_embeddings=4096, dtype=m.dtype)
    from .models.hub import config_from_hf, resolve
    path = resolve(m.source)
    if path.is_file():
        from .models.hub import read_gguf  # dequantizes to read the shapes: a few seconds
        return read_gguf(path, m.dtype)[0]
    return config_from_hf(json.loads((path / "config.json").read_text()), m.dtype)


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


def _resolve_dpsgd(cfg: RunConfig, client_sizes) -> tuple[NoiseSpec, acc.Ledger, dict]:
    """Record-level DP-SGD: Poisson batches at rate q_c = min(1, B / n_c) per client (accounted at
    the largest rate), per-example clip dp.clip_a, N(0, (z C)^2) on each step's clipped sum."""
    from .data.batches import poisson_capacity

    dp, fl = cfg.dp, cfg.fl
    if client_sizes is None:
        raise UserError("dp.mode dpsgd needs the clients' dataset sizes")
    sizes = sorted({int(n) for n in client_sizes})
    q = min(1.0, fl.batch_size / sizes[0])
    capacity, overflow = poisson_capacity(sizes, fl.batch_size)
    planned = worst_participations(cfg)
    if dp.noise == "multiplier":
        z = dp.noise_multiplier
    elif dp.noise == "calibrate":
        z = acc.sampled_multiplier_for(dp.epsilon, q, fl.local_steps * planned, dp.delta, "add-remove")
    else:
        raise UserError(f"dp.noise = {dp.noise!r} is not defined for dp.mode dpsgd; choose calibrate or multiplier")
    sigma = z * dp.clip_a
    ledger = acc.Ledger("dpsgd", fl.num_clients, z, dp.delta, "add-remove", sampling_rate=q,
                        local_steps=fl.local_steps)
    info = {"noise_multiplier": z, "effective_noise_multiplier": z, "sigma_a": sigma, "sigma_b": sigma,
            "clipped_blocks": [0, 0], "neighbouring": "add-remove", "delta": dp.delta,
            "batch_sampling_rate": q, "batch_capacity": capacity, "overflow_probability": overflow,
            "mechanism": (f"dpsgd (record level): Poisson-sampled Gaussian per local step, rate q={q:.4g} "
                          f"(largest client rate), per-example clip {dp.clip_a:g}, sigma {sigma:.4g} on the "
                          f"clipped sum, add-remove, {fl.local_steps} steps per participation, PLD; batches padded "
                          f"to {capacity} (overflow probability {overflow:.2g} per step, added to delta)")}
    return NoiseSpec("dpsgd", sigma, sigma, z, z, (0, 0)), ledger, info


def truncation_delta(info: dict, epsilon: float, steps: int) -> float:
    """The delta that DP-SGD's padded Poisson batches add: a mechanism within total-variation
    distance g of an (eps, delta)-DP one is (eps, delta + (1 + e^eps) g)-DP, and g <= the number
    of a record's sampled steps times the per-step overflow probability."""
    p = info.get("overflow_probability", 0.0)
    if not p:
        return 0.0
    return (1.0 + math.exp(min(epsilon, 700.0))) * steps * p


def resolve_noise(cfg: RunConfig, lora, client_sizes=None) -> tuple[NoiseSpec, acc.Ledger | None, dict]:
    """sigma_A, sigma_B from the DP config, the equivalent single-Gaussian multiplier, and the ledger.
    client_sizes (examples per client) is needed by dpsgd only."""
    dp, fl = cfg.dp, cfg.fl
    if dp.mode == "none":
        return NoiseSpec(), None, {"mechanism": "no DP"}
    if dp.mode == "dpsgd":
        return _resolve_dpsgd(cfg, client_sizes)
    if dp.mode == "central" and fl.sampling != "poisson":
        raise UserError("dp.mode central needs fl.sampling poisson (its accounting assumes Poisson client sampling)")
    n_a, n_b, ca, cb = mech.clip_blocks(lora, dp.scope, dp.clip_a, dp.clip_b)
    if cfg.lora.freeze_a and dp.mode == "local":
        n_a = 0  # A is frozen, shared and public: only B is released
    neighbouring = dp.neighbouring if dp.mode == "local" else "add-remove"
    # z_eff = z / factor: the multiplier of one release when every block gets sigma = z * its clip
    factor = 1.0 / mech.effective_noise_multiplier(n_a, n_b, ca, cb, ca, cb if n_b else 1.0, neighbouring)
    q = fl.clients_per_round / fl.num_clients
    planned = worst_participations(cfg)
    if dp.noise == "classical":
        z = mech.classical_noise_multiplier(dp.epsilon, dp.delta)
    elif dp.noise == "analytic":
        z = acc.gaussian_multiplier_for(dp.epsilon, 1, dp.delta) * factor if dp.mode == "local" else \
            acc.gaussian_multiplier_for(dp.epsilon, 1, dp.delta)
    elif dp.noise == "multiplier":
        z = dp.noise_multiplier
    elif dp.mode == "local":
        z = acc.gaussian_multiplier_for(dp.epsilon, planned, dp.delta) * factor
    else:
        z = acc.sampled_multiplier_for(dp.epsilon, q, fl.rounds, dp.delta) * factor
    z_eff = z / factor
    sigma_a = z * dp.clip_a
    sigma_b = z * (dp.clip_a if dp.scope == "global" else dp.clip_b)
    ledger = acc.Ledger(dp.mode, fl.num_clients, z_eff, dp.delta, neighbouring, sampling_rate=q)
    info = {"noise_multiplier": z, "effective_noise_multiplier": z_eff, "sigma_a": sigma_a, "sigma_b": sigma_b,
            "clipped_blocks": [n_a, n_b], "neighbouring": neighbouring, "delta": dp.delta,
            "mechanism": (f"{dp.mode} DP: Gaussian, {n_a} A and {n_b} B blocks clipped ({dp.scope}), "
                          f"sigma_A {sigma_a:.4g}, sigma_B {sigma_b:.4g}, {neighbouring}"
                          + (", composed over each client's participations, no amplification"
                             if dp.mode == "local" else f", Poisson client sampling q={q:g}, PLD"))}
    return NoiseSpec(dp.mode, sigma_a, sigma_b, z, z_eff, (n_a, n_b)), ledger, info


def worst_participations(cfg: RunConfig) -> int:
    """The most rounds any client takes part in under the run's sampling schedule. The schedule
    is a pure function of (seed, round) and independent of the data, so calibrating the noise to
    it (dp.noise: calibrate) costs no privacy and makes every client's epsilon at most the target."""
    counts = np.zeros(cfg.fl.num_clients, np.int64)
    for r in range(cfg.fl.rounds):
        ids, valid = _sample(cfg, r)
        np.add.at(counts, ids[valid], 1)
    return int(counts.max())


def client_mesh(devices: int):
    """A 1-D mesh with a 'clients' axis over the first `devices` devices (None for one device).
    Multi-host: call jax.distributed.initialize() first; jax.devices() then lists every host's."""
    if devices <= 1:
        return None
    available = jax.devices()
    if devices > len(available):
        raise UserError(f"fl.devices = {devices} but only {len(available)} device(s) are visible: {available}")
    return jax.sharding.Mesh(np.array(available[:devices]), ("clients",))


def _sample(cfg: RunConfig, round_index: int):
    """(client slots, valid mask) of a round, a pure function of (seed, round)."""
    fl = cfg.fl
    rng = np.random.default_rng([cfg.seed, 2, round_index])
    if fl.sampling == "uniform":
        ids = np.sort(rng.choice(fl.num_clients, fl.clients_per_round, replace=False))
        return ids, np.ones(len(ids), bool)
    return np.arange(fl.num_clients), rng.random(fl.num_clients) < fl.clients_per_round / fl.num_clients


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
    axes[0].plot(r, [x["loss"] for x in rows], label="train loss (clients)")
    ev = [(x["round"], x["eval_loss"]) for x in rows if x.get("eval_loss") is not None]
    if ev:
        axes[0].plot(*zip(*ev), "o-", label="eval loss")
    axes[0].set_xlabel("round")
    axes[0].set_ylabel("loss (nats/token)")
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


def run(cfg: RunConfig, out_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
        progress: bool = True, stop_after: int | None = None) -> dict:
    """Run (or resume) a federated simulation; returns the summary (also written to summary.json)."""
    from tqdm.auto import tqdm

    from .data.pipeline import prepare

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
    definition, base, lora, tokenizer, source = build_model(cfg)
    data = prepare(cfg, tokenizer)
    noise, ledger, dp_info = resolve_noise(cfg, lora, [len(p) for p in data.parts])
    from .evaluation import RunEvaluator
    extra_eval = RunEvaluator(cfg, tokenizer, data.eval)  # bad evaluation data fails before the folder is made
    prepare_out(cfg, out, resume, overwrite)
    batcher = data.batcher(fl.local_steps, fl.batch_size, cfg.seed, poisson=noise.mode == "dpsgd")
    state = init_state(cfg, lora, fl.num_clients)
    ckpt = Checkpointer(out / "checkpoints")
    start = 0
    metrics_path, csv_path = out / "metrics.jsonl", out / "metrics.csv"
    rows = []
    if resume:
        state, meta = ckpt.restore(state)
        start = int(meta["round"])
        if ledger is not None:
            ledger.load_state_dict(meta["ledger"])
        rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()] \
            if metrics_path.exists() else []
        rows = [r for r in rows if r["round"] <= start]  # drop rows logged after the checkpoint
    participations = ledger.participations if ledger is not None else np.zeros(fl.num_clients, np.int64)
    round_fn = make_round(definition, cfg, noise, fl.num_clients, donate=True, mesh=client_mesh(fl.devices))
    evaluate = _eval_fn(definition)
    ev = eval_batches(data.eval, fl.batch_size, cfg.eval_batches)
    ranks_all = np.asarray(cfg.lora.client_ranks or [cfg.lora.r] * fl.num_clients, np.int32)
    root = jax.random.key(cfg.seed)

    def run_eval(st):
        if ev is None or "loss" not in cfg.eval_tasks:
            return None
        return float(jnp.mean(evaluate(effective_base(base, st), st["lora"], *ev)))

    def paper_figures(parts_max):
        if noise.mode != "local":
            return None, None
        return acc.paper_epsilon(noise.z, cfg.dp.delta, int(parts_max))

    initial_eval = run_eval(state) if start == 0 else None
    initial_scores = extra_eval(definition, effective_base(base, state), state["lora"]) \
        if start == 0 and extra_eval.tasks else {}
    stop_reason = "completed"
    bar = tqdm(total=fl.rounds, initial=start, disable=not progress, desc="rounds", file=sys.stderr)
    for r in range(start, fl.rounds):
        if stop_after is not None and r >= start + stop_after:
            stop_reason = "stopped"
            break
        ids, valid = _sample(cfg, r)
        if ledger is not None and cfg.dp.budget is not None and ledger.worst_after(ids[valid]) > cfg.dp.budget:
            stop_reason = f"privacy budget {cfg.dp.budget} would be exceeded in round {r + 1}"
            break
        t0 = time.time()
        block = batcher.block(ids, participations)
        lr = cosine_lr(r, fl.rounds, fl.lr, fl.lr_min)
        state, m = round_fn(state, base, {k: jnp.asarray(v) for k, v in block.items()}, jnp.asarray(ids, jnp.int32),
                            jnp.asarray(ranks_all[ids]), jnp.asarray(valid), jax.random.fold_in(root, r),
                            jnp.float32(lr))
        if ledger is not None:
            ledger.record(ids[valid])
        else:
            np.add.at(participations, ids[valid], 1)
        row = {"round": r + 1, "lr": lr, "loss": float(m["loss"]), "first_loss": float(m["first_loss"]),
               "update_norm": float(m["update_norm"]), "dropped": int(m["dropped"]), "clients": int(valid.sum()),
               "eval_loss": None}
        if row["dropped"]:
            bad = [int(c) for c, ok, v in zip(ids, np.isfinite(np.asarray(m["client_loss"])), valid) if v and not ok]
            tqdm.write(f"round {r + 1}: {row['dropped']} client update(s) were not finite and were dropped "
                       f"(clients {bad or 'with non-finite factors'})", file=sys.stderr)
        if ledger is not None:
            row["epsilon"], row["epsilon_mean"] = ledger.worst(), ledger.mean()
            row["delta"] = cfg.dp.delta + truncation_delta(dp_info, row["epsilon"],
                                                           fl.local_steps * int(ledger.participations.max()))
            row["epsilon_paper"], row["epsilon_paper_tracker"] = paper_figures(ledger.participations.max())
            if noise.mode == "local":
                row["epsilon_rdp"] = acc.gaussian_epsilon_rdp(noise.z_eff, int(ledger.participations.max()),
                                                              cfg.dp.delta)
        if cfg.eval_every and ((r + 1) % cfg.eval_every == 0 or r + 1 == fl.rounds):
            row["eval_loss"] = run_eval(state)
            row.update(extra_eval(definition, effective_base(base, state), state["lora"]))
        if cfg.dp.stats_every and noise.mode != "none" and (r + 1) % cfg.dp.stats_every == 0:
            from .privacy.analysis import round_stats, write_stats_csv
            write_stats_csv(out / "dp_stats.csv", round_stats(state["lora"], noise.sigma_a, noise.sigma_b,
                                                              jax.random.fold_in(jax.random.fold_in(root, 2 ** 31 - 3), r), f"round_{r + 1}_global",
                                                              samples=cfg.dp.stats_samples), append=True)
        row["seconds"] = time.time() - t0
        rows.append(row)
        with metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.3f}", **({"eps": f"{row['epsilon']:.3g}"} if ledger else {}))
        if cfg.checkpoint_every and ((r + 1) % cfg.checkpoint_every == 0 or r + 1 == fl.rounds):
            ckpt.save(r + 1, state, {"round": r + 1, "ledger": ledger.state_dict() if ledger else None,
                                     "config": cfg.to_dict()})
    bar.close()
    done = rows[-1]["round"] if rows else start
    if done and (ckpt.latest() or 0) < done:  # also keep where an early stop left off
        ckpt.save(done, state, {"round": done, "ledger": ledger.state_dict() if ledger else None,
                                "config": cfg.to_dict()})
    ckpt.close()
    # rewrite the metrics (a resume may have dropped rows logged after its checkpoint)
    metrics_path.write_text("".join(json.dumps(x) + "\n" for x in rows))
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=METRIC_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    if rows:
        _plot(rows, out / "metrics.png")
    outputs = {"metrics_jsonl": str(metrics_path), "metrics_csv": str(csv_path), "plot": str(out / "metrics.png"),
               "checkpoints": str(out / "checkpoints"), "config": str(out / "config.yaml")}
    if fl.aggregation == "stack":
        from .models.hub import LoadedModel, save_merged
        if cfg.model.source != "tiny":
            final_base = effective_base(base, state)
            save_merged(out / "merged_model", LoadedModel(definition, base, {}, tokenizer, {}, source), final_base)
            outputs["merged_model"] = str(out / "merged_model")
    else:
        lora_lib.save_peft(out / "adapter", definition, state["lora"], None if cfg.model.source == "tiny" else source)
        outputs["adapter"] = str(out / "adapter")
    summary = {"rounds": done, "stop_reason": stop_reason, "initial_eval_loss": initial_eval,
               "final_eval_loss": next((x["eval_loss"] for x in reversed(rows) if x.get("eval_loss") is not None), None),
               "final_train_loss": rows[-1]["loss"] if rows else None, "model": source,
               "initial_scores": initial_scores,
               "final_scores": {k: next((x[k] for x in reversed(rows) if x.get(k) is not None), None)
                                for k in ("eval_exact_match", "eval_mc_accuracy", "eval_mc_accuracy_norm")
                                if any(x.get(k) is not None for x in rows)},
               "privacy": {**dp_info, "epsilon": ledger.worst() if ledger else None,
                           "epsilon_mean": ledger.mean() if ledger else None,
                           "epsilon_paper": rows[-1].get("epsilon_paper") if rows else None,
                           "epsilon_paper_tracker": rows[-1].get("epsilon_paper_tracker") if rows else None,
                           "delta": rows[-1].get("delta") if rows else None,
                           "max_participations": int(participations.max())},
               "wall_seconds": time.time() - t_start, "outputs": outputs}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
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
