"""The run's outputs: <stem>.json (the results as measured) and <stem>.md (their tables), in the output
folder; written after every step, and by the watchdog."""

from __future__ import annotations

import json
import os
import time


def save(run):
    with run.save_lock:
        run.res["elapsed_s"] = round(run.elapsed(), 1)
        run.out_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # the watchdog may save while the main thread is adding a key
            try:
                text = json.dumps(run.res, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o))
                md = markdown(run)
                break
            except RuntimeError:
                time.sleep(0.05)
        else:
            return
        (run.out_dir / f"{run.stem}.json").write_text(text)
        (run.out_dir / f"{run.stem}.md").write_text(md)


# ----------------------------------------------------------------------------- cells


def _f(x, spec=".3g"):
    return "-" if x is None else format(x, spec)


def tflops(flops):
    return _f((flops or 0) / 1e12 or None)


def gib(nbytes):
    return _f((nbytes or 0) / 2**30 or None)


def pct(fraction):
    return _f(100 * fraction if fraction else None, ".1f")


def row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def table(title, columns, rows, note=None) -> list[str]:
    """A section: its title, a header of `columns` (name, cell(item)) and one row per item."""
    lines = [title, "", row(*(c for c, _ in columns)), row(*(["---"] * len(columns)))]
    for item in rows:
        lines.append(note(item) if note and note(item) else row(*(cell(item) for _, cell in columns)))
    return lines + [""]


# ----------------------------------------------------------------------------- tables: (header, cell of a row)

CHECKS = (
    ("check", lambda kv: kv[0]),
    ("result", lambda kv: kv[1].get("result")),
    ("measured", lambda kv: kv[1].get("measured", "")),
    ("bound", lambda kv: kv[1].get("bound", "")),
)
PROFILE = (
    ("class of op", lambda kv: kv[0]),
    ("ms", lambda kv: f"{kv[1]['ms']:.3g}"),
    ("share", lambda kv: f"{kv[1]['share']:.0%}"),
)


def _cu(r, method):
    return _f(r.get(method, {}).get("client_updates_per_s"))


TIMING = (
    ("regime", lambda kv: kv[0]),
    ("clients", lambda kv: kv[1]["params"]["clients"]),
    ("ours round s", lambda kv: _f(kv[1].get("ours", {}).get("median_s"))),
    ("ours", lambda kv: _cu(kv[1], "ours")),
    ("sequential JAX", lambda kv: _cu(kv[1], "sequential_jax")),
    ("PyTorch+PEFT", lambda kv: _cu(kv[1], "torch_peft")),
    ("vs PyTorch+PEFT", lambda kv: _f(kv[1].get("ours_vs_torch_peft"), ".2f") + "x"),
    ("vs seq. JAX", lambda kv: _f(kv[1].get("ours_vs_sequential_jax"), ".2f") + "x"),
    ("TFLOP/s", lambda kv: tflops(kv[1].get("achieved_flops"))),
    ("% peak", lambda kv: pct(kv[1].get("fraction_of_peak"))),
)
SWEEP = (
    ("clients_per_chunk", lambda st: st["chunk"]),
    ("fits", lambda st: st["fits"]),
    ("round s", lambda st: _f(st.get("round_s"))),
    ("client-updates/s", lambda st: _f(st.get("client_updates_per_s"))),
    ("TFLOP/s", lambda st: tflops(st.get("achieved_flops"))),
    ("% peak", lambda st: pct(st.get("fraction_of_peak"))),
    ("6NT TFLOP/s", lambda st: tflops(st.get("achieved_flops_6nt"))),
    ("XLA temp GiB", lambda st: gib(st.get("temp_bytes"))),
)


def _largest(r):
    lc = r.get("largest_chunk")
    return "-" if not lc else (lc.get("largest") or f"none ({lc.get('stopped_by') or lc.get('error', '')[:40]})")


def _faster(r):
    return "baseline" if r.get("correct_measured") == "the reference" else ("yes" if r.get("faster") else "no")


LEVERS = (
    ("setting", lambda kv: kv[0]),
    ("attention", lambda kv: kv[1]["attention"]),
    ("remat", lambda kv: kv[1]["remat"]),
    ("round s (median)", lambda kv: _f(kv[1].get("median_s"))),
    ("spread s", lambda kv: _f(kv[1].get("spread_s"), ".2g")),
    ("client-updates/s", lambda kv: _f(kv[1].get("client_updates_per_s"))),
    ("TFLOP/s", lambda kv: tflops(kv[1].get("achieved_flops"))),
    ("% peak", lambda kv: pct(kv[1].get("fraction_of_peak"))),
    ("XLA temp GiB", lambda kv: gib(kv[1].get("temp_bytes"))),
    ("vs baseline", lambda kv: _f(kv[1].get("vs_baseline"), ".3f") + "x"),
    ("faster", lambda kv: _faster(kv[1])),
    ("correct", lambda kv: kv[1].get("correct", "-")),
    ("largest clients_per_chunk", lambda kv: _largest(kv[1])),
)


