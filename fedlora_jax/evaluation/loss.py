"""Scoring text by the model: THE held-out loss (mean NLL per response token) and the NLL and
perplexity of one token sequence."""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from ..core.errors import UserError
from ..core.pytypes import Tree
from ..models import Definition, token_nll

if TYPE_CHECKING:
    from ..data.tokenize import TokenizedData


@functools.partial(jax.jit, static_argnums=0)
def _masked_sum(definition, base, lora, tokens, attn, loss_mask=None):
    """(sum of NLL over the weighted positions, their count)."""
    nll, w = token_nll(definition, base, lora, tokens, attn, loss_mask)
    return jnp.sum(nll * w), jnp.sum(w)


def heldout_eval(
    definition: Definition, base: Tree, lora: Tree, data: TokenizedData, n: int, batch_size: int = 16
) -> dict:
    """THE held-out loss (one definition, used by the run and by `fedlora-jax eval`): mean NLL per
    response token over the first n examples of `data` (token-weighted, every example once), with
    the n examples and the response tokens it is over. Batches have one static shape (batch_size,
    independent of the training batch); the last is padded with loss-masked rows."""
    n = min(int(n), len(data))
    if n < 1:
        raise UserError("the held-out split is empty; no loss to evaluate")
    total, count = 0.0, 0.0
    for i in range(0, n, batch_size):
        rows = np.arange(i, i + batch_size)
        real = rows < n
        rows = np.where(real, rows, 0)
        loss_mask = data.loss_mask[rows] * real[:, None]
        s, c = _masked_sum(
            definition,
            base,
            lora,
            jnp.asarray(data.tokens[rows]),
            jnp.asarray(data.attention_mask[rows]),
            jnp.asarray(loss_mask),
        )
        total, count = total + float(s), count + float(c)
    return {"loss": total / max(count, 1.0), "n": n, "tokens": int(count)}


def heldout_loss(
    definition: Definition, base: Tree, lora: Tree, data: TokenizedData, n: int, batch_size: int = 16
) -> float:
    """The held-out loss alone (see heldout_eval)."""
    return heldout_eval(definition, base, lora, data, n, batch_size)["loss"]


def score_ids(definition: Definition, base: Tree, lora: Tree, ids: list[int]) -> dict:
    """Mean NLL and perplexity of each token given the ones before it (all tokens but the first
    are scored). The sequence is padded to a power of two so similar lengths share one compile."""
    n = len(ids)
    limit = definition.config.max_position_embeddings
    if n < 2:
        raise UserError(f"text has {n} token(s); scoring needs at least 2")
    if n > limit:
        raise UserError(f"text has {n} tokens, more than the model's {limit} positions; shorten it")
    width = min(max(16, 1 << (n - 1).bit_length()), limit)
    tokens = np.zeros((1, width), np.int32)
    tokens[0, :n] = ids
    mask = np.zeros((1, width), np.int32)
    mask[0, :n] = 1
    total, count = _masked_sum(definition, base, lora, jnp.asarray(tokens), jnp.asarray(mask))
    nll = float(total) / float(count)
    return {"nll": nll, "perplexity": math.exp(nll), "n_tokens": int(count), "token_ids": list(map(int, ids))}
