"""Decoding with a KV cache: one prefill of the prompt, then one jitted decode step per token.

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
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from ..core import randomness
from ..core.errors import UserError
from ..core.pytypes import Tree
from ..models import apply, apply_cached, init_cache

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from ..models import Definition


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
