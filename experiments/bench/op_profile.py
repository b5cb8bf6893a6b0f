"""Where a compiled round's time goes, by class of op, from a jax.profiler trace (CPU or GPU).

Each traced event is joined to the compiled HLO by its name (CPU: the HLO instruction; GPU: the
kernel's `hlo_op` argument, or its name) and put in a class from the instruction and the
computation it calls: matmuls of the frozen base and the head, LoRA products (a dot with the LoRA
rank among its dimensions), attention (dots with three or more batch dimensions, fused attention
custom calls), softmax/exp, collectives, other elementwise and reductions. What the trace's wall
time holds beyond the attributed ops is "host and unattributed" (dispatch, transfers, idle).

    from op_profile import profile_by_class
    shares = profile_by_class(compiled, call, rank=8)   # {class: {"ms": per round, "share": of wall}}
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import tempfile
import time

import jax

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")


def hlo_ops(text: str) -> dict[str, tuple[str, list[str]]]:
    """{instruction name: (its line, the lines of the computation it calls)} of compiled HLO."""
    comps, cur = {}, None
    for line in text.splitlines():
        m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if m:
            cur = comps.setdefault(m.group(1), [])
        elif cur is not None:
            cur.append(line)
    ops = {}
    for lines in comps.values():
        for line in lines:
            m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = ", line)
            if m:
                called = re.search(r"calls=%?([\w.\-]+)", line)
                ops[m.group(1)] = (line, comps.get(called.group(1), []) if called else [])
    return ops


def classify(line: str, body: list[str], rank: int) -> str:
    """The class of one op from its HLO line and the body of the computation it calls."""
    text = line + "\n" + "\n".join(body)
    if any(f" {c}(" in text or f" {c}-start(" in text for c in COLLECTIVES):
        return "collectives"
    if re.search(r"fmha|flash|dot_product_attention", text, re.I):
        return "attention"
    dots = [x for x in [line, *body] if " dot(" in x or "gemm" in x.lower() or "matmul" in x.lower()]
    if dots:
        batch = re.search(r"lhs_batch_dims=\{([\d,]*)\}", dots[0])
        if batch and len([d for d in batch.group(1).split(",") if d]) >= 3:
            return "attention"
        dims = {int(d) for s in re.findall(r"\[([\d,]+)\]", " ".join(dots)) for d in s.split(",") if d}
        return "LoRA products" if rank in dims else "matmuls (base, head)"
    if " exponential(" in text:
        return "softmax/exp"
    if " reduce(" in text:
        return "reductions"
    return "elementwise and other"


def profile_by_class(compiled, call, rank: int, rounds: int = 2) -> dict:
    """Milliseconds per round and share of the traced wall time by class of op (see the module);
    call() runs one round of `compiled` to completion."""
    ops = hlo_ops(compiled.as_text())
    call()  # warm
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            t0 = time.perf_counter()
            for _ in range(rounds):
                call()
            wall_ms = (time.perf_counter() - t0) * 1e3 / rounds
        (trace,) = glob.glob(f"{tmp}/**/perfetto_trace.json.gz", recursive=True)
        events = json.load(gzip.open(trace))
    events = events["traceEvents"] if isinstance(events, dict) else events
    ms = collections.Counter()
    for e in events:
        if e.get("ph") != "X":
            continue
        name = (e.get("args") or {}).get("hlo_op") or e.get("name")
        if name in ops:
            ms[classify(*ops[name], rank)] += e.get("dur", 0) / 1e3 / rounds
    attributed = sum(ms.values())
    # CPU ops of one round can run on several threads at once; the shares are of the larger figure
    total = max(wall_ms, attributed)
    ms["host and unattributed"] = max(total - attributed, 0.0)
    return {k: {"ms": v, "share": v / total} for k, v in ms.most_common()} | {"_wall_ms": {"ms": wall_ms, "share": 1.0}}
