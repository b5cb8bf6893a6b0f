"""Prompt templates and tokenization with response-only loss masks (a completion-only collator):
labels only on response tokens, EOS appended, truncation to seq_len counted, never silent.

Conversations (a `messages` column) and instruction rows with the `chat` template are rendered by
the tokenizer's chat template, loss on the assistant turns (see data/chat.py)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from ..core.errors import UserError
from .chat import chat_template, encode_conversations, with_system

if TYPE_CHECKING:
    from collections.abc import Sequence

    import datasets
    from transformers import PreTrainedTokenizerBase

from ..core.choices import TEMPLATES  # noqa: E402,F401  (the config's choices)

ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
    "{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def chat_user_turn(instruction: str, input_: str) -> str:
    """The user turn of an instruction row under the `chat` template."""
    return f"{instruction}\n\n{input_}" if input_ else instruction


def render_prompt(
    template: str,
    instruction: str,
    input_: str,
    tokenizer: PreTrainedTokenizerBase | None = None,
    system_prompt: str | None = None,
) -> str:
    """The prompt text of an instruction row (for `chat`: the conversation up to the assistant's turn)."""
    if template == "alpaca":
        return (ALPACA_INPUT if input_ else ALPACA).format(instruction=instruction, input=input_)
    if template == "plain":
        return f"{instruction}\n{input_}\n" if input_ else f"{instruction}\n"
    if template == "chat":
        if tokenizer is None:
            raise UserError("template 'chat' needs a tokenizer")
        return tokenizer.apply_chat_template(
            with_system([{"role": "user", "content": chat_user_turn(instruction, input_)}], system_prompt),
            chat_template=chat_template(tokenizer),
            tokenize=False,
            add_generation_prompt=True,
        )
    raise UserError(f"unknown template {template!r}; allowed: {', '.join(TEMPLATES)}")


@dataclasses.dataclass
class TokenizedData:
    """Fixed-width token arrays of N examples: tokens, loss_mask (response / assistant tokens incl.
    the end-of-turn token), attention_mask; `labels` (optional per-example label strings), counts of
    the input rows that were dropped (no response token within seq_len: `dropped_too_long`; none at
    all: `dropped_no_assistant_tokens`) and `was_truncated` (per example: cut at seq_len)."""

    tokens: np.ndarray
    loss_mask: np.ndarray
    attention_mask: np.ndarray
    labels: list | None
    truncated: int
    dropped: int
    kept_index: np.ndarray  # rows of the input dataset that were kept
    was_truncated: np.ndarray | None = None
    dropped_no_assistant_tokens: int = 0

    def __post_init__(self):
        if self.was_truncated is None:
            self.was_truncated = np.zeros(len(self.tokens), bool)

    def __len__(self):
        return len(self.tokens)

    @property
    def dropped_too_long(self) -> int:
        return self.dropped - self.dropped_no_assistant_tokens

    def select(self, idx: Sequence[int] | np.ndarray) -> "TokenizedData":
        """The examples at `idx` (drop counts are those of the whole input, so they are reset)."""
        idx = np.asarray(idx, np.int64)
        return TokenizedData(
            self.tokens[idx],
            self.loss_mask[idx],
            self.attention_mask[idx],
            None if self.labels is None else [self.labels[i] for i in idx],
            int(self.was_truncated[idx].sum()),
            0,
            self.kept_index[idx],
            self.was_truncated[idx],
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


def _instruction_examples(ds, tokenizer, template, start, stop):
    """[(ids, loss mask)] of instruction rows under the alpaca/plain template: prompt + response + EOS."""
    rows = ds[start:stop]
    prompts = [render_prompt(template, i, x, tokenizer) for i, x in zip(rows["instruction"], rows["input"])]
    p_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]  # BOS if the tokenizer adds one
    r_ids = tokenizer(rows["output"], add_special_tokens=False)["input_ids"]
    return [(p + r + [tokenizer.eos_token_id], [0] * len(p) + [1] * (len(r) + 1)) for p, r in zip(p_ids, r_ids)]


def _chat_examples(ds, tokenizer, start, stop, system_prompt, names):
    """[(ids, loss mask)] of conversations (a messages column) or instruction rows as one user and
    one assistant turn, rendered by the chat template."""
    if "messages" in ds.column_names:
        convs = ds[start:stop]["messages"]
    else:
        rows = ds[start:stop]
        convs = [
            [{"role": "user", "content": chat_user_turn(i, x)}, {"role": "assistant", "content": o}]
            for i, x, o in zip(rows["instruction"], rows["input"], rows["output"])
        ]
    convs = [[{"role": t["role"], "content": t["content"]} for t in c] for c in convs]
    where = [names(k) for k in range(start, start + len(convs))]
    return encode_conversations(convs, tokenizer, system_prompt, where)


def tokenize_examples(
    ds: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    template: str = "alpaca",
    seq_len: int = 512,
    batch_size: int = 1000,
    system_prompt: str | None = None,
    source: str = "the data",
) -> TokenizedData:
    """Tokenize a Dataset with instruction/input/output columns, or a `messages` column of
    conversations (always rendered by the chat template; `template` applies to instruction rows), and
    an optional label column. An example whose first response token does not fit in seq_len is
    dropped; a longer one is cut at seq_len (counted as truncated)."""
    if template not in TEMPLATES:
        raise UserError(f"unknown template {template!r}; allowed: {', '.join(TEMPLATES)}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("the tokenizer has no EOS token; set tokenizer.eos_token")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    chat = template == "chat" or "messages" in ds.column_names
    n = len(ds)
    tokens = np.full((n, seq_len), pad, np.int32)
    loss = np.zeros((n, seq_len), np.int8)
    attn = np.zeros((n, seq_len), np.int8)
    keep = np.zeros(n, bool)
    cut = np.zeros(n, bool)
    no_loss = 0
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        if chat:
            examples = _chat_examples(ds, tokenizer, start, stop, system_prompt, lambda k: f"{source} record {k + 1}")
        else:
            examples = _instruction_examples(ds, tokenizer, template, start, stop)
        for k, (ids, mask) in enumerate(examples, start):
            if not any(mask):
                no_loss += 1
                continue
            if not any(mask[:seq_len]):  # no room for a single response token
                continue
            if len(ids) > seq_len:
                cut[k] = True
                ids, mask = ids[:seq_len], mask[:seq_len]
            tokens[k, : len(ids)] = ids
            attn[k, : len(ids)] = 1
            loss[k, : len(ids)] = mask
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
    return TokenizedData(tokens[idx], loss[idx], attn[idx], labels, int(cut.sum()), dropped, idx, cut[idx], no_loss)
