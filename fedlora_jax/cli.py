"""Command-line entry point: parse, build, call. No algorithm logic lives here."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from typing import NoReturn

# transformers prints "PyTorch was not found" on every torch-free start; torch is not needed here
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from .commands.common import CONFIG_DOCS, dumps, presets_epilog  # noqa: F401  (dumps re-exported)
from .commands.models import _cmd_eval, _cmd_generate, _cmd_score
from .commands.privacy import _cmd_audit, _cmd_privacy
from .commands.runs import _cmd_config, _cmd_data, _cmd_plan, _cmd_run
from .core.errors import UserError


class _CurrentStderr(logging.StreamHandler):
    """A handler that writes to whatever sys.stderr is at the time (not the one of the first call)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


class _Parser(argparse.ArgumentParser):
    """Command-line mistakes as one line (`fedlora-jax CMD: error: ...`) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def _dp_modes() -> tuple[str, ...]:
    from .privacy import mechanisms as modes

    return modes.dp_names()


def _registries() -> dict[str, tuple[str, ...]]:
    """The CLI's choice lists, each from its registry (never a copy that could drift)."""
    from .evaluation import TASKS
    from .federated.sampling import SAMPLINGS
    from .models.config import DTYPES
    from .privacy.accounting.gaussian import NEIGHBOURING

    return {"dtype": DTYPES, "sampling": SAMPLINGS, "neighbouring": NEIGHBOURING, "task": TASKS}


DESCRIPTION = (
    "Simulate differentially private federated LoRA fine-tuning of language models in JAX, with honest "
    "privacy accounting. Run 'fedlora-jax COMMAND --help' for a command's options."
)


def version() -> str:
    """The installed distribution's version (package metadata), else the package's __version__."""
    import importlib.metadata

    try:
        return importlib.metadata.version("fedlora-jax")
    except importlib.metadata.PackageNotFoundError:
        from . import __version__

        return __version__


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
    reg = _registries()
    p.add_argument("--version", action="version", version=f"%(prog)s {version()}", help="print the version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", help="one of:")

    s = sub.add_parser("run", help="run a federated simulation (default: the offline default config)")
    s.description = "Run a federated simulation: every round's clients, DP mechanism, aggregation and evaluation."
    s.epilog = presets_epilog()
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
    s.epilog = presets_epilog()
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
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", help="the user's message (or the text to continue, with --no-chat-template)")
    g.add_argument(
        "--messages",
        help='a multi-turn prompt: a JSON file holding a list of {"role": system|user|assistant, "content": ...} '
        "turns, ending with a user turn",
    )
    s.add_argument("--system", help="a system turn before the conversation (a system prompt)")
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
    s.add_argument("--dtype", default="float32", choices=list(reg["dtype"]), help="compute dtype (default: float32)")
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
        choices=list(reg["sampling"]),
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
        choices=list(reg["neighbouring"]),
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
    s.add_argument("--task", action="append", choices=list(reg["task"]), help="repeatable; default: loss")
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
