"""Command-line entry point: parse, build, call. No algorithm logic lives here."""

from __future__ import annotations

from .errors import UserError
import argparse
import json
import logging
import sys
from pathlib import Path


def _cmd_score(args) -> int:
    from . import lora as lora_lib
    from .evaluation import score_ids
    from .models import abstract_model
    from .models.hub import load_model

    if args.file is not None:
        path = Path(args.file)
        if not path.is_file():
            raise UserError(f"--file {args.file!r} does not exist")
        text = path.read_text()
    else:
        text = args.text
    lm = load_model(args.model, dtype=args.dtype)
    if lm.tokenizer is None:
        raise UserError(f"model {args.model!r} has no tokenizer files; cannot tokenize the text")
    definition, lora = lm.definition, lm.lora
    if args.adapter:
        lc = lora_lib.read_peft_config(args.adapter)
        lc.check(lm.config)
        definition = abstract_model(lm.config, lc)[0]
        lora = lora_lib.load_peft(args.adapter, definition)
    ids = lm.tokenizer(text, add_special_tokens=True)["input_ids"]
    result = score_ids(definition, lm.base, lora, ids)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"model {lm.source}" + (f" + adapter {args.adapter}" if args.adapter else ""))
        print(f"tokens scored {result['n_tokens']}  mean NLL {result['nll']:.4f} nats  "
              f"perplexity {result['perplexity']:.3f}")
    return 0


def _cmd_privacy(args) -> int:
    from .privacy import accounting

    z = args.noise_multiplier
    if z is None and args.sigma is not None:
        if args.clip is None or args.clip <= 0:
            raise UserError(f"--sigma needs --clip C > 0 (got {args.clip})")
        if args.sigma < 0:
            raise UserError(f"--sigma must be >= 0, got {args.sigma}")
        z = args.sigma / args.clip
    out = accounting.report(
        args.mode, delta=args.delta, noise_multiplier=z, rounds=args.rounds, tensors=args.tensors,
        neighbouring=args.neighbouring, participations=args.participations, clients=args.clients,
        clients_per_round=args.clients_per_round, sampling_rate=args.sampling_rate,
        local_steps=args.local_steps, batch_sampling_rate=args.batch_sampling_rate,
        target_epsilon=args.target_epsilon)
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"mode {out['mode']}: {out['mechanism']}")
    print(f"neighbouring {out['neighbouring']}, delta {out['delta']:g}, noise multiplier sigma/C "
          f"{out['noise_multiplier']:.6g}")
    rdp = "n/a (RDP does not model sampled replace-one)" if out["epsilon_rdp"] is None else f"{out['epsilon_rdp']:.4f}"
    print(f"epsilon (PLD / exact): {out['epsilon_pld']:.4f}    epsilon (RDP): {rdp}")
    if out.get("epsilon_paper") is not None:
        print(f"paper convention, NOT a valid bound for epsilon >= 1: per release {out['epsilon_paper']:.4f}, "
              f"paper code's tracker {out['epsilon_paper_tracker']:.4f}")
    return 0


def _cmd_data(args) -> int:
    from .config import load_config
    from .data.pipeline import prepare
    from .runner import build_tokenizer

    cfg = load_config(args.config, args.set)
    cd = prepare(cfg, build_tokenizer(cfg))
    s = cd.summary
    if args.json:
        print(json.dumps(s))
        return 0
    st = s["data"]
    print(f"data {cfg.data.source}: {st['examples']} examples kept ({st['dropped']} dropped: prompt longer than "
          f"seq_len {cfg.data.seq_len}; {st['truncated']} responses truncated), {st['tokens']} tokens, "
          f"{st['response_tokens']} response tokens, mean length {st['mean_length']:.1f}")
    print(f"train {s['train_examples']} / eval {s['eval_examples']}; partition {cfg.data.partition} "
          f"over {cfg.fl.num_clients} clients" + (f" by {s['label_column']}" if s["label_column"] else ""))
    for c in s["clients"]:
        labels = ""
        if "labels" in c:
            top = sorted(c["labels"].items(), key=lambda kv: -kv[1])[:3]
            labels = "  " + ", ".join(f"{k}:{v}" for k, v in top) + (" ..." if len(c["labels"]) > 3 else "")
        print(f"  client {c['client']:3d}: {c['examples']:6d} examples {c['tokens']:8d} tokens{labels}")
    return 0