def _lever_error(kv):
    name, r = kv
    return (
        f"| {name} | {r['attention']} | {r['remat']} | error: {r['error'][:80]} |" + " |" * 9 if "error" in r else None
    )


def _largest_line(lc) -> str:
    fit = [st for st in lc.get("steps", []) if st.get("fits")]
    there = f"; there {fit[0]['round_s']:.3g} s/round, {fit[0]['client_updates_per_s']:.3g} client-updates/s"
    return (
        f"largest clients_per_chunk {lc.get('largest')} ({lc.get('stopped_by', lc.get('error'))}); predicted "
        f"{lc.get('predicted')} from XLA's memory analysis ({gib(lc.get('per_client_bytes'))} GiB per client, "
        f"free {gib(lc.get('free_bytes'))} GiB), plan's analytic estimate {lc.get('plan_memory_chunk')}"
        + (there if fit else "")
    )


def levers_lines(lv) -> list[str]:
    s = lv["settings"]
    lines = table(
        f"## (d) Levers ({lv.get('regime')}, {lv.get('reps')} interleaved repetitions)", LEVERS, s.items(), _lever_error
    )
    lines += [lv.get("recommendation", "recommended: - (the timing did not finish)"), ""]
    pr = lv.get("attention_probe") or {}
    if pr.get("ms") or pr.get("errors"):
        ms = ", ".join(f"{n} {v:.3g}" for n, v in pr["ms"].items())
        lines += [
            f"attention alone, forward + backward at {pr['shape']} (rows, seq, heads, kv heads, head dim; "
            f"{pr['dtype']}), ms: {ms or '-'}; unavailable: {', '.join(pr['errors']) or 'none'}",
            "",
        ]
    for name, r in s.items():
        if r.get("correct_measured") and r["correct_measured"] != "the reference":
            lines.append(
                f"- {name}: {r['correct_measured']}"
                + (f"; attention: {r['attention_kernel']}" if r.get("attention_kernel") else "")
            )
        lc = r.get("largest_chunk") or {}
        if lc:
            lines.append(f"- {name}: " + _largest_line(lc))
    return lines + [""]


def _timing_error(kv):
    name, r = kv
    return f"| {name} | error: {r['error'][:80]} |" + " |" * 8 if "error" in r else None


def markdown(run) -> str:
    res, args = run.res, run.args
    m = res.get("machine", {})
    lines = [
        f"# Accelerator check{' (smoke, CPU toy sizes)' if args.smoke else ''}",
        "",
        f"device: {m.get('device_kind')} ({m.get('backend')}), bf16 dense peak {tflops(m.get('peak_flops'))} "
        f"TFLOP/s, measured matmul {tflops(m.get('measured_matmul_flops'))} TFLOP/s "
        f"({m.get('measured_matmul_dtype')}); jax {m.get('jax')}, torch {m.get('torch')}, peft {m.get('peft')}; "
        f"wall {res.get('elapsed_s')} s of budget {args.budget:g} s",
        "",
    ]
    if res["checks"]:
        lines += table("## (a) Checks", CHECKS, res["checks"].items())
    if res.get("profile"):
        pr = res["profile"]
        classes = [(k, v) for k, v in pr["classes"].items() if not k.startswith("_")]
        lines += table(
            f"## Profile of the {pr['regime']} round (ms per round, share of its wall time)", PROFILE, classes
        )
    if res.get("paper"):
        a, b = res["paper"].get("paper", {}), res["paper"].get("population", {})
        lines += ["## The paper's setting on this device", "", row("setting", "figure"), row("---", "---")]
        if a:
            lines.append(
                f"| {a['what']} | {a['seconds_per_round']:.3g} s/round; 200 rounds in "
                f"{a['projected_seconds_for_paper_rounds'] / 60:.3g} min; {a['tflops_per_s']:.3g} TFLOP/s; "
                f"peak {gib(a.get('device_peak_bytes'))} GiB |"
            )
        if b:
            lines.append(f"| {b['what']} | {b['rounds_per_second']:.3g} rounds/s |")
        lines.append("")
    if res["timing"]:
        lines += table("## (b) Timing (medians; client-updates/s)", TIMING, res["timing"].items(), _timing_error)
    if res.get("levers", {}).get("settings"):
        lines += levers_lines(res["levers"])
    sw = res["sweep"]
    if sw.get("steps"):
        lines += table(f"## (c) clients_per_chunk sweep ({sw.get('regime')}, one chunk per round)", SWEEP, sw["steps"])
        lines += [
            f"largest clients_per_chunk that fits: {sw.get('largest_fitting')} "
            f"({sw.get('stopped_by')}); JAX memory pool {gib(sw.get('pool_bytes'))} GiB "
            f"(XLA_PYTHON_CLIENT_MEM_FRACTION={os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION')})",
            "",
        ]
    if res["skipped"]:
        lines += ["## Skipped", ""] + [f"- {s}" for s in res["skipped"]] + [""]
    lines += [
        "FLOPs: frozen base kernels 4/param/token (forward + input gradient), LoRA 6/param/token, attention "
        "12 L S d per token; '6NT' = 6 x all matmul params x tokens (+ attention).",
        "",
    ]
    return "\n".join(lines)
