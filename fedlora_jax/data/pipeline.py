"""From a run config to client data: load, tokenize, hold out evaluation data, partition."""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

import numpy as np

from ..core import randomness
from ..core.errors import UserError
from .batches import PoissonBatcher, RoundBatcher
from .chat import FALLBACK_CHAT_TEMPLATE
from .loading import load_examples
from .partition import partition, partition_summary
from .tokenize import TokenizedData, tokenize_examples

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

    from ..config.run_config import RunConfig

DEFAULT_LABELS = {"chatterbot": "topic", "synthetic": "task"}
DROPPED_WARNING = 0.05  # warn when more than this share of the examples is dropped
log = logging.getLogger("fedlora_jax")


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer built in code (256 byte tokens + <|endoftext|> <|im_start|>
    <|im_end|>, no merges): the tokenizer of the random `tiny` models. Its chat template is
    data.chat.FALLBACK_CHAT_TEMPLATE, which with EOS <|im_end|> is ChatML."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for s in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token="<|im_start|>",
        unk_token="<|endoftext|>",
    )
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    fast.chat_template = FALLBACK_CHAT_TEMPLATE
    return fast


@dataclasses.dataclass
class ClientData:
    train: TokenizedData
    eval: TokenizedData | None
    parts: list  # train indices per client
    eval_parts: list | None  # eval indices per client (eval_per_client)
    summary: dict
    stats: dict = dataclasses.field(default_factory=dict)  # see data_stats

    def batcher(
        self, local_steps: int, batch_size: int, seed: int, poisson: bool = False, tail: float | None = None
    ) -> RoundBatcher:
        """Round blocks: shuffled fixed-size batches, or Poisson-sampled ones (DP-SGD) padded to the
        capacity of overflow probability `tail` per step (the mechanism's batch_tail)."""
        if poisson:
            return PoissonBatcher(
                self.train, self.parts, local_steps, batch_size, seed, *(() if tail is None else (tail,))
            )
        return RoundBatcher(self.train, self.parts, local_steps, batch_size, seed)


def prepare(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase) -> ClientData:
    """cfg: a RunConfig (data, fl.num_clients and seed are used)."""
    d = cfg.data
    label = d.label_column or (
        DEFAULT_LABELS.get(d.source) if d.partition != "iid" or d.source in DEFAULT_LABELS else None
    )
    if d.partition != "iid" and label is None:
        raise UserError(f"partition {d.partition!r} needs data.label_column")
    ds = load_examples(
        d.source,
        split=d.split,
        columns=dict(d.columns or ()),
        label_column=label,
        synthetic_tasks=d.synthetic_tasks,
        synthetic_examples=d.synthetic_examples,
        max_examples=d.max_examples,
        seed=cfg.seed,
    )
    data = tokenize_examples(ds, tokenizer, d.template, d.seq_len, system_prompt=d.system_prompt, source=d.source)
    n = len(data)
    rng = randomness.np_rng(cfg.seed, "data_split")
    eval_data, eval_parts = None, None
    k = cfg.fl.num_clients
    if d.eval_per_client:
        parts_all = partition(n, k, d.partition, data.labels, d.dirichlet_alpha, cfg.seed)
        parts, eval_parts, flat_eval = [], [], []
        for p in parts_all:
            p = rng.permutation(p)
            m = int(round(len(p) * d.eval_fraction))
            if len(p) - m < 1:
                raise UserError(f"a client with {len(p)} examples has none left after the evaluation split")
            eval_parts.append(np.arange(len(flat_eval), len(flat_eval) + m))
            flat_eval.extend(p[:m].tolist())
            parts.append(np.sort(p[m:]))
        eval_data = data.select(flat_eval) if flat_eval else None
        train = data
    else:
        perm = rng.permutation(n)
        m = int(round(n * d.eval_fraction))
        if n - m < k:
            lost = ""
            if data.dropped_too_long:
                lost = (
                    f" ({data.dropped_too_long} of {n + data.dropped} examples were dropped because no response token "
                    f"fits in data.seq_len {d.seq_len}: raise data.seq_len)"
                )
            raise UserError(
                f"{k} clients but only {n - m} training example(s) after the evaluation split{lost}; "
                "lower fl.num_clients or give more data"
            )
        eval_data = data.select(np.sort(perm[:m])) if m else None
        train = data.select(np.sort(perm[m:]))
        parts = partition(len(train), k, d.partition, train.labels, d.dirichlet_alpha, cfg.seed)
    summary = {
        "data": data.stats(),
        "train_examples": int(sum(len(p) for p in parts)),
        "eval_examples": 0 if eval_data is None else len(eval_data),
        "label_column": label,
        "clients": partition_summary(parts, train.attention_mask, train.labels),
    }
    stats = data_stats(data, train, parts, eval_data, eval_parts, d.seq_len, len(ds))
    summary["stats"] = stats
    if stats["dropped"] > DROPPED_WARNING * stats["examples"]:
        log.warning(
            "%d of %d examples (%.0f%%) dropped: no response token fits in data.seq_len %d; raise data.seq_len",
            stats["dropped"],
            stats["examples"],
            100 * stats["dropped"] / stats["examples"],
            d.seq_len,
        )
    return ClientData(train, eval_data, parts, eval_parts, summary, stats)


def _split_stats(data, parts) -> dict:
    """examples, truncated, tokens, loss tokens and per-client min/mean/max examples of one split."""
    rows = np.concatenate([np.asarray(p, np.int64) for p in parts]) if parts else np.zeros(0, np.int64)
    sizes = [len(p) for p in parts]
    return {
        "examples": len(rows),
        "truncated": int(data.was_truncated[rows].sum()),
        "tokens": int(data.attention_mask[rows].sum()),
        "loss_tokens": int(data.loss_mask[rows].sum()),
        "per_client": {"min": min(sizes), "mean": float(np.mean(sizes)), "max": max(sizes)} if sizes else None,
    }


def data_stats(
    data: TokenizedData,
    train: TokenizedData,
    parts: list[np.ndarray],
    eval_data: TokenizedData | None,
    eval_parts: list[np.ndarray] | None,
    seq_len: int,
    examples: int,
) -> dict:
    """Plain-JSON statistics of prepared data: rows read (`examples`), `kept`, `dropped` (=
    `dropped_too_long`: no response token within seq_len, + `dropped_no_assistant_tokens`: none at
    all), `truncated` (kept but cut at seq_len), and per split (`train`, `eval`): examples,
    truncated, tokens, loss_tokens and per_client {min, mean, max} examples (eval: None unless
    data.eval_per_client)."""
    if eval_data is None:
        ev = {"examples": 0, "truncated": 0, "tokens": 0, "loss_tokens": 0, "per_client": None}
    else:
        ev = _split_stats(eval_data, eval_parts or [np.arange(len(eval_data))])
        if eval_parts is None:
            ev["per_client"] = None
    return {
        "seq_len": int(seq_len),
        "examples": int(examples),
        "kept": len(data),
        "dropped": int(data.dropped),
        "dropped_too_long": int(data.dropped_too_long),
        "dropped_no_assistant_tokens": int(data.dropped_no_assistant_tokens),
        "truncated": int(data.truncated),
        "train": _split_stats(train, parts),
        "eval": ev,
    }
