"""The commands on a run config: run (the federated simulation), config, data and plan."""

from __future__ import annotations

import sys
from pathlib import Path

from ..core.errors import UserError
from ..runs import reading
from .common import _ENV_ERRNOS, _finite, dumps


def _check_budget(cfg) -> None:
    """Refuse a dp.budget below the cost of one participation: the run would stop before its first
    round. Computed from shapes only (no weights, no data); record-level DP-SGD's cost depends on
    the clients' data sizes and is left to the run loop."""
    import warnings

    import numpy as np

    from ..models import abstract_model
    from ..models.factory import build_model_config
    from ..privacy import mechanisms as modes

    lc = cfg.lora.to_lora_config()
    mc = build_model_config(cfg)
    lc.check(mc)
    with warnings.catch_warnings():  # the run itself warns about the classical formula
        warnings.simplefilter("ignore")
        mechanism = modes.build(cfg, abstract_model(mc, lc)[2], None)
        if mechanism.ledger is None or mechanism.record_level:  # record level: needs the data sizes
            return
        cost = mechanism.ledger.worst_after(np.zeros(1, np.int64))
    if cost > cfg.dp.budget:
        raise UserError(
            f"dp.budget = {cfg.dp.budget:g} is below one round's cost (epsilon {cost:.4g} for a client "
            f"that takes part once), so no round could run; raise dp.budget or the noise"
        )


