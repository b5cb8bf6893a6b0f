"""Prompt templates and tokenization with response-only loss masks (a completion-only collator):
labels only on response tokens, EOS appended, truncation to seq_len counted, never silent."""

from __future__ import annotations

import dataclasses

import numpy as np

from ..errors import UserError

TEMPLATES = ("alpaca", "chat", "plain")
ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
    "{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def render_prompt(template: str, instruction: str, input_: str, tokenizer=None) -> str:
    if template == "alpaca":
        return (ALPACA_INPUT if input_ else ALPACA).format(instruction=instruction, input=input_)
    if template == "plain":
        return f"{instruction}\n{input_}\n" if input_ else f"{instruction}\n"
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise UserError("template 'chat' needs a tokenizer with a chat template; use alpaca or plain")
        content = f"{instruction}\n\n{input_}" if input_ else instruction
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    raise UserError(f"unknown template {template!r}; allowed: {', '.join(TEMPLATES)}")


@dataclasses.dataclass
class TokenizedData:
    """Fixed-width token arrays of N examples: tokens, loss_mask (response tokens incl. EOS),
    attention_mask; `labels` (optional per-example label strings) and truncation counts."""

    tokens: np.ndarray
    loss_mask: np.ndarray
    attention_mask: np.ndarray
    labels: list | None
    truncated: int
    dropped: int
    kept_index: np.ndarray  # rows of the input dataset that were kept

    def __len__(self):
        return len(self.tokens)

    def select(self, idx) -> "TokenizedData":
        idx = np.asarray(idx, np.int64)
        return TokenizedData(
            self.tokens[idx],
            self.loss_mask[idx],
            self.attention_mask[idx],
            None if self.labels is None else [self.labels[i] for i in idx],
            0,
            0,
            self.kept_index[idx],
        )

    def stats(self) -> dict:
        lengths = self.attention_mask.sum(1)
        return {
            "examples": len(self),
            "truncated": self.truncated,
            "dropped": self.dropped,
            "tokens": int(lengths.sum()),
            "response_tokens": int(self.loss_mask.sum()),
            "mean_length": float(lengths.mean()) if len(self) else 0.0,
            "max_length": int(lengths.max()) if len(self) else 0,
        }


def tokenize_examples(
    ds, tokenizer, template: str = "alpaca", seq_len: int = 512, batch_size: int = 1000
) -> TokenizedData:
    """Tokenize a Dataset with instruction/input/output (and optional label) columns."""
    if template not in TEMPLATES:
        raise UserError(f"unknown template {template!r}; allowed: {', '.join(TEMPLATES)}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("the tokenizer has no EOS token; set tokenizer.eos_token")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    n = len(ds)
    tokens = np.full((n, seq_len), pad, np.int32)
    loss = np.zeros((n, seq_len), np.int8)
    attn = np.zeros((n, seq_len), np.int8)
    keep = np.zeros(n, bool)
    truncated = 0
    # the chat template carries its own special tokens; otherwise let the tokenizer add BOS if it does
    special = template != "chat"
    for start in range(0, n, batch_size):
        rows = ds[start : start + batch_size]
        prompts = [render_prompt(template, i, x, tokenizer) for i, x in zip(rows["instruction"], rows["input"])]
        p_ids = tokenizer(prompts, add_special_tokens=special)["input_ids"]
        r_ids = tokenizer(rows["output"], add_special_tokens=False)["input_ids"]
        for j, (p, r) in enumerate(zip(p_ids, r_ids)):
            k = start + j
            if len(p) >= seq_len:  # no room for a single response token
                continue
            full = p + r + [eos]
            if len(full) > seq_len:
                truncated += 1
                full = full[:seq_len]
            tokens[k, : len(full)] = full
            attn[k, : len(full)] = 1
            loss[k, len(p) : len(full)] = 1
            keep[k] = True
    dropped = int(n - keep.sum())
    if keep.sum() == 0:
        raise UserError(f"seq_len {seq_len} is too short for every prompt ({n} examples dropped); raise data.seq_len")
    idx = np.nonzero(keep)[0]
    if "label" in ds.column_names:
        column = ds["label"]  # read the column once (indexing the dataset per row copies its features)
        labels = [column[i] for i in idx]
    else:
        labels = None
    return TokenizedData(tokens[idx], loss[idx], attn[idx], labels, truncated, dropped, idx)
