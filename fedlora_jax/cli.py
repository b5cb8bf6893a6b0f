"""Command-line entry point: parse, build, call. No algorithm logic lives here."""

from __future__ import annotations

import argparse
import json
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
            raise ValueError(f"--file {args.file!r} does not exist")
        text = path.read_text()
    else:
        text = args.text
    lm = load_model(args.model, dtype=args.dtype)
    if lm.tokenizer is None:
        raise ValueError(f"model {args.model!r} has no tokenizer files; cannot tokenize the text")
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
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"fedlora-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
