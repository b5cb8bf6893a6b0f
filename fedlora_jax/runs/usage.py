"""How to use an exported adapter, as the model card and the README say it: the
lm-evaluation-harness command, and loading it in Python with transformers + PEFT (from a GGUF base
offline, or by the name adapter_config.json holds)."""

from __future__ import annotations

import shlex
from pathlib import Path


def lm_eval_args(pretrained: str, adapter: str, tasks: str, extra_model_args: str = "") -> list[str]:
    """THE lm-evaluation-harness command for an exported adapter (the README's and the card's;
    tests/test_adapters.py runs it): `pretrained` names the base (pretrained=HUB_ID_OR_FOLDER, or
    pretrained=FOLDER,gguf_file=FILE), the adapter's folder gives the adapter and its tokenizer."""
    model_args = f"{pretrained},peft={adapter},tokenizer={adapter}"
    model_args += f",{extra_model_args}" if extra_model_args else ""
    return ["lm_eval", "run", "--model", "hf", "--model_args", model_args, "--tasks", tasks]


def lm_eval_command(pretrained: str, adapter: str, tasks: str) -> str:
    """lm_eval_args as one shell line."""
    return shlex.join(lm_eval_args(pretrained, adapter, tasks))


def gguf_pretrained(path: str) -> str:
    """lm-eval's / transformers' way to name a GGUF file: its folder and its file name."""
    return f"pretrained={Path(path).parent},gguf_file={Path(path).name}"


def python_usage(base: dict, adapter: str) -> list[str]:
    """How to load the adapter in Python (transformers + PEFT): from a GGUF base, offline through the
    GGUF file (transformers reads it with torch and gguf); else by the name adapter_config.json holds
    (a hub id needs the hub or its cache)."""
    if base.get("format") == "gguf" and base.get("local_path"):
        gguf = Path(base["local_path"])
        lines = [
            "```python",
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            "# offline: the GGUF file this run loaded (transformers dequantizes it; needs torch and gguf)",
            f'base = AutoModelForCausalLM.from_pretrained("{gguf.parent}", gguf_file="{gguf.name}")',
            f'model = PeftModel.from_pretrained(base, "{adapter}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{adapter}")',
            "```",
        ]
        if base.get("hub_id"):
            lines += [
                "",
                f'`AutoPeftModelForCausalLM.from_pretrained("{adapter}")` loads the base by its hub id '
                f"{base['hub_id']} instead (online, or from the Hugging Face cache).",
            ]
        return lines
    return [
        "```python",
        "from peft import AutoPeftModelForCausalLM",
        "from transformers import AutoTokenizer",
        f'model = AutoPeftModelForCausalLM.from_pretrained("{adapter}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{adapter}")',
        "```",
    ] + (
        ["", f"The base is the hub model {base['hub_id']}: loading it needs the hub or the Hugging Face cache."]
        if base.get("hub_id")
        else []
    )


def _usage(base: dict, merged: bool) -> list[str]:
    name = base.get("name_or_path") or "BASE"
    gguf_local = base.get("local_path") if base.get("format") == "gguf" else None
    if base.get("format") == "gguf" and not base.get("hub_id"):
        pretrained = gguf_pretrained(name)
    else:
        pretrained = f"pretrained={name}"
    vocab, ntok = base.get("vocab_size"), base.get("tokenizer_size")
    resize = (
        [
            f"Note: the tokenizer has {ntok} tokens and the model {vocab} embeddings; lm-eval's `peft=` loader "
            f"resizes the embeddings to {ntok}, which changes the model, so its figures differ from fedlora-jax's.",
            "",
        ]
        if vocab and ntok and vocab != ntok
        else []
    )
    offline = []
    if gguf_local and base.get("hub_id"):
        offline = [
            f"`pretrained={base['hub_id']}` is the hub id (online, or from the Hugging Face cache); offline, name the "
            "GGUF file this run loaded (transformers needs torch and gguf to read it):",
            "",
            "```",
            lm_eval_command(gguf_pretrained(gguf_local), "THIS_FOLDER", "TASKS"),
            "```",
            "",
        ]
    if merged:
        return [
            "## Use",
            "```",
            shlex.join(
                ["lm_eval", "run", "--model", "hf", "--model_args", "pretrained=THIS_FOLDER"] + ["--tasks", "TASKS"]
            ),
            "fedlora-jax eval RUN_FOLDER --task multiple_choice --data QUESTIONS.jsonl",
            "```",
        ]
    return [
        "## Use",
        *python_usage(base, "THIS_FOLDER"),
        "",
        "```",
        lm_eval_command(pretrained, "THIS_FOLDER", "TASKS"),
        "fedlora-jax eval THIS_FOLDER --task multiple_choice --data QUESTIONS.jsonl",
        "```",
        "",
        *offline,
        *resize,
        "lm-eval's `acc`, `acc_norm` (per character) and `acc_bytes` are fedlora-jax's `accuracy`, "
        "`accuracy_norm` and `accuracy_bytes` on a task whose `target_delimiter` is empty.",
    ]
