"""A transformers tokenizer built from a GGUF file's metadata, without torch.

A GGUF file has no tokenizer.json: it stores the vocabulary, merges, token types, special token ids
and chat template as metadata under llama.cpp's key names. transformers can turn that into a
tokenizer, but its GGUF reader imports torch, which the library must not need. Here gguf-py reads
the metadata, the `tokenizers` library builds the same backend transformers would (byte-level BPE
for `tokenizer.ggml.model = gpt2`, sentencepiece-style BPE with byte fallback for `llama`), and
`PreTrainedTokenizerFast` wraps it with the special tokens, the BOS/EOS flags and the chat template.
The tests check the result token for token against transformers' own GGUF tokenizer.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from ..core.errors import UserError

if TYPE_CHECKING:
    from gguf import GGUFReader
    from transformers import PreTrainedTokenizerFast

# GGUF token types (llama.cpp's llama_token_type)
_CONTROL, _USER_DEFINED = 3, 4

# Pre-tokenizer split patterns by `tokenizer.ggml.pre` (llama.cpp's names; the same table transformers
# uses). A byte-level vocabulary whose pre-tokenizer is not listed splits with GPT-2's pattern.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(
        (
            "llama3",
            "llama-v3",
            "llama-bpe",
            "falcon3",
            "falcon-h1",
            "pixtral",
            "midm-2.0",
            "lfm2",
            "jina-v5-nano",
            "dbrx",
            "smaug-bpe",
        ),
        _LLAMA3_SPLIT,
    ),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}
SUPPORTED_MODELS = ("gpt2", "llama")


def open_gguf(path: str | os.PathLike) -> GGUFReader:
    """A gguf.GGUFReader over `path`; UserError naming the file when it is not an intact GGUF file."""
    from gguf import GGUFReader

    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise UserError(f"cannot read GGUF file {str(path)!r}: {e.strerror or e}") from e
    if magic != b"GGUF":
        raise UserError(
            f"cannot read GGUF file {str(path)!r}: it is not a GGUF file (it does not start with the GGUF magic bytes)"
        )
    try:
        return GGUFReader(str(path))
    except Exception as e:  # gguf-py raises assorted errors (reshape, dtype) on a cut file
        raise UserError(
            f"cannot read GGUF file {str(path)!r}: it is truncated or corrupt "
            f"({type(e).__name__}: {e}), so download it again"
        ) from e


def read_tokenizer_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The tokenizer part of a GGUF file's metadata: {key without 'tokenizer.' prefix: value}."""
    reader = open_gguf(path)
    meta = {}
    for name, f in reader.fields.items():
        if name.startswith("tokenizer."):
            try:
                meta[name[len("tokenizer.") :]] = f.contents()
            except Exception as e:
                raise UserError(
                    f"GGUF file {str(path)!r} has an unreadable metadata value {name!r} "
                    f"({type(e).__name__}); download it again"
                ) from e
    return meta


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of the 256 byte values."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _merges_from_scores(vocab: dict[str, int], scores: list[float]) -> list[tuple[str, str]]:
    """Merges a sentencepiece vocabulary implies: every split of a token into two known tokens,
    best score first (what transformers does for files without merges)."""
    merges = []
    for token, score in zip(vocab, scores):
        local = [
            (token[:i], token[i:], score) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab
        ]
        merges.extend(sorted(local, key=lambda x: (vocab[x[0]], vocab[x[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _byte_level_backend(meta: dict):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
        for i, t in enumerate(meta["ggml.tokens"])
    }
    merges = [tuple(m.split(" ")) for m in meta.get("ggml.merges") or ()]
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    split = PRE_TOKENIZER_SPLITS.get(meta.get("ggml.pre"))
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    return tok, alphabet


def _sentencepiece_backend(meta: dict):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokens = meta["ggml.tokens"]
    vocab = {t: i for i, t in enumerate(tokens)}
    if meta.get("ggml.merges"):
        merges = [tuple(m.split(" ")) for m in meta["ggml.merges"]]
    elif meta.get("ggml.scores") is not None:
        merges = _merges_from_scores(vocab, [float(s) for s in meta["ggml.scores"]])
    else:
        merges = []
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
    prefix = bool(meta.get("ggml.add_space_prefix", True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(steps)
    return tok, None


def tokenizer_from_metadata(meta: dict, source: str = "<GGUF>") -> PreTrainedTokenizerFast:
    """A PreTrainedTokenizerFast from a GGUF file's tokenizer metadata (see read_tokenizer_metadata)."""
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast

    kind = meta.get("ggml.model")
    if not meta.get("ggml.tokens"):
        raise UserError(f"GGUF file {source!r} has no tokenizer vocabulary (tokenizer.ggml.tokens)")
    if kind not in SUPPORTED_MODELS:
        raise UserError(
            f"GGUF file {source!r} has tokenizer.ggml.model {kind!r}; supported: "
            f"{', '.join(SUPPORTED_MODELS)} (or load the Hugging Face folder instead)"
        )
    tokens = list(meta["ggml.tokens"])
    types = list(meta.get("ggml.token_type") or ())
    backend, alphabet = (_byte_level_backend if kind == "gpt2" else _sentencepiece_backend)(meta)

    # control tokens (<|im_end|>) stay whole and are special; user-defined ones (<think>) stay whole.
    # A byte-level "control" token spelled outside the byte alphabet is a llama.cpp mislabel: skipped.
    control = [
        AddedToken(t, normalized=False, special=True)
        for t, ty in zip(tokens, types)
        if ty == _CONTROL and (alphabet is None or set(t) <= alphabet)
    ]
    if control:
        backend.add_special_tokens(control)
    vocab = backend.get_vocab()
    user = [
        AddedToken(t, normalized=False, special=False)
        for t, ty in zip(tokens, types)
        if ty == _USER_DEFINED and t in vocab
    ]
    if user:
        backend.add_tokens(user)

    def special(key: str) -> str | None:
        i = meta.get(f"ggml.{key}")
        if i is None:
            return None
        if not 0 <= int(i) < len(tokens):
            raise UserError(
                f"GGUF file {source!r} has tokenizer.ggml.{key} {int(i)} outside its vocabulary of {len(tokens)} tokens"
            )
        return tokens[int(i)]

    names = {
        "bos_token": special("bos_token_id"),
        "eos_token": special("eos_token_id"),
        "unk_token": special("unknown_token_id"),
        "pad_token": special("padding_token_id"),
    }
    add_bos = bool(meta.get("ggml.add_bos_token", kind == "llama"))  # llama.cpp's default for sentencepiece
    add_eos = bool(meta.get("ggml.add_eos_token", False))
    add_bos, add_eos = add_bos and names["bos_token"] is not None, add_eos and names["eos_token"] is not None
    single = " ".join([f"{names['bos_token']}:0"] * add_bos + ["$A:0"] + [f"{names['eos_token']}:0"] * add_eos)
    pair = " ".join([single] + [f"{names['bos_token']}:1"] * add_bos + ["$B:1"] + [f"{names['eos_token']}:1"] * add_eos)
    backend.post_processor = processors.TemplateProcessing(
        single=single,
        pair=pair,
        special_tokens=[(names["bos_token"], backend.token_to_id(names["bos_token"]))] * add_bos
        + [(names["eos_token"], backend.token_to_id(names["eos_token"]))] * add_eos,
    )
    kwargs = {k: v for k, v in names.items() if v is not None}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        add_bos_token=add_bos,
        add_eos_token=add_eos,
        clean_up_tokenization_spaces=False,
        **kwargs,
    )
    if meta.get("chat_template"):
        tok.chat_template = meta["chat_template"]
    return tok


def tokenizer_from_gguf(path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """The tokenizer a GGUF file describes, as a transformers PreTrainedTokenizerFast (no torch)."""
    return tokenizer_from_metadata(read_tokenizer_metadata(path), str(path))
