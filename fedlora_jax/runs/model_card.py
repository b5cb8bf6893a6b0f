"""The model card (README.md with Hugging Face's YAML front matter) of an exported adapter or merged
model: what it was trained from, how, with what privacy (the run summary's honest figures, and what
lies outside the guarantee), the command that made it, and how to load and evaluate it elsewhere.

It is written once the run's summary is known (`write_model_card`, called after summary.json)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import yaml

from ..config.run_config import RunConfig, config_diff, load_config, preset_names
from .reporting import SCORES
from .usage import _usage, gguf_pretrained, lm_eval_args, lm_eval_command, python_usage  # noqa: F401  (re-exported)

CARD = "README.md"
TAGS = ["lora", "peft", "federated-learning", "differential-privacy", "fedlora-jax"]
# privacy-block keys rendered in their own sentences; the rest are listed as they are
_SAID = {
    "mechanism",
    "epsilon",
    "delta",
    "epsilon_of",
    "neighbouring",
    "epsilon_mean",
    "epsilon_paper",
    "epsilon_paper_tracker",
    "outside_guarantee",
    "noise_seed",
    "published",
    "aggregation_weights",
}


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)


def _g(x) -> str:
    """A privacy figure with 6 significant digits (4 could round epsilon down noticeably)."""
    return "n/a" if x is None else f"{x:g}"


def _set_value(v) -> str:
    """A --set value that load_config parses back to `v` (YAML flow style)."""
    return yaml.safe_dump(v, default_flow_style=True, width=1 << 30).removesuffix("\n...\n").strip()


def reproduce_command(cfg: RunConfig, out: str | Path | None = None) -> str:
    """`fedlora-jax run PRESET --set KEY=VALUE ...` that rebuilds `cfg` exactly (the preset needing the
    fewest overrides; checked by loading it back), else `fedlora-jax run OUT/config.yaml`."""
    best = None
    for preset in preset_names():
        diff = config_diff(load_config(preset), cfg, ignore=())
        sets = [f"{k}={_set_value(v)}" for k in diff for v in [_lookup(cfg.to_dict(), k)]]
        try:
            same = load_config(preset, sets) == cfg
        except Exception:  # an override that does not parse back: not this preset
            same = False
        if same and (best is None or len(sets) < len(best[1])):
            best = (preset, sets)
    tail = ["--out", str(out)] if out is not None else []
    if best is None:
        return shlex.join(["fedlora-jax", "run", str(Path(out or ".") / "config.yaml"), *tail])
    return shlex.join(["fedlora-jax", "run", best[0], *(x for s in best[1] for x in ("--set", s)), *tail])


def _lookup(d: dict, dotted: str):
    for k in dotted.split("."):
        d = d.get(k) if isinstance(d, dict) else None
    return d


def cli_command() -> str | None:
    """The command line as typed, when this process is `fedlora-jax run ...`."""
    argv = sys.argv
    if argv and Path(argv[0]).name in ("fedlora-jax", "fedlora_jax") and "run" in argv[1:2]:
        return shlex.join(["fedlora-jax", *argv[1:]])
    return None


def _privacy(cfg: RunConfig, p: dict) -> list[str]:
    if cfg.dp.mode == "none":
        return [
            "**No differential privacy** (`dp.mode: none`): this adapter carries **no DP guarantee**; "
            "what it learned from the clients' data can leak through it."
        ]
    lines = [f"- DP mode: `{cfg.dp.mode}`; mechanism: {p.get('mechanism', 'n/a')}"]
    eps, delta = p.get("epsilon"), p.get("delta", cfg.dp.delta)
    lines.append(
        f"- Guarantee (accountant, dp-accounting): **epsilon = {_g(eps)}, delta = {_g(delta)}**"
        f" (epsilon of: {p.get('epsilon_of', 'each client')}; {p.get('neighbouring', cfg.dp.neighbouring)}"
        " neighbouring)"
    )
    if p.get("epsilon_mean") is not None:
        lines.append(f"- Mean over clients: epsilon = {_g(p['epsilon_mean'])}")
    for key, what in (
        ("epsilon_paper", "the paper's convention (classical Gaussian formula per release)"),
        ("epsilon_paper_tracker", "the paper's tracker"),
    ):
        if p.get(key) is not None:
            lines.append(f"- {key} = {p[key]:g}: {what}; this is not a privacy guarantee")
    for key in ("aggregation_weights", "noise_seed", "published"):
        if p.get(key):
            lines.append(f"- {key.replace('_', ' ')}: {p[key]}")
    outside = p.get("outside_guarantee") or []
    if outside:
        lines.append("- Outside the guarantee (published, but not covered by epsilon/delta): " + "; ".join(outside))
    else:
        lines.append("- Outside the guarantee: nothing the run published")
    rest = {k: v for k, v in p.items() if k not in _SAID}
    if rest:
        lines.append("- Details: " + ", ".join(f"{k} = {_num(v)}" for k, v in rest.items()))
    return lines


def model_card(
    cfg: RunConfig,
    summary: dict,
    base: dict,
    command: str | None = None,
    reproduce: str | None = None,
    merged: bool = False,
) -> str:
    """The card's text. `base`: the adapter's base record (hub.base_reference); `command`: the command
    line as typed; `reproduce`: a command that rebuilds the config (default: reproduce_command)."""
    hub_id, where = base.get("hub_id"), base.get("name_or_path")
    meta = {"library_name": "transformers" if merged else "peft", "tags": list(TAGS)}
    if hub_id:
        meta["base_model"] = hub_id
    meta["pipeline_tag"] = "text-generation"
    fl, lc, d = cfg.fl, cfg.lora, cfg.data
    base_line = hub_id or where or base.get("source") or cfg.model.source
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False).strip(),
        "---",
        "",
        f"# {cfg.name}: {'merged model' if merged else 'LoRA adapter'} from federated fine-tuning (fedlora-jax)",
        "",
        "## Base model",
        f"- {base_line}"
        + (f" (loaded from {base['local_path']})" if base.get("local_path") not in (None, base_line) else ""),
    ]
    if base.get("note"):
        lines.append(f"- Note: {base['note']}")
    lines += [
        "",
        "## Training",
        f"- data: {d.source} (template {d.template} for instruction rows, the chat template for conversations; "
        f"partition {d.partition}, seq_len {d.seq_len})",
        f"- rounds: {summary.get('rounds', 'n/a')} (of {fl.rounds} configured; stopped: "
        f"{summary.get('stop_reason', 'n/a')})",
        f"- clients: {fl.num_clients}",
        f"- clients per round: {fl.clients_per_round} ({fl.sampling} sampling)",
        f"- algorithm: {fl.algorithm}, aggregation: {fl.aggregation}, {fl.local_steps} local steps of "
        f"batch {fl.batch_size}, lr {fl.lr:g}",
        f"- LoRA: rank {lc.r}, alpha {lc.alpha:g}"
        + (" (rsLoRA)" if lc.use_rslora else "")
        + f", targets {', '.join(lc.target_modules)}",
        f"- seed: {cfg.seed}",
        "",
        "## Privacy",
        *_privacy(cfg, summary.get("privacy") or {}),
        "",
        '## Results (held-out split of the run; "after" is this adapter)',
        *_results(summary),
        "",
        "## Command",
    ]
    if command:
        lines += ["Made by:", "", "```", command, "```", ""]
    lines += ["Rebuilds this configuration:", "", "```", reproduce or reproduce_command(cfg), "```", ""]
    lines += _usage(base, merged)
    return "\n".join(lines) + "\n"


def _results(summary: dict) -> list[str]:
    """Before (the base) and after (the exported adapter, whatever stopped the run) with their n; the
    scores with their 95% interval."""
    ev = summary.get("eval") or {}
    before, after = ev.get("before") or {}, ev.get("after") or {}
    f = lambda x: "n/a" if x is None else f"{x:.4f}"
    loss_before = before.get("loss", summary.get("initial_eval_loss"))
    loss_after = after.get("loss", summary.get("final_eval_loss"))
    n = after.get("n", before.get("n"))
    lines = [
        "- eval loss (mean NLL per response token"
        + (f", n = {n} held-out examples, {after.get('tokens')} tokens" if n is not None else "")
        + f"): {f(loss_before)} before (the base model), {f(loss_after)} after (this adapter, round "
        f"{after.get('round', summary.get('rounds', 'n/a'))})"
    ]
    for k in SCORES:
        a, b = after.get(k), before.get(k)
        if a is None:
            continue
        lo, hi = a.get("ci95") or (None, None)
        interval = f"; 95% interval [{f(lo)}, {f(hi)}]" if lo is not None else ""
        lines.append(
            f"- {k.replace('eval_', '')}: {f((b or {}).get('value'))} before, {f(a['value'])} after "
            f"(n = {a.get('n')}{interval})"
        )
    return lines


def write_model_card(out: str | Path, cfg: RunConfig, summary: dict) -> Path | None:
    """Write README.md into the run's adapter/ (or merged_model/) once `summary` is known; returns its
    path (None when the run saved neither)."""
    from ..adapters.peft_io import read_base_record

    out = Path(out)
    merged = (out / "merged_model").is_dir() and not (out / "adapter").is_dir()
    folder = out / ("merged_model" if merged else "adapter")
    if not folder.is_dir():
        return None
    base = read_base_record(folder) or {"source": cfg.model.source, "name_or_path": summary.get("model")}
    text = model_card(cfg, summary, base, command=cli_command(), reproduce=reproduce_command(cfg, out), merged=merged)
    (folder / CARD).write_text(text, encoding="utf-8")
    return folder / CARD
