"""Evaluation of a (base, adapter) pair: text scoring (NLL, perplexity), greedy exact match, and
multiple choice scored as lm-evaluation-harness scores it (same tokenization, same metric names)."""

from __future__ import annotations

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np

from . import randomness
from .errors import UserError
from .models import Definition, token_nll


@functools.partial(jax.jit, static_argnums=0)
def _masked_sum(definition, base, lora, tokens, attn, loss_mask=None):
    """(sum of NLL over the weighted positions, their count)."""
    nll, w = token_nll(definition, base, lora, tokens, attn, loss_mask)
    return jnp.sum(nll * w), jnp.sum(w)


def heldout_loss(definition: Definition, base, lora, data, n: int, batch_size: int = 16) -> float:
    """THE held-out loss (one definition, used by the run and by `fedlora-jax eval`): mean NLL per
    response token over the first n examples of `data` (token-weighted, every example once).
    Batches have one static shape; the last is padded with loss-masked rows."""
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
    return total / max(count, 1.0)


def score_ids(definition: Definition, base, lora, ids: list[int]) -> dict:
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


# ----------------------------------------------------------------------------- generation


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
    from .models import apply

    rows = jnp.arange(tokens.shape[0])

    def step(i, toks):
        pos = lengths + i
        mask = (jnp.arange(toks.shape[1])[None, :] < pos[:, None]).astype(jnp.int32)
        logits = apply(definition, base, lora, toks, mask)
        nxt = jnp.argmax(logits[rows, pos - 1], axis=-1).astype(toks.dtype)
        return toks.at[rows, pos].set(nxt)

    return jax.lax.fori_loop(0, max_new, step, tokens)


