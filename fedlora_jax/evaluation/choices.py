"""Multiple choice scored as lm-evaluation-harness scores it (same tokenization, same metric names),
and the question / choices / answer data it reads (a local file, a hub dataset, or 'synthetic')."""

from __future__ import annotations

import functools
import json
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from ..core import randomness
from ..core.errors import UserError
from ..core.pytypes import Tree
from ..models import Definition, token_nll
from .greedy import _pad_rows

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@functools.partial(jax.jit, static_argnums=0)
def _choice_nll(definition, base, lora, tokens, mask, loss_mask):
    nll, w = token_nll(definition, base, lora, tokens, mask, loss_mask)
    return jnp.sum(nll * w, axis=1), jnp.sum(w, axis=1)


def lm_eval_pair(tokenizer: PreTrainedTokenizerBase, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-evaluation-harness (0.4) encodes a loglikelihood request
    for a causal model, so that our log-likelihoods are its log-likelihoods: trailing whitespace of the
    context moves to the continuation, the whole text is encoded once (the tokenizer's special tokens
    included) and split after the context's own encoding; an empty context is BOS (else EOS)."""
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if context == "":
        if prefix is None:
            raise UserError("a question is empty and the tokenizer has no BOS or EOS token to condition on")
        cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        return ([prefix], cont) if not cont or cont[0] != prefix else (cont[:1], cont[1:])
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation

    def encode(text: str) -> list[int]:
        # lm-eval does not add special tokens twice when the text already starts with the prefix token
        bos = tokenizer.decode([prefix]) if prefix is not None else None
        return tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]

    whole, ctx = encode(context + continuation), encode(context)
    return ctx, whole[len(ctx) :]


