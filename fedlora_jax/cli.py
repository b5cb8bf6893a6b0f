"""Command-line entry point: parse, build, call. No algorithm logic lives here."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import math
import os
import sys
import warnings
from pathlib import Path

# transformers prints "PyTorch was not found" on every torch-free start; torch is not needed here
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from .errors import UserError

# OSErrors that are the user's environment, not a bug: reported as one sentence naming the path
_ENV_ERRNOS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.ENAMETOOLONG,
}


def _plain(x):
    """x with NaN and infinities as None (and numpy scalars as Python numbers), for strict JSON."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if hasattr(x, "item") and getattr(x, "ndim", None) == 0:  # numpy / jax scalar
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def dumps(obj) -> str:
    """Strict JSON (RFC 8259): NaN and infinities become null."""
    return json.dumps(_plain(obj), allow_nan=False)


class _CurrentStderr(logging.StreamHandler):
    """A handler that writes to whatever sys.stderr is at the time (not the one of the first call)."""

    def emit(self, record):
        self.stream = sys.stderr
        super().emit(record)


def _finite(flag: str, value, low=None, high=None, low_open=False, high_open=False, what=None):
    """A numeric option in its domain, or a UserError naming the flag (and `what` it is)."""
    if value is None:
        return
    if what:
        flag = f"{flag}: {what}"
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{flag} must be a finite number, got {value}")
    bad = (low is not None and (value <= low if low_open else value < low)) or (
        high is not None and (value >= high if high_open else value > high)
    )
    if bad:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
        hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
        allowed = (
            f"in {lo}, {hi}"
            if low is not None and high is not None
            else f"{'>' if low_open else '>='} {low:g}"
            if low is not None
            else f"{'<' if high_open else '<='} {high:g}"
        )
        raise UserError(f"{flag} must be {allowed}, got {value:g}")


def _cmd_score(args) -> int:
    from . import lora as lora_lib
    from .data.loading import read_text
    from .evaluation import score_ids
    from .models import abstract_model
    from .models.hub import load_model

    text = read_text(args.file, "--file") if args.file is not None else args.text
    if not text.strip():
        raise UserError(
            f"{'--file ' + repr(args.file) if args.file is not None else '--text'} is empty; give a text to score"
        )
    if args.adapter:  # a broken adapter fails before the model is loaded
        lc = lora_lib.read_peft_config(args.adapter)
        lora_lib.check_peft_weights(args.adapter)
    lm = load_model(args.model, dtype=args.dtype)
    if lm.tokenizer is None:
        raise UserError(f"model {args.model!r} has no tokenizer files; cannot tokenize the text")
    definition, lora = lm.definition, lm.lora
    if args.adapter:
        lc.check(lm.config)
        definition = abstract_model(lm.config, lc)[0]
        lora = lora_lib.load_peft(args.adapter, definition)
    ids = lm.tokenizer(text, add_special_tokens=True)["input_ids"]
    result = score_ids(definition, lm.base, lora, ids)
    if args.json:
        print(dumps(result))
    else:
        print(f"model {lm.source}" + (f" + adapter {args.adapter}" if args.adapter else ""))
        print(
            f"tokens scored {result['n_tokens']}  mean NLL {result['nll']:.4f} nats  "
            f"perplexity {result['perplexity']:.3f}"
        )
    return 0


