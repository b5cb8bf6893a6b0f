"""The commands on a model, run folder or PEFT adapter: score, eval and generate."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from ..core.errors import UserError
from .common import _finite, _seed, dumps


def _precheck_eval_target(target: str) -> None:
    """Fail on a broken run folder or adapter before any model is loaded."""
    from ..adapters import peft_io
    from ..config.run_config import load_config

    t = Path(target)
    if not t.exists():
        raise UserError(f"{target!r} does not exist; pass a run folder or a PEFT adapter folder")
    if (t / "config.yaml").is_file():
        load_config(str(t / "config.yaml"))
        if (t / "adapter").is_dir():
            peft_io.read_peft_config(t / "adapter")
            peft_io.check_peft_weights(t / "adapter")
    elif (t / peft_io.ADAPTER_CONFIG).exists():
        peft_io.read_peft_config(t)
        peft_io.check_peft_weights(t)


def _cmd_score(args) -> int:
    from ..adapters import peft_io
    from ..data.loading import read_text
    from ..evaluation import score_ids
    from ..models import abstract_model
    from ..models.hub import load_model

    text = read_text(args.file, "--file") if args.file is not None else args.text
    if not text.strip():
        raise UserError(
            f"{'--file ' + repr(args.file) if args.file is not None else '--text'} is empty; give a text to score"
        )
    if args.adapter:  # a broken adapter fails before the model is loaded
        lc = peft_io.read_peft_config(args.adapter)
        peft_io.check_peft_weights(args.adapter)
    lm = load_model(args.model, dtype=args.dtype)
    if lm.tokenizer is None:
        raise UserError(f"model {args.model!r} has no tokenizer files; cannot tokenize the text")
    definition, lora = lm.definition, lm.lora
    if args.adapter:
        lc.check(lm.config)
        definition = abstract_model(lm.config, lc)[0]
        lora = peft_io.load_peft(args.adapter, definition)
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


def _cmd_eval(args) -> int:
    from ..evaluation import LOCAL_SUFFIXES, load_multiple_choice, run_task

    args.task = args.task or ["loss"]
    _finite("--limit", args.limit, low=1)
    _finite("--max-new-tokens", args.max_new_tokens, low=1)
    if args.data is not None and "multiple_choice" not in args.task:
        raise UserError("--data is the multiple-choice data; it is used only with --task multiple_choice")
    _precheck_eval_target(args.target)
    if args.data is not None and Path(args.data).suffix in LOCAL_SUFFIXES:
        load_multiple_choice(args.data, args.limit)  # a bad file fails before the model is loaded
    from ..runs.artifacts import load_for_eval

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


def _cmd_generate(args) -> int:
    from ..adapters import peft_io
    from ..runs import generate

    _finite("--max-new-tokens", args.max_new_tokens, low=1, what="the number of tokens to generate")
    _finite("--temperature", args.temperature, low=0, what="the sampling temperature (0 is greedy)")
    _seed("--seed", args.seed)
    if args.prompt is not None and not args.prompt.strip():
        raise UserError("--prompt is empty; give the text the model should answer or continue")
    if args.no_chat_template and (args.messages is not None or args.system is not None):
        raise UserError("--no-chat-template tokenizes plain text; --system and --messages need the chat template")
    messages = generate.read_messages(args.messages) if args.messages is not None else None  # before loading
    t = Path(args.model)
    if t.is_dir() and ((t / "config.yaml").is_file() or (t / peft_io.ADAPTER_CONFIG).is_file()):
        _precheck_eval_target(args.model)  # a broken run or adapter folder fails before any model is loaded
    definition, base, lora, tok, desc = generate.load(args.model, args.adapter)
    if messages is None and args.system is None:
        ids = generate.prompt_ids(tok, args.prompt, chat_template=not args.no_chat_template)
    else:
        ids = generate.chat_ids(tok, messages or [{"role": "user", "content": args.prompt}], args.system)
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
