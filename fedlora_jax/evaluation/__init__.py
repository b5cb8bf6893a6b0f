"""Evaluation of a (base, adapter) pair: text scoring (NLL, perplexity), greedy exact match, and
multiple choice scored as lm-evaluation-harness scores it (same tokenization, same metric names).

loss.py holds THE held-out loss and text scoring, greedy.py greedy decoding and exact match, choices.py
multiple choice and its data; here: the tasks of `fedlora-jax eval` and the in-run evaluator. Every name
is importable from here."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from ..core.errors import UserError
from .choices import LOCAL_SUFFIXES, choice_logprobs, lm_eval_pair, load_multiple_choice, multiple_choice  # noqa: F401  (re-exported)
from .greedy import exact_match, greedy_answers, greedy_generate, held_out_prompts, split_prompt_answer  # noqa: F401  (re-exported)
from .loss import heldout_eval, heldout_loss, score_ids  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..config.run_config import RunConfig
    from ..core.pytypes import Tree
    from ..models import Definition

from ..core.choices import EVAL_TASKS as TASKS  # noqa: E402  (the config's choices)


def run_task(
    task: str,
    definition: Definition,
    base: Tree,
    lora: Tree,
    tokenizer: PreTrainedTokenizerBase,
    cfg: RunConfig | None = None,
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
        cis = {f"{k}_ci95": list(wilson_interval(out[k], out["n"])) for k in ("accuracy", "accuracy_norm")}
        return {"task": task, "data": data or "synthetic", **out, **cis}
    if cfg is None:
        raise UserError(f"task {task!r} evaluates a run's held-out split: pass a run folder")
    from ..data.pipeline import prepare

    ev = prepare(cfg, tokenizer).eval
    if ev is None or len(ev) == 0:
        raise UserError("the run has no held-out split (data.eval_fraction is 0)")
    if task == "loss":
        # by default the examples the run itself evaluates, so the figure equals the run's eval_loss
        n = min(limit or run_eval_examples(cfg, len(ev)), len(ev))
        r = heldout_eval(definition, base, lora, ev, n, cfg.eval_batch_size)
        return {"task": task, **r, "perplexity": math.exp(r["loss"])}
    n = min(limit or len(ev), len(ev))
    prompts, answers = held_out_prompts(tokenizer, ev, n)
    texts = greedy_answers(definition, base, lora, tokenizer, prompts, max_new_tokens)
    hits = [t == a for t, a in zip(texts, answers)]
    em = float(np.mean(hits))
    return {"task": task, "n": n, "exact_match": em, "ci95": list(wilson_interval(em, n))}


def run_eval_examples(cfg: RunConfig, available: int) -> int:
    """How many held-out examples a run's loss evaluation scores: all of them, up to eval_examples."""
    return min(cfg.eval_examples, available)


Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion p observed on n trials (good at small n and at
    p near 0 or 1, where the normal approximation's interval leaves [0, 1])."""
    if n < 1:
        return (0.0, 1.0)
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(max(p * (1 - p) / n + z2 / (4 * n * n), 0.0))
    return (max(centre - half, 0.0), min(centre + half, 1.0))


def score_fields(name: str, value: float, n: int) -> dict:
    """A score's metrics-row fields: the value, its n and its 95% interval (numbers only, so every
    writer takes them): NAME, NAME_n, NAME_ci95_low, NAME_ci95_high."""
    lo, hi = wilson_interval(value, n)
    return {name: value, f"{name}_n": n, f"{name}_ci95_low": lo, f"{name}_ci95_high": hi}


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
            out.update(score_fields("eval_exact_match", float(np.mean(hits)), len(hits)))
        if "multiple_choice" in self.tasks:
            r = multiple_choice(definition, base, lora, tok, *self.mc)
            n = len(self.mc[0])
            out.update(score_fields("eval_mc_accuracy", r["accuracy"], n))
            out.update(score_fields("eval_mc_accuracy_norm", r["accuracy_norm"], n))
        return out
