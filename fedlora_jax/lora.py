"""LoRA utilities over the pure-dict adapter tree: rank masks, frozen A, merging, and PEFT's
adapter format (adapter_config.json + adapter_model.safetensors).

An adapter tree mirrors the model: ``lora['blocks']['attn']['q_proj'] = {'lora_a': [L, r, in],
'lora_b': [L, out, r]}`` with a leading layer axis (PEFT's per-layer layout otherwise).
"""

from __future__ import annotations

from .errors import UserError
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from .models import Definition, LoRAConfig
from .models.hub import hf_module_name

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def modules(tree: dict, prefix: tuple = ()):
    """Yield (module path, {'lora_a': A, 'lora_b': B}) for every adapted module."""
    for k, v in tree.items():
        if isinstance(v, dict) and "lora_a" in v:
            yield prefix + (k,), v
        elif isinstance(v, dict):
            yield from modules(v, prefix + (k,))


def map_modules(fn, *trees):
    """Rebuild adapter trees applying fn(A_1, ..., A_n, B_1, ..., B_n) -> (A, B) per module."""
    def rec(*nodes):
        if "lora_a" in nodes[0]:
            a, b = fn(*[n["lora_a"] for n in nodes], *[n["lora_b"] for n in nodes])
            return {"lora_a": a, "lora_b": b}
        return {k: rec(*[n[k] for n in nodes]) for k in nodes[0]}
    return rec(*trees)


def rank_of(tree: dict) -> int:
    """The (padded) rank r of an adapter tree."""
    return next(modules(tree))[1]["lora_a"].shape[-2]


def rank_mask(tree: dict, rank) -> dict:
    """Zero rows >= rank of every A and columns >= rank of every B. `rank` may be a traced scalar,
    so clients of different ranks share one padded shape under vmap; multiplying by the mask
    also makes the gradient of the masked entries exactly zero."""
    def fn(a, b):
        keep = jnp.arange(a.shape[-2]) < rank
        keep_a = keep.reshape((1,) * (a.ndim - 2) + (-1, 1)).astype(a.dtype)
        keep_b = keep.reshape((1,) * (b.ndim - 1) + (-1,)).astype(b.dtype)
        return a * keep_a, b * keep_b
    return map_modules(fn, tree)


def delta_weights(definition: Definition, tree: dict):
    """Yield (module path, scale * B @ A) with a leading layer axis: the update each module adds."""
    scale = definition.lora.scale
    for path, m in modules(tree):
        yield path, scale * jnp.einsum("lor,lri->loi", m["lora_b"], m["lora_a"])


def merge(definition: Definition, base: dict, tree: dict) -> dict:
    """Base parameters with scale * B A folded into each adapted kernel (kernel is [in, out])."""
    out = jax.tree.map(lambda x: x, base)
    for path, delta in delta_weights(definition, tree):
        node = out
        for k in path:
            node = node[k]
        node["kernel"] = (node["kernel"] + jnp.swapaxes(delta, -1, -2)).astype(node["kernel"].dtype)
    return out


# ----------------------------------------------------------------------------- PEFT format

def _peft_key(definition, path, layer, factor):
    return f"base_model.model.{hf_module_name(definition.config, path, layer)}.lora_{factor}.weight"


def save_peft(folder: str | os.PathLike, definition: Definition, tree: dict,
              base_model_name_or_path: str | None = None) -> Path:
    """Write `tree` as a PEFT LoRA adapter that peft.PeftModel.from_pretrained loads."""
    from safetensors.numpy import save_file

    cfg, lc = definition.config, definition.lora
    tensors = {}
    for path, m in modules(tree):
        a, b = (np.asarray(jax.device_get(m[k]), np.float32) for k in ("lora_a", "lora_b"))
        for i in range(cfg.num_layers):
            tensors[_peft_key(definition, path, i, "A")] = np.ascontiguousarray(a[i])
            tensors[_peft_key(definition, path, i, "B")] = np.ascontiguousarray(b[i])
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lc.r, "lora_alpha": lc.alpha,
        "target_modules": sorted(lc.target_modules), "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": cfg.family == "gpt2", "use_rslora": lc.use_rslora, "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None,
        "base_model_name_or_path": base_model_name_or_path,
    }
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    return folder


def read_peft_config(folder: str | os.PathLike) -> LoRAConfig:
    folder = Path(folder)
    f = folder / ADAPTER_CONFIG
    if not f.exists():
        raise UserError(f"{str(folder)!r} is not a PEFT adapter folder (no {ADAPTER_CONFIG})")
    c = json.loads(f.read_text())
    if c.get("peft_type", "LORA") != "LORA":
        raise UserError(f"adapter type {c.get('peft_type')!r} is not supported; only LORA")
    for key in ("rank_pattern", "alpha_pattern"):
        if c.get(key):
            raise UserError(f"PEFT adapters with a {key} are not supported")
    targets = c["target_modules"]
    if isinstance(targets, str):
        raise UserError(f"target_modules as a regex ({targets!r}) is not supported; list the module names")
    return LoRAConfig(r=int(c["r"]), alpha=float(c["lora_alpha"]), target_modules=tuple(targets),
                      use_rslora=bool(c.get("use_rslora", False)))


def load_peft(folder: str | os.PathLike, definition: Definition) -> dict:
    """Read a PEFT LoRA adapter into an adapter tree for `definition` (whose LoRA config must be
    the adapter's: build it with read_peft_config). Checks every tensor name and shape."""
    from safetensors.numpy import load_file

    from .models import init_lora

    folder = Path(folder)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.exists():
        raise UserError(f"{str(folder)!r} has no {ADAPTER_WEIGHTS} (pickled adapter_model.bin is not loaded)")
    tensors = {k.replace(".default.", "."): v for k, v in load_file(str(weights)).items()}
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
                    raise UserError(f"adapter tensor {name!r} has shape {tensors[name].shape} "
                                     f"but the model needs {tuple(want)}")
                stack.append(tensors[name])
                used.add(name)
            pair[key] = jnp.asarray(np.stack(stack), jnp.float32)
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = pair
    extra = sorted(set(tensors) - used)
    if extra:
        raise UserError(f"adapter has {len(extra)} tensor(s) this model has no place for, e.g. {extra[0]!r}; "
                         "does the adapter belong to this model?")
    return out


def reinit(tree: dict, key) -> dict:
    """Fresh factors of the same shapes: A ~ U(-1/sqrt(in), 1/sqrt(in)) as PEFT (and
    models.layers.Linear) initialise it, B = 0. Jittable; used when stacking restarts adapters."""
    out, i = {}, 0

    def rec(node, k):
        nonlocal i
        if "lora_a" in node:
            a = node["lora_a"]
            bound = 1.0 / jnp.sqrt(jnp.asarray(a.shape[-1], a.dtype))
            i += 1
            return {"lora_a": jax.random.uniform(jax.random.fold_in(k, i), a.shape, a.dtype, -bound, bound),
                    "lora_b": jnp.zeros_like(node["lora_b"])}
        return {name: rec(child, k) for name, child in node.items()}

    return rec(tree, key)