def _cmd_run(args) -> int:
    from ..config.run_config import load_config
    from ..runs.outdir import check_out, check_same_config

    if args.resume and args.overwrite:
        raise UserError(
            "--resume and --overwrite exclude each other: resume continues the run in the folder, overwrite replaces it"
        )
    config = args.config
    if config is None and args.resume and args.out and Path(args.out, "config.yaml").is_file():
        config = str(Path(args.out, "config.yaml"))  # resume the run's own config unless one is given
        reading.check_config_file(config)  # a damaged one is said so
    cfg = load_config(config, args.set)
    out = f"runs/{cfg.name}" if args.out is None else args.out  # --out '' is refused by check_out
    check_out(out, args.resume, args.overwrite)  # before any model is loaded; the run checks again
    if args.resume:
        check_same_config(cfg, out)
    if cfg.dp.budget is not None and not args.resume:
        _check_budget(cfg)  # early, from shapes; the run loop checks again with the data
    from ..runs.runner import run

    try:
        s = run(cfg, out, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    except Exception as exc:  # an OSError, or a library's error that wraps one (orbax, safetensors)
        e = exc if isinstance(exc, OSError) else reading.os_error_of(exc, out)
        if isinstance(exc, UserError) or e is None or e.errno not in _ENV_ERRNOS:
            raise
        where = str(e.filename or out)
        if Path(where).resolve().is_relative_to(Path(out).resolve()):
            raise UserError(
                f"cannot write {where!r}: {e.strerror}; the run folder {out!r} keeps what was written "
                "before (--resume continues from its last checkpoint)"
            ) from e
        raise UserError(f"cannot access {where!r}: {e.strerror}") from e
    if "process" in s:  # a process > 0 of a multi-host run: process 0 wrote the run folder
        print(
            dumps(s)
            if args.json
            else f"process {s['process']} of {s['processes']}: {s['rounds']} rounds ({s['stop_reason']}); "
            f"process 0 wrote the run folder {s['run_folder']}"
        )
        return 130 if s["stop_reason"] == "interrupted" else 0
    if s.get("already_finished"):
        print(dumps(s) if args.json else f"run {out} already finished ({s['rounds']} rounds); nothing to do")
        return 0
    code = 0
    if s.get("stop_reason") == "interrupted":
        print(
            f"fedlora-jax run: interrupted after round {s['rounds']}; checkpoint saved in {out}/checkpoints "
            f"(--resume continues)",
            file=sys.stderr,
        )
        code = 130
    if args.json:
        print(dumps(s))
        return code
    p = s.get("privacy") or {}
    fmt = lambda x, spec=".4f": "n/a" if x is None else format(x, spec)
    print(f"\nrun {cfg.name}: {s['rounds']} rounds ({s['stop_reason']}), model {s['model']}")
    if "final_train_loss" in s:
        train = f"last train loss {fmt(s['final_train_loss'])}"
    elif "unprotected_final_train_loss" in s:
        train = f"last train loss {fmt(s['unprotected_final_train_loss'])} (OUTSIDE the DP guarantee)"
    else:
        train = "client train loss not published under DP (dp.publish_client_metrics: true publishes it, marked)"
    ev = s.get("eval") or {}
    after = ev.get("after") or {}
    n = f" (n = {after['n']} held-out examples)" if after.get("n") is not None else ""
    print(
        f"eval loss {fmt(s.get('initial_eval_loss'))} (base) -> {fmt(s.get('final_eval_loss'))} (exported "
        f"adapter, round {after.get('round', s['rounds'])}){n}; {train}"
    )
    for k, v in (s.get("final_scores") or {}).items():
        a = after.get(k) or {}
        lo, hi = a.get("ci95") or (None, None)
        ci = f", 95% interval [{fmt(lo)}, {fmt(hi)}]" if lo is not None else ""
        print(
            f"{k.replace('eval_', '')} {fmt((s.get('initial_scores') or {}).get(k))} -> {fmt(v)} "
            f"(n = {a.get('n', 'n/a')}{ci})"
        )
    if p.get("mechanism") and p["mechanism"] != "no DP":
        print(f"privacy: {p['mechanism']}")
        who = p.get("epsilon_of", "worst client")
        if p.get("epsilon") is None or not s["rounds"]:
            print("  no round ran, so no privacy was spent")
        else:
            print(
                f"  honest epsilon ({who}, delta {fmt(p.get('delta'), '.4g')}): {fmt(p['epsilon'], '.4g')}; "
                f"mean over clients {fmt(p.get('epsilon_mean'), '.4g')}; max participations "
                f"{p.get('max_participations', 'n/a')}"
            )
        if p.get("epsilon_paper") is not None:
            print(
                f"  paper convention (classical formula, NOT a valid bound): per release "
                f"{fmt(p['epsilon_paper'], '.4g')}, paper code's tracker {fmt(p.get('epsilon_paper_tracker'), '.4g')}"
            )
    else:
        print("privacy: no DP")
    print(f"wall time {fmt(s.get('wall_seconds'), '.1f')} s")
    for k, v in (s.get("outputs") or {}).items():
        print(f"  {k}: {v}")
    return code


def _cmd_config(args) -> int:
    from ..config.run_config import load_config

    cfg = load_config(args.config, args.set)
    print(cfg.to_yaml(), end="")  # every key with its value or default: what `run` writes to config.yaml
    return 0


def _cmd_data(args) -> int:
    from ..config.run_config import load_config
    from ..data.pipeline import prepare
    from ..models.factory import build_tokenizer

    cfg = load_config(args.config, args.set)
    cd = prepare(cfg, build_tokenizer(cfg))
    s = cd.summary
    if args.json:
        print(dumps(s))
        return 0
    st = s["data"]
    print(
        f"data {cfg.data.source}: {st['examples']} examples kept ({st['dropped']} dropped: no response token "
        f"fits in data.seq_len {cfg.data.seq_len}; {st['truncated']} truncated), {st['tokens']} tokens, "
        f"{st['response_tokens']} response tokens, mean length {st['mean_length']:.1f}"
    )
    print(
        f"train {s['train_examples']} / eval {s['eval_examples']}; partition {cfg.data.partition} "
        f"over {cfg.fl.num_clients} clients" + (f" by {s['label_column']}" if s["label_column"] else "")
    )
    for c in s["clients"]:
        labels = ""
        if "labels" in c:
            top = sorted(c["labels"].items(), key=lambda kv: -kv[1])[:3]
            labels = "  " + ", ".join(f"{k}:{v}" for k, v in top) + (" ..." if len(c["labels"]) > 3 else "")
        print(f"  client {c['client']:3d}: {c['examples']:6d} examples {c['tokens']:8d} tokens{labels}")
    return 0


def _cmd_plan(args) -> int:
    from ..config.run_config import load_config
    from ..federated.plan import CPU_TOKENS_PER_CHUNK, plan

    _finite("--device-memory", args.device_memory, low=0, low_open=True)
    cfg = load_config(args.config, args.set)
    out = plan(cfg, args.device_memory, args.measure)
    if args.json:
        print(dumps(out))
        return 0
    e, gib = out["estimate"], 2**30
    print(
        f"model {out['model']} ({out['dtype']}), {cfg.fl.clients_per_round} clients per round"
        + (
            f" (Poisson: padded to {out['cohort_slots']} slots)"
            if out["cohort_slots"] != cfg.fl.clients_per_round
            else ""
        )
        + ", "
        f"{cfg.fl.local_steps} steps x batch {cfg.fl.batch_size} x seq {cfg.data.seq_len}"
    )
    c, fl = out["cohorts"], cfg.fl
    print(
        f"cohorts ({fl.sampling} sampling, {fl.availability} availability, {c['rounds']} rounds of the seeded "
        f"schedule): picked min {c['picked']['min']}, median {c['picked']['median']:g}, max {c['picked']['max']}"
        + (
            f"; reporting median {c['reporting']['median']:g}"
            if fl.availability == "dropout" and c["reporting"]
            else ""
        )
        + ("; reporting: by each client's size" if fl.availability == "dropout" and not c["reporting"] else "")
        + (f"; available {c['available_share']['mean']:.0%} on average" if fl.availability == "diurnal" else "")
    )
    rows, m = e["mesh"]
    if rows * m > 1:
        print(f"mesh: {rows} x {m} devices (clients x model); figures below are per device")
    print(f"  base (shared):              {e['base_bytes_per_device'] / gib:8.3f} GiB")
    if m > 1:
        print(f"    (of {e['base_bytes'] / gib:.3f} GiB in all: its kernels split over {m} devices)")
    print(
        f"  adapter (one copy):         {e['adapter_bytes'] / gib:8.4f} GiB  (x6 per client: local, start, "
        f"gradient, 2 AdamW moments, release)"
    )
    print(f"  activations per client:     {e['activation_bytes_per_client'] / gib:8.3f} GiB")
    print(f"  per client in a chunk:      {e['per_client_bytes'] / gib:8.3f} GiB")
    if "auto_clients_per_chunk" in out:
        auto = out["auto_clients_per_chunk"]
        print(
            f"clients_per_chunk unset: a round runs {auto['cpu']} clients at once on CPU "
            f"(~{CPU_TOKENS_PER_CHUNK:,} tokens per step per device), {auto['accelerator']} on an accelerator"
        )
    if "largest_clients_per_chunk" in out:
        print(
            f"largest clients_per_chunk on {args.device_memory:g} GiB (90% usable)"
            f"{' per device' if rows * m > 1 else ''}: {out['largest_clients_per_chunk']}"
            + (
                f" (capped by the cohort: a round has {out['largest_clients_per_chunk']} client slots; "
                f"the memory would hold {out['memory_clients_per_chunk']})"
                if out.get("capped_by_cohort")
                else ""
            )
        )
    if "measured" in out:
        x = out["measured"]
        print(
            f"XLA ({x['backend']}{', per device' if x['per_device'] else ''}): temp "
            f"{x['chunk_1']['temp_bytes'] / gib:.3f} GiB at 1 client per 'clients' row, "
            f"+{x['per_client_temp_bytes'] / gib:.3f} GiB per extra client"
        )
    return 0
