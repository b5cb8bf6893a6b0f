"""What a run leaves to load back: the final adapter (PEFT, with its tokenizer and base record) or
merged model (stacking), its model card, and the one loader of a run folder or adapter folder for
evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..adapters import peft_io
from ..config.run_config import load_config
from ..core.errors import UserError
from ..models.factory import build_model
from .model_card import write_model_card  # noqa: F401  (called by the runner once the summary is known)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..config.run_config import RunConfig
    from ..core.pytypes import Tree
    from ..models import Definition

TINY_BASE = "base_model"


def save_final(
    cfg: RunConfig,
    out: Path,
    definition: Definition,
    base_eff: Tree,
    state_lora: Tree,
    tokenizer: PreTrainedTokenizerBase,
    source: str,
) -> dict:
    """The final global adapter (PEFT format, with the tokenizer files and the base record) or, under
    stacking, the base with the stacked products merged in. The random `tiny` base exists nowhere else,
    so it is saved beside the adapter (base_model/, a Hugging Face folder) and the adapter names it.
    Returns {name: path}. The model card follows with write_model_card, once the summary is known."""
    from ..models.hub import LoadedModel, base_reference, save_merged

    out = Path(out)
    if cfg.fl.aggregation == "stack":
        save_merged(out / "merged_model", LoadedModel(definition, base_eff, {}, tokenizer, {}, source), base_eff)
        return {"merged_model": str(out / "merged_model")}
    saved = {}
    if cfg.model.source == "tiny":
        folder = (out / TINY_BASE).resolve()
        save_merged(folder, LoadedModel(definition, base_eff, {}, tokenizer, {}, source), base_eff)
        base = {
            "source": "tiny",
            "format": "hf_folder",
            "hub_id": None,
            "name_or_path": str(folder),
            "local_path": str(folder),
            "relative_path": f"../{TINY_BASE}",
            "note": f"the run's random tiny Llama (seed {cfg.seed}), saved in {TINY_BASE}/ beside the adapter; "
            "it exists nowhere else",
        }
        saved["base_model"] = str(folder)
    else:
        base = base_reference(cfg.model.source, source)
    peft_io.export_adapter(out / "adapter", definition, state_lora, tokenizer, base)
    return {"adapter": str(out / "adapter"), **saved}


def load_for_eval(
    target: str, model: str | None = None
) -> tuple[Definition, Tree, Tree, PreTrainedTokenizerBase | None, RunConfig | None]:
    """(definition, base, lora, tokenizer, run config or None) for a run folder (its final
    adapter, or its merged model for stacking) or a PEFT adapter folder (with --model, or the base
    its fedlora_jax.json record or its base_model_name_or_path names: peft_io.adapter_base)."""
    from ..models import abstract_model
    from ..models.hub import load_model, load_tokenizer

    t = Path(target)
    if (t / "config.yaml").exists():
        cfg = load_config(str(t / "config.yaml"))
        if (t / "merged_model").exists():
            lm = load_model(str(t / "merged_model"))
            return lm.definition, lm.base, {}, lm.tokenizer, cfg
        definition, base, _, tok, _ = build_model(cfg)
        if not (t / "adapter").exists():
            raise UserError(f"run folder {target!r} has no adapter/ (did the run finish?)")
        lc = peft_io.read_peft_config(t / "adapter")
        definition = abstract_model(definition.config, lc)[0]
        return definition, base, peft_io.load_peft(t / "adapter", definition), tok, cfg
    if (t / peft_io.ADAPTER_CONFIG).exists():
        lc = peft_io.read_peft_config(t)
        src = model or peft_io.adapter_base(t)
        if not src:
            raise UserError(f"adapter {target!r} does not name its base model; pass --model")
        lm = load_model(src, dtype="float32")
        try:
            lc.check(lm.config)
            definition = abstract_model(lm.config, lc)[0]
            lora = peft_io.load_peft(t, definition)
        except ValueError as e:
            raise UserError(f"adapter {target!r} does not match model {src!r}: {e}") from e
        tok = lm.tokenizer if lm.tokenizer is not None else load_tokenizer(t)  # the copy saved with the adapter
        return definition, lm.base, lora, tok, None
    raise UserError(f"{target!r} is neither a run folder (config.yaml) nor a PEFT adapter folder (adapter_config.json)")
