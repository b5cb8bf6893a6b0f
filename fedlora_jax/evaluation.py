"""Evaluation of a (base, adapter) pair: text scoring (NLL, perplexity)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from .models import Definition, token_nll


@functools.partial(jax.jit, static_argnums=0)
def _nll_sum(definition, base, lora, tokens, mask):
    nll, w = token_nll(definition, base, lora, tokens, mask)
    return jnp.sum(nll * w), jnp.sum(w)


def score_ids(definition: Definition, base, lora, ids: list[int]) -> dict:
    """Mean NLL and perplexity of each token given the ones before it (all tokens but the first
    are scored). The sequence is padded to a power of two so similar lengths share one compile."""
    n = len(ids)
    limit = definition.config.max_position_embeddings
    if n < 2:
        raise ValueError(f"text has {n} token(s); scoring needs at least 2")
    if n > limit:
        raise ValueError(f"text has {n} tokens, more than the model's {limit} positions; shorten it")
    width = min(max(16, 1 << (n - 1).bit_length()), limit)
    tokens = np.zeros((1, width), np.int32)
    tokens[0, :n] = ids
    mask = np.zeros((1, width), np.int32)
    mask[0, :n] = 1
    total, count = _nll_sum(definition, base, lora, jnp.asarray(tokens), jnp.asarray(mask))
    nll = float(total) / float(count)
    return {"nll": nll, "perplexity": math.exp(nll), "n_tokens": int(count), "token_ids": list(map(int, ids))}
