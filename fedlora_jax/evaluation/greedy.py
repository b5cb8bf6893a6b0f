"""Greedy decoding with static shapes (no KV cache: the short answers of the verifiable tasks) and
exact match of the greedy answers against references, such as a run's held-out responses."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from ..core.errors import UserError
from ..core.pytypes import Tree

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..data.tokenize import TokenizedData
    from ..models import Definition


def _pad_rows(rows: list[list[int]], width: int, pad: int):
    tokens = np.full((len(rows), width), pad, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return tokens, mask


@functools.partial(jax.jit, static_argnums=(0, 5))
def _greedy(definition, base, lora, tokens, lengths, max_new):
    """Greedy decoding with static shapes: each step recomputes the padded sequence (no KV cache;
    fine for the short answers of the verifiable tasks) and writes one token per row."""
    from ..models import apply

    rows = jnp.arange(tokens.shape[0])

    def step(i, toks):
        pos = lengths + i
        mask = (jnp.arange(toks.shape[1])[None, :] < pos[:, None]).astype(jnp.int32)
        logits = apply(definition, base, lora, toks, mask)
        nxt = jnp.argmax(logits[rows, pos - 1], axis=-1).astype(toks.dtype)
        return toks.at[rows, pos].set(nxt)

    return jax.lax.fori_loop(0, max_new, step, tokens)


def greedy_generate(
    definition: Definition,
    base: Tree,
    lora: Tree,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_id: int,
    pad_id: int = 0,
    batch_size: int = 32,
) -> list[list[int]]:
    """Greedy continuations of token-id prompts, cut at the first EOS (excluded)."""
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    longest = max(len(p) for p in prompts) + max_new_tokens
    limit = definition.config.max_position_embeddings
    if longest > limit:
        raise UserError(f"prompt + {max_new_tokens} new tokens = {longest} exceeds the model's {limit} positions")
    width = 1 << (longest - 1).bit_length()
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))  # one static batch shape
        tokens, _ = _pad_rows(chunk, width, pad_id)
        lengths = np.array([len(p) for p in chunk], np.int32)
        gen = np.asarray(_greedy(definition, base, lora, jnp.asarray(tokens), jnp.asarray(lengths), max_new_tokens))
        for row, n in zip(gen[: len(prompts[start : start + batch_size])], lengths):
            new = row[n : n + max_new_tokens].tolist()
            out.append(new[: new.index(eos_id)] if eos_id in new else new)
    return out


def greedy_answers(
    definition: Definition,
    base: Tree,
    lora: Tree,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[list[int]],
    max_new_tokens: int = 16,
) -> list[str]:
    """The decoded, whitespace-stripped greedy continuation of each token-id prompt."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gens = greedy_generate(definition, base, lora, prompt_ids, max_new_tokens, tokenizer.eos_token_id, pad)
    return [tokenizer.decode(g, skip_special_tokens=True).strip() for g in gens]


def exact_match(
    definition: Definition,
    base: Tree,
    lora: Tree,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    answers: list[str],
    max_new_tokens: int = 16,
) -> dict:
    """Share of prompts whose greedy answer equals the reference (whitespace-stripped)."""
    ids = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    texts = greedy_answers(definition, base, lora, tokenizer, ids, max_new_tokens)
    hits = [t == a.strip() for t, a in zip(texts, answers)]
    return {"exact_match": float(np.mean(hits)) if hits else 0.0, "n": len(hits), "predictions": texts}


def held_out_prompts(
    tokenizer: PreTrainedTokenizerBase, data: TokenizedData, limit: int
) -> tuple[list[list[int]], list[str]]:
    """(prompt ids, reference answer texts) of the first `limit` tokenized held-out examples."""
    n = min(limit, len(data))
    prompts, answers = split_prompt_answer(
        data.tokens[:n], data.attention_mask[:n], data.loss_mask[:n], tokenizer.eos_token_id
    )
    return prompts, [tokenizer.decode(a, skip_special_tokens=True).strip() for a in answers]


def split_prompt_answer(
    tokens: np.ndarray, attention_mask: np.ndarray, loss_mask: np.ndarray, eos_id: int
) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, answer ids without EOS) of tokenized examples (response = the loss-masked part)."""
    prompts, answers = [], []
    for t, a, m in zip(tokens, attention_mask, loss_mask):
        start = int(np.argmax(m)) if m.any() else int(a.sum())
        end = int(a.sum())
        prompts.append(t[:start].tolist())
        ans = t[start:end].tolist()
        answers.append(ans[:-1] if ans and ans[-1] == eos_id else ans)
    return prompts, answers