def _cmd_run(args) -> int:
    from .config import load_config
    from .runner import run

    cfg = load_config(args.config, args.set)
    out = args.out or f"runs/{cfg.name}"
    s = run(cfg, out, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    if args.json:
        print(json.dumps(s))
        return 0
    p = s["privacy"]
    print(f"\nrun {cfg.name}: {s['rounds']} rounds ({s['stop_reason']}), model {s['model']}")
    fmt = lambda x: "n/a" if x is None else f"{x:.4f}"
    print(f"eval loss {fmt(s['initial_eval_loss'])} -> {fmt(s['final_eval_loss'])}; last train loss {fmt(s['final_train_loss'])}")
    for k, v in (s.get("final_scores") or {}).items():
        print(f"{k.replace('eval_', '')} {fmt(s['initial_scores'].get(k))} -> {fmt(v)}")
    if p.get("epsilon") is not None:
        print(f"privacy: {p['mechanism']}")
        who = "a record of the worst client" if p["mechanism"].startswith("dpsgd") else "worst client"
        print(f"  honest epsilon ({who}, delta {p['delta']:.4g}): {p['epsilon']:.4g}; mean over clients "
              f"{p['epsilon_mean']:.4g}; max participations {p['max_participations']}")
        if p.get("epsilon_paper") is not None:
            print(f"  paper convention (classical formula, NOT a valid bound): per release {p['epsilon_paper']:.4g}, "
                  f"paper code's tracker {p['epsilon_paper_tracker']:.4g}")
    else:
        print("privacy: no DP")
    print(f"wall time {s['wall_seconds']:.1f} s")
    for k, v in s["outputs"].items():
        print(f"  {k}: {v}")
    return 0


def _cmd_plan(args) -> int:
    from .config import load_config
    from .plan import plan

    cfg = load_config(args.config, args.set)
    out = plan(cfg, args.device_memory, args.measure)
    if args.json:
        print(json.dumps(out))
        return 0
    e, gib = out["estimate"], 2 ** 30
    print(f"model {out['model']} ({out['dtype']}), {cfg.fl.clients_per_round} clients per round, "
          f"{cfg.fl.local_steps} steps x batch {cfg.fl.batch_size} x seq {cfg.data.seq_len}")
    print(f"  base (shared):              {e['base_bytes'] / gib:8.3f} GiB")
    print(f"  adapter (one copy):         {e['adapter_bytes'] / gib:8.4f} GiB  (x6 per client: local, start, "
          f"gradient, 2 AdamW moments, release)")
    print(f"  activations per client:     {e['activation_bytes_per_client'] / gib:8.3f} GiB")
    print(f"  per client in a chunk:      {e['per_client_bytes'] / gib:8.3f} GiB")
    if "largest_clients_per_chunk" in out:
        print(f"largest clients_per_chunk on {args.device_memory:g} GiB (90% usable): {out['largest_clients_per_chunk']}")
    if "measured" in out:
        m = out["measured"]
        print(f"XLA ({m['backend']}): temp {m['chunk_1']['temp_bytes'] / gib:.3f} GiB at 1 client, "
              f"+{m['per_client_temp_bytes'] / gib:.3f} GiB per extra client")
    return 0


def _cmd_eval(args) -> int:
    from .evaluation import run_task
    from .runner import load_for_eval

    args.task = args.task or ["loss"]
    definition, base, lora, tok, cfg = load_for_eval(args.target, args.model)
    results = [run_task(t, definition, base, lora, tok, cfg, args.data, args.limit, args.max_new_tokens)
               for t in args.task]
    for r in results:
        print(json.dumps(r) if args.json else "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                      for k, v in r.items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedlora-jax", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("score", help="mean token NLL and perplexity of a text under a model (+ adapter)")
    s.add_argument("model", help="HF folder, hub id, GGUF file, or 'default' (offline SmolLM2-135M-Instruct)")
    s.add_argument("--adapter", help="a PEFT LoRA adapter folder")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--text")
    g.add_argument("--file")
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    s.add_argument("--json", action="store_true", help="print one JSON line")
    s.set_defaults(fn=_cmd_score)

    s = sub.add_parser("privacy", help="privacy calculator: epsilon of a planned run, or the noise for a target")
    s.add_argument("--mode", choices=["local", "central", "dpsgd"], default="local")
    s.add_argument("--noise-multiplier", type=float, help="sigma / C")
    s.add_argument("--sigma", type=float)
    s.add_argument("--clip", type=float)
    s.add_argument("--tensors", type=int, default=1, help="local: separately clipped tensors per release")
    s.add_argument("--rounds", type=int, default=1)
    s.add_argument("--clients", type=int)
    s.add_argument("--clients-per-round", type=int)
    s.add_argument("--sampling-rate", type=float)
    s.add_argument("--participations", type=int, help="local/dpsgd: rounds one client takes part in")
    s.add_argument("--local-steps", type=int, default=1)
    s.add_argument("--batch-sampling-rate", type=float)
    s.add_argument("--delta", type=float, default=1e-5)
    s.add_argument("--neighbouring", choices=["replace-one", "add-remove"])
    s.add_argument("--target-epsilon", type=float, help="print the noise multiplier that meets it")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=_cmd_privacy)

    s = sub.add_parser("data", help="load, tokenize and partition as a run would; print the summary")
    s.add_argument("config", nargs="?", default=None, help="YAML file or preset name (default: default)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=_cmd_data)

    s = sub.add_parser("run", help="run a federated simulation (default: the offline default config)")
    s.add_argument("config", nargs="?", default=None, help="YAML file or preset name (default: default)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--out", help="run folder (default: runs/NAME)")
    s.add_argument("--resume", action="store_true")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=_cmd_run)

    s = sub.add_parser("plan", help="memory per chunk of clients and the largest chunk that fits a device")
    s.add_argument("config", nargs="?", default=None)
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--device-memory", type=float, help="device memory in GiB")
    s.add_argument("--measure", action="store_true", help="also compile the round and read XLA's memory analysis")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=_cmd_plan)

    s = sub.add_parser("eval", help="evaluate a run folder or a PEFT adapter")
    s.add_argument("target", help="run folder (config.yaml + adapter/) or PEFT adapter folder")
    s.add_argument("--task", action="append", choices=["loss", "exact_match", "multiple_choice"],
                   help="repeatable; default: loss")
    s.add_argument("--data", help="multiple_choice: question/choices/answer file or hub id, or 'synthetic'")
    s.add_argument("--model", help="base model of an adapter folder (default: its base_model_name_or_path)")
    s.add_argument("--limit", type=int)
    s.add_argument("--max-new-tokens", type=int, default=16)
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=_cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # dp-accounting's RDP logs every order it excludes at WARNING through absl; keep the CLI readable
    logging.getLogger("absl").setLevel(logging.ERROR)
    try:
        return args.fn(args)
    except UserError as e:
        print(f"fedlora-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
