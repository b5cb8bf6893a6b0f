"""Text generation with a KV cache: one prefill of the prompt, then one jitted decode step per token.

    ids = prompt_ids(tokenizer, "What is DP?")                      # chat template when it has one
    out = generate_ids(definition, base, lora, [ids], 64, eos_ids=(tokenizer.eos_token_id,))
    tokenizer.decode(out.tokens[0])

Shapes are static: the cache holds `max_len` slots (prompt + new tokens, rounded up to a power of
two), the slot of a token is its position, and attention masks slots by position; so the decode step
compiles once for every token of every prompt in the same bucket (tested). Temperature 0 is greedy;
above 0, token i is drawn with randomness.key(seed, "generation", i). The adapter is applied by the
same LoRA forward as training and evaluation (models.apply_cached).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from . import randomness
from .errors import UserError
from .models import apply, apply_cached, init_cache
from .pytypes import Tree

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from transformers import PreTrainedTokenizerBase

    from .models import Definition


@dataclasses.dataclass
class Generated:
    tokens: list[list[int]]  # new tokens of each prompt, cut before its first EOS (not included)
    stopped: list[str]  # per prompt: "eos" or "max_new_tokens"
    steps: int  # forward calls after the first token (decode steps)
    prefill_seconds: float  # the prompt's forward and the first token (compilation included on a first call)
    first_step_seconds: float  # the first decode step (compilation included on a first call); 0 if none
    decode_seconds: float  # every later decode step

    @property
    def tokens_per_second(self) -> float:
        """Decode throughput per row, from the second decode step on (the first may include compiling)."""
        n = self.steps - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else float("nan")


def _bucket(n: int, low: int = 16) -> int:
    return max(low, 1 << (n - 1).bit_length())


def _choose(logits_bv, key, step, temperature, sample: bool):
    """Greedy (argmax) or a draw from softmax(logits / temperature) with the key of token `step`."""
    if not sample:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    k = jax.random.fold_in(key, step)  # = randomness.key(seed, "generation", step)
    return jax.random.categorical(k, logits_bv / temperature, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _prefill(definition, max_len, sample, base, lora, tokens, lengths, key, temperature):
    """Fill a fresh cache with the right-padded prompts [B, P]; choose each row's first token."""
    b, p = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    mask = positions < lengths[:, None]
    logits, cache = apply_cached(definition, base, lora, tokens, positions, init_cache(definition, b, max_len), mask)
    last = logits[jnp.arange(b), lengths - 1]
    return _choose(last, key, 0, temperature, sample), cache


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(4,))
def _decode_step(definition, sample, base, lora, cache, tokens, positions, step, key, temperature):
    """One token per row at `positions` [B] through the cache (donated: updated in place)."""
    logits, cache = apply_cached(definition, base, lora, tokens[:, None], positions[:, None], cache)
    return _choose(logits[:, 0], key, step, temperature, sample), cache


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(4,))
def _full_step(definition, sample, base, lora, buf, lengths, step, key, temperature):
    """Without a cache: the whole padded sequence [B, M] through the training forward, the next
    token written at each row's length (the reference the cache is tested and benchmarked against)."""
    rows = jnp.arange(buf.shape[0])
    mask = jnp.arange(buf.shape[1])[None, :] < lengths[:, None]
    logits = apply(definition, base, lora, buf, mask)
    nxt = _choose(logits[rows, lengths - 1], key, step, temperature, sample)
    return nxt, buf.at[rows, lengths].set(nxt)


