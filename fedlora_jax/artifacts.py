"""What a run leaves to load back: the final adapter (PEFT) or merged model (stacking), and the
one loader of a run folder or adapter folder for evaluation."""

from __future__ import annotations

import json
from pathlib import Path

from . import lora as lora_lib
from .config import load_config
from .errors import UserError
from .models.factory import build_model


def save_final(cfg, out: Path, definition, base_eff, state_lora, tokenizer, source) -> dict:
    """The final global adapter (PEFT format) or, under stacking, the base with the stacked
    products merged in. Returns {name: path}."""
    if cfg.fl.aggregation == "stack":
        from .models.hub import LoadedModel, save_merged

        save_merged(out / "merged_model", LoadedModel(definition, base_eff, {}, tokenizer, {}, source), base_eff)
        return {"merged_model": str(out / "merged_model")}
    lora_lib.save_peft(out / "adapter", definition, state_lora, None if cfg.model.source == "tiny" else source)
    return {"adapter": str(out / "adapter")}


def load_for_eval(target: str, model: str | None = None):
    """(definition, base, lora, tokenizer, run config or None) for a run folder (its final
    adapter, or its merged model for stacking) or a PEFT adapter folder (with --model, or the
    adapter's base_model_name_or_path)."""
    from .models import abstract_model
    from .models.hub import load_model

    t = Path(target)
    if (t / "config.yaml").exists():
        cfg = load_config(str(t / "config.yaml"))
        if (t / "merged_model").exists():
            lm = load_model(str(t / "merged_model"))
            return lm.definition, lm.base, {}, lm.tokenizer, cfg
        definition, base, _, tok, _ = build_model(cfg)
        if not (t / "adapter").exists():
            raise UserError(f"run folder {target!r} has no adapter/ (did the run finish?)")
        lc = lora_lib.read_peft_config(t / "adapter")
        definition = abstract_model(definition.config, lc)[0]
        return definition, base, lora_lib.load_peft(t / "adapter", definition), tok, cfg
    if (t / lora_lib.ADAPTER_CONFIG).exists():
        lc = lora_lib.read_peft_config(t)
        src = model or json.loads((t / lora_lib.ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
        if not src:
            raise UserError(f"adapter {target!r} does not name its base model; pass --model")
        lm = load_model(src, dtype="float32")
        try:
            lc.check(lm.config)
            definition = abstract_model(lm.config, lc)[0]
            lora = lora_lib.load_peft(t, definition)
        except ValueError as e:
            raise UserError(f"adapter {target!r} does not match model {src!r}: {e}") from e
        return definition, lm.base, lora, lm.tokenizer, None
    raise UserError(f"{target!r} is neither a run folder (config.yaml) nor a PEFT adapter folder (adapter_config.json)")
