"""Text generation for a model or a run: prompts (a text or a conversation), loading a base with
its adapter from a run folder or an adapter folder, and the summary the CLI prints. The decoding
itself (KV cache, static shapes, seeded sampling) is evaluation/decoding.py.

    ids = prompt_ids(tokenizer, "What is DP?")                      # chat template when it has one
    out = generate_ids(definition, base, lora, [ids], 64, eos_ids=(tokenizer.eos_token_id,))
    tokenizer.decode(out.tokens[0])
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..core.errors import UserError
from ..evaluation.decoding import Generated, generate_ids  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..core.pytypes import Tree
    from ..models import Definition


def prompt_ids(tokenizer: PreTrainedTokenizerBase, text: str, chat_template: bool = True) -> list[int]:
    """The prompt's token ids: as one user turn of the tokenizer's chat template (with the assistant's
    turn opened) when it has one and `chat_template`, else the text with the tokenizer's special tokens."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def read_messages(path: str) -> list[dict]:
    """A conversation to answer from a JSON file: a list of {"role", "content"} turns (roles system,
    user, assistant; content text) ending with a user turn. A UserError names the file and the turn."""
    import json

    from ..data.chat import ROLES

    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(
            f"--messages {path!r} is not a file; give a JSON file holding a list of {{role, content}} turns"
        )
    try:
        turns = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(
            f"--messages {path!r} is not UTF-8 JSON ({e}); give a list of {{role, content}} turns"
        ) from None
    if not isinstance(turns, list) or not turns:
        raise UserError(f"--messages {path!r} must hold a non-empty JSON list of {{role, content}} turns")
    for j, t in enumerate(turns, 1):
        if not isinstance(t, dict) or t.get("role") not in ROLES or not isinstance(t.get("content"), str):
            raise UserError(
                f'--messages {path!r} turn {j} is {t!r}; each turn must be {{"role": system|user|assistant, '
                f'"content": text}}'
            )
    if turns[-1]["role"] != "user":
        raise UserError(
            f"--messages {path!r} ends with a turn of role {turns[-1]['role']!r}; the model answers the last "
            "user turn, so end the conversation with one"
        )
    return [{"role": t["role"], "content": t["content"]} for t in turns]


def chat_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict], system: str | None = None) -> list[int]:
    """The token ids of a conversation (with `system` as its system turn when it has none) rendered by
    the tokenizer's chat template with the assistant's turn opened; a tokenizer without one uses the
    ChatML fallback that training uses (data.chat.FALLBACK_CHAT_TEMPLATE)."""
    from ..data.chat import _render, chat_template, with_system

    if system is not None and messages and messages[0]["role"] == "system":
        raise UserError("--system is given and the conversation already opens with a system turn; keep one of them")
    text = _render(tokenizer, chat_template(tokenizer), with_system(messages, system), True, "the prompt")
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def eos_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    return () if tokenizer.eos_token_id is None else (int(tokenizer.eos_token_id),)


def load(model: str, adapter: str | None = None) -> tuple[Definition, Tree, Tree, PreTrainedTokenizerBase, str]:
    """(definition, base, lora, tokenizer, description) for `generate`'s MODEL: a run folder (its final
    adapter or merged model), a PEFT adapter folder (on its base model), a config file or preset (its
    model), or a model source (HF folder, GGUF file, hub id, 'default'); plus an optional --adapter."""
    from ..adapters import peft_io
    from ..config.run_config import load_config, preset_names
    from ..models import abstract_model

    path = Path(model).expanduser()
    is_run = path.is_dir() and (path / "config.yaml").is_file()
    is_adapter = path.is_dir() and (path / peft_io.ADAPTER_CONFIG).is_file()
    if adapter is not None and (is_run or is_adapter):
        raise UserError(
            f"{model!r} brings its own adapter; --adapter is for a base model (a preset, config or model source)"
        )
    if is_run or is_adapter:
        from .artifacts import load_for_eval

        definition, base, lora, tok, _ = load_for_eval(model)
        return definition, base, lora, tok, f"{'run' if is_run else 'adapter'} {model}"
    is_config = path.is_file() and path.suffix in (".yaml", ".yml")
    if not path.exists() and model not in preset_names() and model != "default" and model.count("/") != 1:
        raise UserError(
            f"model {model!r} is not an existing run folder, adapter folder, config file, model folder or GGUF "
            f"file, nor a preset ({', '.join(preset_names())}) or hub id (org/name)"
        )
    lc = None
    if adapter is not None:  # a broken adapter fails before the model is loaded
        if not Path(adapter).is_dir():
            raise UserError(
                f"--adapter {adapter!r} is not a folder; pass a PEFT adapter folder (adapter_config.json and "
                "adapter_model.safetensors), such as a run's adapter/"
            )
        lc = peft_io.read_peft_config(adapter)
        peft_io.check_peft_weights(adapter)
    if is_config or (not path.exists() and model in preset_names()):
        from ..models.factory import build_model

        definition, base, _, tok, source = build_model(load_config(model))
        config = definition.config
    else:
        from ..models.hub import load_model

        lm = load_model(model)
        base, tok, source, config = lm.base, lm.tokenizer, lm.source, lm.config
    if tok is None:
        raise UserError(f"model {model!r} has no tokenizer files; cannot tokenize the prompt")
    if lc is None:
        return abstract_model(config, None)[0], base, {}, tok, source
    try:
        lc.check(config)
        definition = abstract_model(config, lc)[0]
        lora = peft_io.load_peft(adapter, definition)
    except ValueError as e:
        raise UserError(f"adapter {adapter!r} does not match model {model!r}: {e}") from e
    return definition, base, lora, tok, f"{source} + adapter {adapter}"


def summary(result: Generated, tokenizer: PreTrainedTokenizerBase, prompt_tokens: int, description: str) -> dict:
    """The JSON record of one generation (one prompt)."""
    return {
        "model": description,
        "prompt_tokens": prompt_tokens,
        "token_ids": result.tokens[0],
        "text": tokenizer.decode(result.tokens[0], skip_special_tokens=True),
        "stopped": result.stopped[0],
        "prefill_seconds": result.prefill_seconds,
        "first_step_seconds": result.first_step_seconds,
        "decode_seconds": result.decode_seconds,
        "tokens_per_second": result.tokens_per_second,
    }


__all__ = ["Generated", "generate_ids", "prompt_ids", "eos_ids", "load", "summary"]
