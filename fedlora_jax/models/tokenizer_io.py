"""Tokenizers in and out: a folder's transformers tokenizer, a GGUF file's (built once, then cached),
and saving one that transformers 4 and 5 both load."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from .gguf_tokenizer import tokenizer_from_gguf

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

# bump when the cached tokenizer's format or construction changes: older entries are then ignored
TOKENIZER_CACHE_VERSION = 2


def cache_dir() -> Path:
    """Where built artefacts are cached: $FEDLORA_JAX_CACHE, else ~/.cache/fedlora_jax."""
    return Path(os.environ.get("FEDLORA_JAX_CACHE") or Path.home() / ".cache" / "fedlora_jax")


def _gguf_tokenizer_cached(path: Path) -> PreTrainedTokenizerFast:
    """The GGUF file's tokenizer, built from its metadata once and then read from the cache."""
    from transformers import PreTrainedTokenizerFast
    from transformers import __version__ as tf_version

    # reading the vocabulary with gguf-py takes seconds; the cached tokenizer.json milliseconds. The key
    # holds the file's identity, the cache format and the transformers version that wrote it.
    st = path.stat()
    key = f"{path.stem}-{st.st_size}-{st.st_mtime_ns}-v{TOKENIZER_CACHE_VERSION}-tf{tf_version}"
    cache = cache_dir() / "tokenizers" / key
    if (cache / "tokenizer.json").exists():
        try:
            return PreTrainedTokenizerFast.from_pretrained(str(cache))
        except Exception as e:  # a damaged cache entry only costs a rebuild
            warnings.warn(f"ignoring the unreadable cached tokenizer {cache} ({type(e).__name__}: {e})")
    tok = tokenizer_from_gguf(path)
    try:  # write aside, then rename: concurrent runs never see a half-written entry
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache.parent))
        tok.save_pretrained(str(tmp))
        try:
            if cache.exists():
                shutil.rmtree(cache)
            os.replace(tmp, cache)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:  # a read-only home only costs time
        warnings.warn(f"could not cache the GGUF tokenizer in {cache}: {e}")
    return tok


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase | None:
    """The tokenizer of a folder or GGUF file (None when a folder has no tokenizer files)."""
    path = Path(path)
    if path.is_file():
        return _gguf_tokenizer_cached(path)
    if any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path))
    return None


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, folder: str | os.PathLike) -> None:
    """Save a transformers tokenizer (no torch needed) so that AutoTokenizer.from_pretrained(folder)
    loads it in transformers 4 and 5: tokenizer_config.json names PreTrainedTokenizerFast (the class
    both know; transformers 5 writes its own TokenizersBackend) and holds the chat template inline
    too (transformers 5 reads chat_template.jinja, 4 before 4.43 only tokenizer_config.json)."""
    folder = Path(folder)
    tokenizer.save_pretrained(str(folder))
    f = folder / "tokenizer_config.json"
    if not f.exists() or not (folder / "tokenizer.json").exists():
        return  # a slow (sentencepiece) tokenizer: transformers' own files are all there is
    c = json.loads(f.read_text(encoding="utf-8"))
    c["tokenizer_class"] = "PreTrainedTokenizerFast"
    for k in ("is_local", "local_files_only"):  # loading-time state, not a property of the tokenizer
        c.pop(k, None)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        c["chat_template"] = template
    f.write_text(json.dumps(c, indent=2, ensure_ascii=False), encoding="utf-8")