def choice_logprobs(
    definition: Definition, base: Tree, lora: Tree, tokenizer: PreTrainedTokenizerBase, prompt: str, choices: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """(sum of log p(choice tokens | prompt), number of choice tokens) for each choice, the prompt and
    choice tokenized as lm-evaluation-harness does (lm_eval_pair)."""
    rows, spans = [], []
    for c in choices:
        ctx, ids = lm_eval_pair(tokenizer, prompt, c)
        if not ids:
            raise UserError(f"choice {c!r} tokenizes to nothing after the question")
        rows.append(ctx + ids)
        spans.append((len(ctx), len(ctx) + len(ids)))
    width = 1 << (max(map(len, rows)) - 1).bit_length()
    tokens, mask = _pad_rows(rows, max(width, 8), 0)
    loss_mask = np.zeros_like(mask)
    for i, (a, b) in enumerate(spans):
        loss_mask[i, a:b] = 1
    total, count = _choice_nll(definition, base, lora, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(loss_mask))
    return -np.asarray(total), np.asarray(count)


def multiple_choice(
    definition: Definition,
    base: Tree,
    lora: Tree,
    tokenizer: PreTrainedTokenizerBase,
    questions: list[str],
    choices: list[list[str]],
    answers: list[int],
) -> dict:
    """Accuracy of picking the choice with the highest log-likelihood, the way MMLU/BBH/CRASS-style
    benchmarks are scored, with lm-evaluation-harness's names and definitions: `accuracy` (its acc),
    `accuracy_norm` (its acc_norm: log-likelihood per character of the choice), `accuracy_bytes` (its
    acc_bytes: per UTF-8 byte); and `accuracy_per_token` (log-likelihood per choice token, which
    depends on the tokenizer). The choice text is the whole continuation (lm-eval with an empty
    target_delimiter)."""
    hits = {k: [] for k in ("accuracy", "accuracy_norm", "accuracy_bytes", "accuracy_per_token")}
    picks = []
    for q, cs, a in zip(questions, choices, answers):
        lp, n = choice_logprobs(definition, base, lora, tokenizer, q, list(cs))
        chars = np.array([len(c) for c in cs], np.float64)
        nbytes = np.array([len(c.encode("utf-8")) for c in cs], np.float64)
        pick = int(np.argmax(lp))
        picks.append(pick)
        for k, score in (
            ("accuracy", lp),
            ("accuracy_norm", lp / chars),
            ("accuracy_bytes", lp / nbytes),
            ("accuracy_per_token", lp / n),
        ):
            hits[k].append(int(np.argmax(score)) == a)
    return {**{k: float(np.mean(v)) for k, v in hits.items()}, "n": len(picks), "picks": picks}


LOCAL_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


def _choice_rows(rows: list[dict], where: str):
    """(questions, choices, answer indices) of question/choices/answer records, each checked."""
    qs, cs, ans = [], [], []
    for i, r in enumerate(rows, 1):
        q, c, a = r.get("question"), r.get("choices"), r.get("answer")
        if isinstance(c, str):  # a CSV cell holding a JSON list
            try:
                c = json.loads(c)
            except ValueError:
                pass
        if not isinstance(q, str):
            raise UserError(f"{where} record {i}: 'question' must be text, got {q!r:.60}")
        if not isinstance(c, (list, tuple)) or len(c) < 2 or not all(isinstance(x, str) and x for x in c):
            raise UserError(
                f"{where} record {i}: 'choices' must be a list of at least 2 non-empty texts, got {c!r:.60}"
            )
        c = list(c)
        if isinstance(a, str) and a.strip().isdigit():
            a = int(a)
        if isinstance(a, str):
            if a not in c:
                raise UserError(f"{where} record {i}: 'answer' {a!r:.60} is not one of its choices")
            a = c.index(a)
        elif isinstance(a, bool) or not isinstance(a, int) or not 0 <= a < len(c):
            raise UserError(
                f"{where} record {i}: 'answer' must be a choice index in [0, {len(c) - 1}] or the "
                f"text of a choice, got {a!r:.60}"
            )
        qs.append(q)
        cs.append(c)
        ans.append(a)
    return qs, cs, ans


def load_multiple_choice(
    source: str, limit: int | None = None, seed: int = 0
) -> tuple[list[str], list[list[str]], list[int]]:
    """(questions, choices, answer indices) from a dataset with question / choices / answer
    columns (answer: an index or the text of the right choice): a local json/jsonl/csv/parquet
    file, a hub id with its test split (ID or ID:CONFIG, e.g. cais/mmlu:all), or 'synthetic'."""
    if limit is not None and limit < 1:
        raise UserError(f"the multiple-choice limit must be >= 1, got {limit}")
    if source == "synthetic":
        from ..data import synthetic

        rng = randomness.np_rng(seed, "eval_sample")
        # a randomness domain of its own: the questions are not the training examples that
        # data.source synthetic generates from the run's seed
        rows = synthetic.generate(4 * (limit or 100), seed=seed, domain="synthetic_eval")
        qs, cs, ans = [], [], []
        for i, r in enumerate(rows[: limit or 100]):
            others = [x["output"] for x in rows if x["task"] == r["task"] and x["output"] != r["output"]][:3]
            opts = others + [r["output"]]
            rng.shuffle(opts)
            qs.append(f"{r['instruction']}\n{r['input']}\n")
            cs.append([" " + o if not o.startswith(" ") else o for o in opts])
            ans.append(opts.index(r["output"]))
        return qs, cs, ans
    from pathlib import Path

    if Path(source).suffix in LOCAL_SUFFIXES:
        from ..data.loading import read_rows

        rows, where = read_rows(source, "multiple-choice file"), f"multiple-choice file {source!r}"
    else:  # a hub id, optionally with its configuration: cais/mmlu:all
        import datasets

        name, _, config = source.partition(":")
        try:
            ds = datasets.load_dataset(name, config or None, split="test")
        except Exception as e:
            raise UserError(
                f"could not load multiple-choice data {source!r} from the Hugging Face hub "
                f"({type(e).__name__}); if you are offline, pass a local file or 'synthetic'"
            ) from e
        if limit:
            ds = ds.select(range(min(limit, len(ds))))
        rows, where = ds.to_list(), f"multiple-choice data {source!r}"
    found = list(dict.fromkeys(k for r in rows for k in r))
    missing = [c for c in ("question", "choices", "answer") if c not in found]
    if missing:
        raise UserError(
            f"{where} needs columns question, choices, answer; missing {', '.join(missing)}; "
            f"columns found: {', '.join(map(str, found))}"
        )
    if limit:
        rows = rows[:limit]
    return _choice_rows(rows, where)