def _cmd_privacy(args) -> int:
    from .privacy import accounting

    _check_privacy_args(args)
    z = args.noise_multiplier
    if args.sigma is not None:
        z = args.sigma / args.clip
    from dp_accounting.mechanism_calibration import NoBracketIntervalFoundError

    try:
        out = _privacy_report(accounting, args, z)
    except NoBracketIntervalFoundError:  # dp-accounting's calibration gives up on a target it cannot bracket
        raise UserError(
            f"--target-epsilon {args.target_epsilon:g} cannot be reached at delta {args.delta:g} with "
            "this sampling and number of rounds (the noise search found no bracket); try a smaller "
            "target or fewer rounds"
        ) from None
    if args.json:
        print(dumps(out))
        return 0
    print(f"mode {out['mode']}: {out['mechanism']}")
    print(
        f"neighbouring {out['neighbouring']}, delta {out['delta']:g}, noise multiplier sigma/C "
        f"{out['noise_multiplier']:.6g}"
    )
    rdp = "n/a (RDP does not model sampled replace-one)" if out["epsilon_rdp"] is None else f"{out['epsilon_rdp']:.4f}"
    print(f"epsilon (PLD / exact): {out['epsilon_pld']:.4f}    epsilon (RDP): {rdp}")
    spread = out.get("participations_spread")
    if spread:
        print(
            f"participations per client under the seeded {args.sampling} schedule (seed {args.seed}): min "
            f"{spread['min']}, median {spread['median']:g}, max {spread['max']} (epsilon is for the max)"
        )
    elif out["mode"] != "central" and args.participations is None:
        print(
            f"participations: {out['participations']} (every round: give --clients and --clients-per-round "
            f"to simulate the seeded schedule)"
        )
    if out.get("epsilon_paper") is not None:
        print(
            f"paper convention, NOT a valid bound for epsilon >= 1: per release {out['epsilon_paper']:.4f}, "
            f"paper code's tracker {out['epsilon_paper_tracker']:.4f}"
        )
    return 0


def _check_privacy_args(args) -> None:
    """Every calculator option in its domain, named by its flag (before any accounting)."""
    given = [
        f
        for f, v in (
            ("--noise-multiplier", args.noise_multiplier),
            ("--sigma", args.sigma),
            ("--target-epsilon", args.target_epsilon),
        )
        if v is not None
    ]
    if len(given) > 1:
        raise UserError(
            f"give one of --noise-multiplier, --sigma with --clip, or --target-epsilon; got {' and '.join(given)}"
        )
    if not given:
        raise UserError("give --noise-multiplier Z, --sigma S with --clip C, or --target-epsilon E")
    _finite("--noise-multiplier", args.noise_multiplier, low=0, what="noise multiplier")
    _finite("--sigma", args.sigma, low=0)
    _finite("--clip", args.clip)
    if args.sigma is not None and (args.clip is None or args.clip <= 0):
        raise UserError(f"--sigma needs --clip C > 0 (got {args.clip}); the noise multiplier is sigma / C")
    if args.clip is not None and args.sigma is None:
        raise UserError("--clip is used only with --sigma")
    _finite("--target-epsilon", args.target_epsilon, low=0, low_open=True, what="target epsilon")
    _finite("--delta", args.delta, low=0, high=1, low_open=True, high_open=True)
    _finite("--sampling-rate", args.sampling_rate, low=0, high=1, low_open=True)
    _finite("--batch-sampling-rate", args.batch_sampling_rate, low=0, high=1, low_open=True)
    _finite("--rounds", args.rounds, low=1)
    _finite("--tensors", args.tensors, low=1)
    _finite("--local-steps", args.local_steps, low=1)
    _finite("--clients", args.clients, low=1)
    if args.clients_per_round is not None:
        if args.clients is None:
            raise UserError("--clients-per-round needs --clients (the sampling rate is their ratio)")
        _finite("--clients-per-round", args.clients_per_round, low=1, high=args.clients, what="clients per round")
    _finite("--participations", args.participations, low=0, high=args.rounds)
    if args.mode != "dpsgd" and args.batch_sampling_rate is not None:
        raise UserError(f"--batch-sampling-rate is used by --mode dpsgd only, not {args.mode}")
    if args.mode == "dpsgd" and args.batch_sampling_rate is None:
        raise UserError("--mode dpsgd needs --batch-sampling-rate (batch size / client examples)")


def _privacy_report(accounting, args, z):
    return accounting.report(
        args.mode,
        delta=args.delta,
        noise_multiplier=z,
        rounds=args.rounds,
        tensors=args.tensors,
        neighbouring=args.neighbouring,
        participations=args.participations,
        clients=args.clients,
        clients_per_round=args.clients_per_round,
        sampling_rate=args.sampling_rate,
        local_steps=args.local_steps,
        batch_sampling_rate=args.batch_sampling_rate,
        target_epsilon=args.target_epsilon,
        seed=args.seed,
        sampling=args.sampling,
    )