def generate_ids(
    definition: Definition,
    base: Tree,
    lora: Tree,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    eos_ids: Iterable[int | None] = (),
    temperature: float = 0.0,
    seed: int = 0,
    use_cache: bool = True,
    on_token: Callable[[list[list[int]]], object] | None = None,
) -> Generated:
    """Continue each token-id prompt by up to `max_new_tokens` tokens, stopping a row at its first
    token in `eos_ids` (and decoding when every row has stopped). `on_token(tokens)` is called with
    the tokens so far after each step (for streaming). `use_cache=False` re-runs the full forward each
    step (slow; the reference)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("every prompt needs at least one token")
    if int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens}")
    if not math.isfinite(temperature) or temperature < 0:
        raise UserError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    longest = max(len(p) for p in prompts) + max_new_tokens
    limit = definition.config.max_position_embeddings
    if longest > limit:
        raise UserError(
            f"a prompt of {longest - max_new_tokens} tokens + {max_new_tokens} new tokens = {longest} exceeds "
            f"the model's {limit} positions; ask for fewer new tokens or shorten the prompt"
        )
    b, max_len = len(prompts), min(_bucket(longest), limit)
    lengths = np.array([len(p) for p in prompts], np.int32)
    eos = {int(e) for e in eos_ids if e is not None}
    sample = temperature > 0
    key = randomness.key(seed, "generation")
    temp = np.float32(temperature if sample else 1.0)
    out: list[list[int]] = [[] for _ in prompts]
    done = np.zeros(b, bool)

    def record(nxt: np.ndarray) -> None:
        for r, t in enumerate(nxt.tolist()):
            if not done[r]:
                if t in eos:
                    done[r] = True
                else:
                    out[r].append(t)
        if on_token is not None:
            on_token(out)

    t0 = time.perf_counter()
    if use_cache:
        width = min(_bucket(int(lengths.max())), max_len)
        padded = np.zeros((b, width), np.int32)
        for r, p in enumerate(prompts):
            padded[r, : len(p)] = p
        nxt, state = _prefill(definition, max_len, sample, base, lora, padded, lengths, key, temp)
    else:
        state = np.zeros((b, max_len), np.int32)
        for r, p in enumerate(prompts):
            state[r, : len(p)] = p
        nxt, state = _full_step(definition, sample, base, lora, jnp.asarray(state), lengths, np.int32(0), key, temp)
    nxt = np.asarray(nxt)
    t1 = time.perf_counter()
    record(nxt)
    cur, steps, t_first = lengths.copy(), 0, t1
    for i in range(1, max_new_tokens):
        if done.all():
            break
        if use_cache:  # the token just chosen goes in at the row's next position
            nxt, state = _decode_step(definition, sample, base, lora, state, nxt, cur, np.int32(i), key, temp)
        else:
            nxt, state = _full_step(definition, sample, base, lora, state, cur + 1, np.int32(i), key, temp)
        nxt = np.asarray(nxt)
        cur, steps = cur + 1, steps + 1
        if steps == 1:
            t_first = time.perf_counter()
        record(nxt)
    t2 = time.perf_counter()
    stopped = ["eos" if d else "max_new_tokens" for d in done]
    return Generated(out, stopped, steps, t1 - t0, t_first - t1, t2 - t_first)


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

    from .data.chat import ROLES

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
    from .data.chat import _render, chat_template, with_system

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
    from . import lora as lora_lib
    from .config import load_config, preset_names
    from .models import abstract_model

    path = Path(model).expanduser()
    is_run = path.is_dir() and (path / "config.yaml").is_file()
    is_adapter = path.is_dir() and (path / lora_lib.ADAPTER_CONFIG).is_file()
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
        lc = lora_lib.read_peft_config(adapter)
        lora_lib.check_peft_weights(adapter)
    if is_config or (not path.exists() and model in preset_names()):
        from .models.factory import build_model

        definition, base, _, tok, source = build_model(load_config(model))
        config = definition.config
    else:
        from .models.hub import load_model

        lm = load_model(model)
        base, tok, source, config = lm.base, lm.tokenizer, lm.source, lm.config
    if tok is None:
        raise UserError(f"model {model!r} has no tokenizer files; cannot tokenize the prompt")
    if lc is None:
        return abstract_model(config, None)[0], base, {}, tok, source
    try:
        lc.check(config)
        definition = abstract_model(config, lc)[0]
        lora = lora_lib.load_peft(adapter, definition)
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