def greedy_generate(
    definition,
    base,
    lora,
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


def greedy_answers(definition, base, lora, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int = 16):
    """The decoded, whitespace-stripped greedy continuation of each token-id prompt."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gens = greedy_generate(definition, base, lora, prompt_ids, max_new_tokens, tokenizer.eos_token_id, pad)
    return [tokenizer.decode(g, skip_special_tokens=True).strip() for g in gens]


def exact_match(
    definition, base, lora, tokenizer, prompts: list[str], answers: list[str], max_new_tokens: int = 16
) -> dict:
    """Share of prompts whose greedy answer equals the reference (whitespace-stripped)."""
    ids = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    texts = greedy_answers(definition, base, lora, tokenizer, ids, max_new_tokens)
    hits = [t == a.strip() for t, a in zip(texts, answers)]
    return {"exact_match": float(np.mean(hits)) if hits else 0.0, "n": len(hits), "predictions": texts}


# ----------------------------------------------------------------------------- multiple choice


@functools.partial(jax.jit, static_argnums=0)
def _choice_nll(definition, base, lora, tokens, mask, loss_mask):
    nll, w = token_nll(definition, base, lora, tokens, mask, loss_mask)
    return jnp.sum(nll * w, axis=1), jnp.sum(w, axis=1)


def lm_eval_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
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

    def encode(text):
        # lm-eval does not add special tokens twice when the text already starts with the prefix token
        bos = tokenizer.decode([prefix]) if prefix is not None else None
        return tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]

    whole, ctx = encode(context + continuation), encode(context)
    return ctx, whole[len(ctx) :]


def choice_logprobs(definition, base, lora, tokenizer, prompt: str, choices: list[str]):
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
    definition, base, lora, tokenizer, questions: list[str], choices: list[list[str]], answers: list[int]
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


def load_multiple_choice(source: str, limit: int | None = None, seed: int = 0):
    """(questions, choices, answer indices) from a dataset with question / choices / answer
    columns (answer: an index or the text of the right choice): a local json/jsonl/csv/parquet
    file, a hub id with its test split (ID or ID:CONFIG, e.g. cais/mmlu:all), or 'synthetic'."""
    if limit is not None and limit < 1:
        raise UserError(f"the multiple-choice limit must be >= 1, got {limit}")
    if source == "synthetic":
        from .data import synthetic

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
        from .data.loading import read_rows

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


TASKS = ("loss", "exact_match", "multiple_choice")


def held_out_prompts(tokenizer, data, limit: int):
    """(prompt ids, reference answer texts) of the first `limit` tokenized held-out examples."""
    n = min(limit, len(data))
    prompts, answers = split_prompt_answer(
        data.tokens[:n], data.attention_mask[:n], data.loss_mask[:n], tokenizer.eos_token_id
    )
    return prompts, [tokenizer.decode(a, skip_special_tokens=True).strip() for a in answers]


def split_prompt_answer(tokens, attention_mask, loss_mask, eos_id):
    """(prompt ids, answer ids without EOS) of tokenized examples (response = the loss-masked part)."""
    prompts, answers = [], []
    for t, a, m in zip(tokens, attention_mask, loss_mask):
        start = int(np.argmax(m)) if m.any() else int(a.sum())
        end = int(a.sum())
        prompts.append(t[:start].tolist())
        ans = t[start:end].tolist()
        answers.append(ans[:-1] if ans and ans[-1] == eos_id else ans)
    return prompts, answers


def run_task(
    task: str,
    definition,
    base,
    lora,
    tokenizer,
    cfg=None,
    data: str | None = None,
    limit: int | None = None,
    max_new_tokens: int = 16,
) -> dict:
    """One evaluation task: `loss` and `exact_match` on a run's held-out split, `multiple_choice`
    on a question/choices/answer dataset (or 'synthetic')."""
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; allowed: {', '.join(TASKS)}")
    if task == "multiple_choice":
        qs, cs, ans = load_multiple_choice(data or "synthetic", limit)
        out = multiple_choice(definition, base, lora, tokenizer, qs, cs, ans)
        out.pop("picks")
        return {"task": task, "data": data or "synthetic", **out}
    if cfg is None:
        raise UserError(f"task {task!r} evaluates a run's held-out split: pass a run folder")
    from .data.pipeline import prepare

    ev = prepare(cfg, tokenizer).eval
    if ev is None or len(ev) == 0:
        raise UserError("the run has no held-out split (data.eval_fraction is 0)")
    if task == "loss":
        # by default the examples the run itself evaluates, so the figure equals the run's eval_loss
        n = min(limit or run_eval_examples(cfg, len(ev)), len(ev))
        nll = heldout_loss(definition, base, lora, ev, n, cfg.fl.batch_size)
        return {"task": task, "n": n, "loss": nll, "perplexity": math.exp(nll)}
    n = min(limit or len(ev), len(ev))
    prompts, answers = held_out_prompts(tokenizer, ev, n)
    texts = greedy_answers(definition, base, lora, tokenizer, prompts, max_new_tokens)
    hits = [t == a for t, a in zip(texts, answers)]
    return {"task": task, "n": n, "exact_match": float(np.mean(hits))}


def run_eval_examples(cfg, available: int) -> int:
    """How many held-out examples a run's loss evaluation scores: eval_batches x batch_size."""
    return min(cfg.eval_batches * cfg.fl.batch_size, available)


class RunEvaluator:
    """The evaluations a run performs every `eval_every` rounds beyond the loss (which the runner
    computes on fixed batches): greedy exact match on up to `eval_limit` held-out examples and
    multiple-choice accuracy on `eval_choices`. Prompts and references are prepared once."""

    def __init__(self, cfg, tokenizer, eval_data, max_new_tokens: int = 16):
        self.tasks = [t for t in cfg.eval_tasks if t != "loss"]
        self.tokenizer, self.max_new = tokenizer, max_new_tokens
        if "exact_match" in self.tasks:
            if eval_data is None or len(eval_data) == 0:
                raise UserError(
                    "eval_tasks has exact_match but the run has no held-out split (data.eval_fraction is 0)"
                )
            self.prompts, self.answers = held_out_prompts(tokenizer, eval_data, cfg.eval_limit)
        if "multiple_choice" in self.tasks:
            self.mc = load_multiple_choice(cfg.eval_choices, cfg.eval_limit, seed=cfg.seed)

    def __call__(self, definition, base, lora) -> dict:
        out = {}
        tok = self.tokenizer
        if "exact_match" in self.tasks:
            texts = greedy_answers(definition, base, lora, tok, self.prompts, self.max_new)
            hits = [t == a for t, a in zip(texts, self.answers)]
            out["eval_exact_match"] = float(np.mean(hits))
        if "multiple_choice" in self.tasks:
            r = multiple_choice(definition, base, lora, tok, *self.mc)
            out["eval_mc_accuracy"], out["eval_mc_accuracy_norm"] = r["accuracy"], r["accuracy_norm"]
        return out
