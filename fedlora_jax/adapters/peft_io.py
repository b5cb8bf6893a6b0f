"""PEFT's adapter format: adapter_config.json + adapter_model.safetensors, written and read back
(every name and shape checked), and the extras our exported adapter folder carries so that other
tools load it on their own: the base named by hub id where one is known, the tokenizer files, a
model card (model_card.py), and `fedlora_jax.json`, the record of the base this library loaded (so
`fedlora-jax eval ADAPTER` finds it offline even when adapter_config.json names a hub id)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from ..core.errors import UserError
from ..models import Definition, LoRAConfig
from ..models.hf_weights import hf_module_name
from .lora import modules

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_RECORD = "fedlora_jax.json"


def _peft_key(definition, path, layer, factor):
    return f"base_model.model.{hf_module_name(definition.config, path, layer)}.lora_{factor}.weight"


def save_peft(
    folder: str | os.PathLike, definition: Definition, tree: dict, base_model_name_or_path: str | None = None
) -> Path:
    """Write `tree` as a PEFT LoRA adapter that peft.PeftModel.from_pretrained loads."""
    from safetensors.numpy import save

    cfg, lc = definition.config, definition.lora
    tensors = {}
    for path, m in modules(tree):
        a, b = (np.asarray(jax.device_get(m[k]), np.float32) for k in ("lora_a", "lora_b"))
        for i in range(cfg.num_layers):
            tensors[_peft_key(definition, path, i, "A")] = np.ascontiguousarray(a[i])
            tensors[_peft_key(definition, path, i, "B")] = np.ascontiguousarray(b[i])
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # as bytes through an ordinary open: the file gets the permissions of the other files (safetensors'
    # save_file creates it 0600)
    (folder / ADAPTER_WEIGHTS).write_bytes(save(tensors, metadata={"format": "pt"}))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": lc.r,
        "lora_alpha": lc.alpha,
        "target_modules": sorted(lc.target_modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": cfg.family == "gpt2",
        "use_rslora": lc.use_rslora,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "base_model_name_or_path": base_model_name_or_path,
    }
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    return folder


def _adapter_json(folder: Path) -> dict:
    f = folder / ADAPTER_CONFIG
    if not f.is_file():
        raise UserError(f"{str(folder)!r} is not a PEFT adapter folder (no {ADAPTER_CONFIG})")
    try:
        text = f.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{str(f)!r} is not UTF-8 text; it must be PEFT's JSON adapter config") from None
    except OSError as e:
        raise UserError(f"cannot read {str(f)!r}: {e.strerror or e}") from None
    try:
        c = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{str(f)!r} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(c, dict):
        raise UserError(f"{str(f)!r} must hold a JSON object (PEFT's adapter config), got {c!r:.40}")
    return c


def read_peft_config(folder: str | os.PathLike) -> LoRAConfig:
    """The LoRAConfig of a PEFT adapter folder, every value checked (a UserError names the file and
    the key)."""
    folder = Path(folder)
    c = _adapter_json(folder)
    f = str(folder / ADAPTER_CONFIG)
    if c.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{f!r}: adapter type {c.get('peft_type')!r} is not supported; only LORA")
    for key in ("rank_pattern", "alpha_pattern"):
        if c.get(key):
            raise UserError(f"{f!r}: PEFT adapters with a {key} are not supported")
    if "r" not in c:
        raise UserError(f"{f!r} has no 'r' (the LoRA rank, an integer >= 1)")
    r = c["r"]
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r != int(r) or r < 1:
        raise UserError(f"{f!r}: 'r' must be an integer >= 1, got {r!r}")
    alpha = c.get("lora_alpha", 8)  # PEFT's default
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise UserError(f"{f!r}: 'lora_alpha' must be a number > 0, got {alpha!r}")
    targets = c.get("target_modules")
    if isinstance(targets, str):
        raise UserError(f"{f!r}: target_modules as a regex ({targets!r}) is not supported; list the module names")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise UserError(f"{f!r}: 'target_modules' must be a non-empty list of module names, got {targets!r}")
    rslora = c.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise UserError(f"{f!r}: 'use_rslora' must be true or false, got {rslora!r}")
    return LoRAConfig(r=int(r), alpha=float(alpha), target_modules=tuple(targets), use_rslora=rslora)


def check_peft_weights(folder: str | os.PathLike) -> None:
    """Check that adapter_model.safetensors exists and is whole (its header parses and every
    tensor's bytes are in the file) without reading the tensors."""
    folder = Path(folder)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise UserError(f"{str(folder)!r} has no {ADAPTER_WEIGHTS} (pickled adapter_model.bin is not loaded)")
    w = str(weights)
    try:
        size = weights.stat().st_size
        with weights.open("rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or 8 + n > size:
                raise UserError(
                    f"{w!r} is truncated or not a safetensors file (its header does not fit in its {size} bytes)"
                )
            raw = fh.read(n)
    except OSError as e:
        raise UserError(f"cannot read {w!r}: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, IndexError):
        raise UserError(f"{w!r} is corrupt: its safetensors header is not valid") from None
    if 8 + n + max(ends, default=0) > size:
        raise UserError(f"{w!r} is truncated: its tensors need {8 + n + max(ends)} bytes, the file has {size}")


def load_peft(folder: str | os.PathLike, definition: Definition) -> dict:
    """Read a PEFT LoRA adapter into an adapter tree for `definition` (whose LoRA config must be
    the adapter's: build it with read_peft_config). Checks every tensor name and shape."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from ..models import init_lora

    folder = Path(folder)
    weights = folder / ADAPTER_WEIGHTS
    check_peft_weights(folder)
    try:
        loaded = load_file(str(weights))
    except SafetensorError as e:
        raise UserError(f"{str(weights)!r} is corrupt ({' '.join(str(e).split())})") from None
    tensors = {k.replace(".default.", "."): v for k, v in loaded.items()}
    bad = sorted(k for k, v in loaded.items() if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all())
    if bad:  # scores would be NaN and generation garbage, without a word
        raise UserError(
            f"{str(weights)!r} holds weights that are not finite (NaN or inf) in {len(bad)} tensor(s), e.g. "
            f"{bad[0]!r}; the adapter cannot be used (was it exported from a diverged run?)"
        )
    template = jax.eval_shape(lambda: init_lora(definition))
    used = set()

    out = {}
    for path, spec in modules(template):
        pair = {}
        for factor, key in (("A", "lora_a"), ("B", "lora_b")):
            stack = []
            for i in range(definition.config.num_layers):
                name = _peft_key(definition, path, i, factor)
                if name not in tensors:
                    raise UserError(f"adapter is missing tensor {name!r}")
                want = spec[key].shape[1:]
                if tensors[name].shape != tuple(want):
                    raise UserError(
                        f"adapter tensor {name!r} has shape {tensors[name].shape} but the model needs {tuple(want)}"
                    )
                stack.append(tensors[name])
                used.add(name)
            pair[key] = jnp.asarray(np.stack(stack), jnp.float32)
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = pair
    extra = sorted(set(tensors) - used)
    if extra:
        raise UserError(
            f"adapter has {len(extra)} tensor(s) this model has no place for, e.g. {extra[0]!r}; "
            "does the adapter belong to this model?"
        )
    return out


# ----------------------------------------------------------------------------- the exported folder


def export_adapter(
    folder: str | os.PathLike, definition: Definition, tree: dict, tokenizer: PreTrainedTokenizerBase | None, base: dict
) -> Path:
    """An adapter folder other tools load on their own: the PEFT files naming `base["name_or_path"]`
    (hub.base_reference), the tokenizer files (AutoTokenizer.from_pretrained(folder) works) and the
    base record our own loader prefers (BASE_RECORD)."""
    from ..models.tokenizer_io import save_tokenizer

    folder = save_peft(folder, definition, tree, base.get("name_or_path"))
    base = {**base, "vocab_size": definition.config.vocab_size}
    if tokenizer is not None:
        save_tokenizer(tokenizer, folder)
        base["tokenizer_size"] = len(tokenizer)
    (folder / BASE_RECORD).write_text(json.dumps({"base_model": base}, indent=2))
    return folder


def read_base_record(folder: str | os.PathLike) -> dict | None:
    """The base record of an adapter folder we exported (None for other adapters, or a broken record)."""
    f = Path(folder) / BASE_RECORD
    try:
        rec = json.loads(f.read_text(encoding="utf-8"))["base_model"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return rec if isinstance(rec, dict) else None


def adapter_base(folder: str | os.PathLike) -> str | None:
    """The base model to load an adapter folder with, offline first: the local copy our record names
    (its absolute path, else its path relative to the adapter folder, for a moved run folder), then
    the configured source when it can be resolved again ('default', a hub id), then the adapter's
    base_model_name_or_path."""
    folder = Path(folder)
    rec = read_base_record(folder) or {}
    for key in ("local_path", "relative_path"):
        p = rec.get(key)
        if isinstance(p, str) and p:
            p = Path(p) if key == "local_path" else folder / p
            if p.exists():
                return str(p)
    src = rec.get("source")
    if isinstance(src, str) and (src == "default" or rec.get("format") == "hub"):
        return src
    name = _adapter_json(folder).get("base_model_name_or_path")
    return name if isinstance(name, str) and name else None