def _cmd_data(args) -> int:
    from .config import load_config
    from .data.pipeline import prepare
    from .models.factory import build_tokenizer

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


def _check_budget(cfg) -> None:
    """Refuse a dp.budget below the cost of one participation: the run would stop before its first
    round. Computed from shapes only (no weights, no data); record-level DP-SGD's cost depends on
    the clients' data sizes and is left to the run loop."""
    import warnings

    import numpy as np

    from .models import abstract_model
    from .models.factory import build_model_config
    from .privacy import modes

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
    from .config import load_config
    from .outdir import check_out

    if args.resume and args.overwrite:
        raise UserError(
            "--resume and --overwrite exclude each other: resume continues the run in the folder, overwrite replaces it"
        )
    config = args.config
    if config is None and args.resume and args.out and Path(args.out, "config.yaml").is_file():
        config = str(Path(args.out, "config.yaml"))  # resume the run's own config unless one is given
    cfg = load_config(config, args.set)
    out = args.out or f"runs/{cfg.name}"
    check_out(out, args.resume, args.overwrite)  # before any model is loaded; the run checks again
    if cfg.dp.budget is not None and not args.resume:
        _check_budget(cfg)  # early, from shapes; the run loop checks again with the data
    from .runner import run

    try:
        s = run(cfg, out, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    except OSError as e:
        if e.errno not in _ENV_ERRNOS:
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
    print(f"eval loss {fmt(s.get('initial_eval_loss'))} -> {fmt(s.get('final_eval_loss'))}; {train}")
    for k, v in (s.get("final_scores") or {}).items():
        print(f"{k.replace('eval_', '')} {fmt((s.get('initial_scores') or {}).get(k))} -> {fmt(v)}")
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


def _cmd_plan(args) -> int:
    from .config import load_config
    from .plan import plan

    _finite("--device-memory", args.device_memory, low=0, low_open=True)
    cfg = load_config(args.config, args.set)
    out = plan(cfg, args.device_memory, args.measure)
    if args.json:
        print(dumps(out))
        return 0
    e, gib = out["estimate"], 2**30
    print(
        f"model {out['model']} ({out['dtype']}), {cfg.fl.clients_per_round} clients per round, "
        f"{cfg.fl.local_steps} steps x batch {cfg.fl.batch_size} x seq {cfg.data.seq_len}"
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
    if "largest_clients_per_chunk" in out:
        print(
            f"largest clients_per_chunk on {args.device_memory:g} GiB (90% usable)"
            f"{' per device' if rows * m > 1 else ''}: {out['largest_clients_per_chunk']}"
        )
    if "measured" in out:
        x = out["measured"]
        print(
            f"XLA ({x['backend']}{', per device' if x['per_device'] else ''}): temp "
            f"{x['chunk_1']['temp_bytes'] / gib:.3f} GiB at 1 client per 'clients' row, "
            f"+{x['per_client_temp_bytes'] / gib:.3f} GiB per extra client"
        )
    return 0


def _precheck_eval_target(target: str) -> None:
    """Fail on a broken run folder or adapter before any model is loaded."""
    from . import lora as lora_lib
    from .config import load_config

    t = Path(target)
    if not t.exists():
        raise UserError(f"{target!r} does not exist; pass a run folder or a PEFT adapter folder")
    if (t / "config.yaml").is_file():
        load_config(str(t / "config.yaml"))
        if (t / "adapter").is_dir():
            lora_lib.read_peft_config(t / "adapter")
            lora_lib.check_peft_weights(t / "adapter")
    elif (t / lora_lib.ADAPTER_CONFIG).exists():
        lora_lib.read_peft_config(t)
        lora_lib.check_peft_weights(t)


def _cmd_eval(args) -> int:
    from .evaluation import LOCAL_SUFFIXES, load_multiple_choice, run_task

    args.task = args.task or ["loss"]
    _finite("--limit", args.limit, low=1)
    _finite("--max-new-tokens", args.max_new_tokens, low=1)
    if args.data is not None and "multiple_choice" not in args.task:
        raise UserError("--data is the multiple-choice data; it is used only with --task multiple_choice")
    _precheck_eval_target(args.target)
    if args.data is not None and Path(args.data).suffix in LOCAL_SUFFIXES:
        load_multiple_choice(args.data, args.limit)  # a bad file fails before the model is loaded
    from .artifacts import load_for_eval

    definition, base, lora, tok, cfg = load_for_eval(args.target, args.model)
    results = [
        run_task(t, definition, base, lora, tok, cfg, args.data, args.limit, args.max_new_tokens) for t in args.task
    ]
    for r in results:
        print(
            dumps(r)
            if args.json
            else "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items())
        )
    return 0


def _cmd_audit(args) -> int:
    from .config import load_config
    from .privacy import audit

    _finite("--trials", args.trials, low=audit.MIN_TRIALS, what="the number of games played (half with the canary)")
    _finite("--compositions", args.compositions, low=1)
    _finite("--confidence", args.confidence, low=0.5, high=1, low_open=True, high_open=True)
    cfg = load_config(args.config, args.set)
    r = audit.audit(cfg, args.trials, confidence=args.confidence, compositions=args.compositions, seed=args.seed)
    if args.json:
        print(dumps(r))
        return 0 if r["consistent"] else 1
    fmt = lambda x: "n/a" if x is None else f"{x:.4g}"
    print(f"game: {r['game']}")
    print(
        f"{r['trials']} trials ({r['trials_per_second']:.0f} trials/s after {r['seconds_compile']:.1f} s compile), "
        f"delta {r['delta']:g}, confidence {r['confidence']:g}"
    )
    print(
        f"empirical lower bound: epsilon >= {fmt(r['epsilon_lower'])}  (distribution-free "
        f"{fmt(r['epsilon_lower_distribution_free'])}, Gaussian-DP {fmt(r['epsilon_lower_gdp'])}"
        + ("" if r["gdp"]["applicable"] else f": {r['gdp'].get('reason', 'n/a')}")
        + ")"
    )
    print(
        f"attack: TPR {fmt(r['tpr_at_fpr']['0.001'])} at FPR 0.001, {fmt(r['tpr_at_fpr']['0.01'])} at FPR 0.01, "
        f"AUROC {fmt(r['auroc'])}"
    )
    print(f"accountant (upper bound) for this game: epsilon {fmt(r['epsilon_accountant'])}")
    if r["epsilon_paper"] is not None:
        print(f"paper convention (NOT a bound): epsilon {fmt(r['epsilon_paper'])}")
    print(r["verdict"])
    return 0 if r["consistent"] else 1


def _cmd_config(args) -> int:
    from .config import load_config

    cfg = load_config(args.config, args.set)
    print(cfg.to_yaml(), end="")  # every key with its value or default: what `run` writes to config.yaml
    return 0


def _cmd_generate(args) -> int:
    from . import generate
    from . import lora as lora_lib

    _finite("--max-new-tokens", args.max_new_tokens, low=1, what="the number of tokens to generate")
    _finite("--temperature", args.temperature, low=0, what="the sampling temperature (0 is greedy)")
    if not args.prompt.strip():
        raise UserError("--prompt is empty; give the text the model should answer or continue")
    t = Path(args.model)
    if t.is_dir() and ((t / "config.yaml").is_file() or (t / lora_lib.ADAPTER_CONFIG).is_file()):
        _precheck_eval_target(args.model)  # a broken run or adapter folder fails before any model is loaded
    definition, base, lora, tok, desc = generate.load(args.model, args.adapter)
    ids = generate.prompt_ids(tok, args.prompt, chat_template=not args.no_chat_template)
    printed = ""

    def stream(tokens):
        nonlocal printed
        text = tok.decode(tokens[0], skip_special_tokens=True)
        if text.startswith(printed) and not text.endswith("\ufffd"):  # hold back a partial UTF-8 character
            sys.stdout.write(text[len(printed) :])
            sys.stdout.flush()
            printed = text

    result = generate.generate_ids(
        definition,
        base,
        lora,
        [ids],
        args.max_new_tokens,
        eos_ids=generate.eos_ids(tok),
        temperature=args.temperature,
        seed=args.seed,
        on_token=None if args.json else stream,
    )
    out = generate.summary(result, tok, len(ids), desc)
    if args.json:
        print(dumps(out))
        return 0
    if out["text"].startswith(printed):
        sys.stdout.write(out["text"][len(printed) :])
    print()
    rate = "n/a" if not math.isfinite(result.tokens_per_second) else f"{result.tokens_per_second:.1f}"
    print(
        f"[{desc}: {len(ids)} prompt tokens, {len(out['token_ids'])} new ({out['stopped']}); prefill "
        f"{result.prefill_seconds:.2f} s and first step {result.first_step_seconds:.2f} s (with compiling), "
        f"then {rate} tokens/s]",
        file=sys.stderr,
    )
    return 0


class _Parser(argparse.ArgumentParser):
    """Command-line mistakes as one line (`fedlora-jax CMD: error: ...`) and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def _dp_modes() -> tuple[str, ...]:
    from .privacy import modes

    return modes.dp_names()


DESCRIPTION = (
    "Simulate differentially private federated LoRA fine-tuning of language models in JAX, with honest "
    "privacy accounting. Run 'fedlora-jax COMMAND --help' for a command's options."
)
CONFIG_DOCS = "README.md: 'Config sections', in the section '`run`: the federated simulation' of 'Command line'"


def version() -> str:
    """The installed distribution's version (package metadata), else the package's __version__."""
    import importlib.metadata

    try:
        return importlib.metadata.version("fedlora-jax")
    except importlib.metadata.PackageNotFoundError:
        from . import __version__

        return __version__


def _presets_epilog() -> str:
    """The packaged presets, each with the first sentence of its leading comment, and where keys are documented."""
    import importlib.resources
    import textwrap

    from .config import preset_names

    folder = importlib.resources.files("fedlora_jax") / "configs"
    lines = ["presets (fedlora_jax/configs/):"]
    for name in preset_names():
        comment = []
        for line in (folder / f"{name}.yaml").read_text().splitlines():
            if not line.startswith("#"):
                break
            comment.append(line.lstrip("#").strip())
        about = " ".join(comment)
        about = about[: about.find(". ") + 1] if ". " in about else about
        lines += textwrap.wrap(about, 100, initial_indent=f"  {name:8s} ", subsequent_indent=" " * 11) or [f"  {name}"]
    lines += [""] + textwrap.wrap(
        f"config keys are documented in {CONFIG_DOCS} (and in fedlora_jax/config.py); 'fedlora-jax config "
        "[CONFIG] [--set KEY=VALUE ...]' prints every key of a config with its default.",
        100,
        break_on_hyphens=False,
    )
    return "\n".join(lines)


def _config_args(s, what: str = "run") -> None:
    s.add_argument(
        "config",
        nargs="?",
        default=None,
        help="YAML file or preset name (default: default; with run --resume, the run folder's own config.yaml); "
        "the presets are listed in 'fedlora-jax run --help'",
    )
    s.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config key of the {what}, e.g. --set fl.rounds=50 (repeatable; value parsed as YAML)",
    )


JSON_HELP = "print one JSON line instead of text"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fedlora-jax", description=DESCRIPTION)
    p.add_argument("--version", action="version", version=f"%(prog)s {version()}", help="print the version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", help="one of:")

    s = sub.add_parser("run", help="run a federated simulation (default: the offline default config)")
    s.description = "Run a federated simulation: every round's clients, DP mechanism, aggregation and evaluation."
    s.epilog = _presets_epilog()
    s.formatter_class = argparse.RawDescriptionHelpFormatter
    _config_args(s)
    s.add_argument("--out", help="run folder (default: runs/NAME)")
    s.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    s.add_argument(
        "--overwrite", action="store_true", help="replace the run in --out (only a folder holding a run of this tool)"
    )
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    s.set_defaults(fn=_cmd_run)

    s = sub.add_parser("config", help="print a resolved config with every default, as YAML (what run writes)")
    s.description = "Print the resolved config (preset or file, --set overrides, every default) as run writes it."
    s.epilog = _presets_epilog()
    s.formatter_class = argparse.RawDescriptionHelpFormatter
    _config_args(s, "config")
    s.set_defaults(fn=_cmd_config)

    s = sub.add_parser("generate", help="generate text from a model, run folder or adapter (KV-cache decoding)")
    s.description = (
        "Answer or continue a prompt with a model (+ LoRA adapter): greedy at temperature 0, sampled otherwise; "
        "stops at the tokenizer's end-of-sequence token."
    )
    s.add_argument(
        "model",
        help="a preset or config file (its model), a model source (HF folder, hub id, GGUF file, 'default' = "
        "offline SmolLM2-135M-Instruct), a run folder (its final adapter) or a PEFT adapter folder",
    )
    s.add_argument("--adapter", help="a PEFT LoRA adapter folder to apply to MODEL (e.g. a run's adapter/)")
    s.add_argument(
        "--prompt", required=True, help="the user's message (or the text to continue, with --no-chat-template)"
    )
    s.add_argument("--max-new-tokens", type=int, default=128, help="most tokens to generate (default: 128)")
    s.add_argument(
        "--temperature", type=float, default=0.0, help="0 = greedy (default); above 0 samples from softmax(logits / T)"
    )
    s.add_argument("--seed", type=int, default=0, help="seed of the sampling (the 'generation' randomness domain)")
    s.add_argument(
        "--no-chat-template",
        action="store_true",
        help="tokenize the prompt as plain text (default: a user turn of the tokenizer's chat template, if it has one)",
    )
    s.add_argument("--json", action="store_true", help=JSON_HELP + " (text, token ids, timings)")
    s.set_defaults(fn=_cmd_generate)

    s = sub.add_parser("score", help="mean token NLL and perplexity of a text under a model (+ adapter)")
    s.add_argument("model", help="HF folder, hub id, GGUF file, or 'default' (offline SmolLM2-135M-Instruct)")
    s.add_argument("--adapter", help="a PEFT LoRA adapter folder")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--text", help="the text to score")
    g.add_argument("--file", help="a UTF-8 text file to score")
    s.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype (default: float32)"
    )
    s.add_argument("--json", action="store_true", help=JSON_HELP)
    s.set_defaults(fn=_cmd_score)

    s = sub.add_parser("privacy", help="privacy calculator: epsilon of a planned run, or the noise for a target")
    s.add_argument("--mode", choices=list(_dp_modes()), default="local", help="the DP mechanism (default: local)")
    s.add_argument("--noise-multiplier", type=float, help="sigma / C")
    s.add_argument("--sigma", type=float, help="noise standard deviation (with --clip; the multiplier is sigma / C)")
    s.add_argument("--clip", type=float, help="the clipping norm C that --sigma is relative to")
    s.add_argument("--tensors", type=int, default=1, help="local: separately clipped tensors per release")
    s.add_argument("--rounds", type=int, default=1, help="rounds of the run (default: 1)")
    s.add_argument("--clients", type=int, help="clients in the federation")
    s.add_argument("--clients-per-round", type=int, help="clients sampled each round (needs --clients)")
    s.add_argument("--sampling-rate", type=float, help="central: probability that a client takes part in a round")
    s.add_argument(
        "--participations",
        type=int,
        help="local/dpsgd: rounds one client takes part in (default: the most-sampled client of the "
        "seeded schedule given --clients and --clients-per-round; else every round)",
    )
    s.add_argument("--seed", type=int, default=0, help="the run's seed: its client sampling schedule")
    s.add_argument(
        "--sampling",
        choices=["uniform", "poisson"],
        default="uniform",
        help="client sampling of the schedule (as fl.sampling)",
    )
    s.add_argument("--local-steps", type=int, default=1, help="dpsgd: local steps per participation (default: 1)")
    s.add_argument(
        "--batch-sampling-rate", type=float, help="dpsgd: Poisson rate of a batch (batch size / client examples)"
    )
    s.add_argument("--delta", type=float, default=1e-5, help="the delta epsilon holds at (default: 1e-5)")
    s.add_argument(
        "--neighbouring",
        choices=["replace-one", "add-remove"],
        help="neighbouring relation (default: replace-one for local, add-remove for central and dpsgd)",
    )
    s.add_argument("--target-epsilon", type=float, help="print the noise multiplier that meets it")
    s.add_argument("--json", action="store_true", help=JSON_HELP)
    s.set_defaults(fn=_cmd_privacy)

    s = sub.add_parser("data", help="load, tokenize and partition as a run would; print the summary")
    _config_args(s)
    s.add_argument("--json", action="store_true", help=JSON_HELP)
    s.set_defaults(fn=_cmd_data)

    s = sub.add_parser("plan", help="memory per chunk of clients and the largest chunk that fits a device")
    _config_args(s)
    s.add_argument("--device-memory", type=float, help="device memory in GiB")
    s.add_argument("--measure", action="store_true", help="also compile the round and read XLA's memory analysis")
    s.add_argument("--json", action="store_true", help=JSON_HELP)
    s.set_defaults(fn=_cmd_plan)

    s = sub.add_parser("eval", help="evaluate a run folder or a PEFT adapter")
    s.add_argument("target", help="run folder (config.yaml + adapter/) or PEFT adapter folder")
    s.add_argument(
        "--task", action="append", choices=["loss", "exact_match", "multiple_choice"], help="repeatable; default: loss"
    )
    s.add_argument("--data", help="multiple_choice: question/choices/answer file or hub id, or 'synthetic'")
    s.add_argument("--model", help="base model of an adapter folder (default: its base_model_name_or_path)")
    s.add_argument("--limit", type=int, help="examples to evaluate (default: the task's)")
    s.add_argument("--max-new-tokens", type=int, default=16, help="exact_match: tokens per answer (default: 16)")
    s.add_argument("--json", action="store_true", help=JSON_HELP)
    s.set_defaults(fn=_cmd_eval)

    s = sub.add_parser(
        "audit",
        help="empirical privacy audit: a lower bound on epsilon from the run's own release "
        "path, beside the accountant's upper bound (exit 1 if it exceeds it)",
    )
    _config_args(s, "audited run")
    s.add_argument("--trials", type=int, default=4000, help="games played, half with the canary (>= 100)")
    s.add_argument(
        "--compositions",
        type=int,
        help="participations (local, dpsgd) or rounds (central) the game composes (default: the run's)",
    )
    s.add_argument(
        "--confidence", type=float, default=0.95, help="confidence of the empirical lower bound (default: 0.95)"
    )
    s.add_argument("--seed", type=int, help="seed of the audit's randomness domain (default: the config's seed)")
    s.add_argument("--json", action="store_true", help=JSON_HELP)
    s.set_defaults(fn=_cmd_audit)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a command-line mistake already printed on one line
        return e.code if isinstance(e.code, int) else 2
    # the CLI's output habits hold for this call only: a library caller's logging is left as it was
    absl, ours = logging.getLogger("absl"), logging.getLogger("fedlora_jax")
    saved = (absl.level, list(ours.handlers), ours.level, ours.propagate, warnings.formatwarning)
    # dp-accounting's RDP logs every order it excludes at WARNING through absl; keep the CLI readable
    absl.setLevel(logging.ERROR)
    # a warning is one line on stderr (not the file, line number and source line)
    warnings.formatwarning = lambda message, category, *a, **k: f"warning: {message}\n"
    if not ours.handlers:  # diagnostics (e.g. "compiling the round") on stderr
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        ours.addHandler(handler)
        ours.setLevel(logging.INFO)
        ours.propagate = False  # one line, not again via the root logger
    try:
        return args.fn(args)
    except UserError as e:
        print(f"fedlora-jax {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C (the first one finishes the round and stops cleanly)
        print(f"fedlora-jax {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        absl.setLevel(saved[0])
        ours.handlers[:] = saved[1]
        ours.setLevel(saved[2])
        ours.propagate = saved[3]
        warnings.formatwarning = saved[4]


if __name__ == "__main__":
    sys.exit(main())
