"""Where a round's CPU time goes, and what a change to it buys (issue: CPU efficiency).

For the cross-device and mid regimes of scale_bench.py:
1. a per-op profile of our round: jax.profiler's trace, each XLA op's time joined to the compiled
   HLO and put in a class (base / LoRA / attention / head matmuls, forward or backward; softmax
   and exp; transposes and copies; other elementwise; reductions; the optimizer, clipping and
   noise outside the local steps);
2. before/after of the kept changes, interleaved and repeated in one process: the language-model
   loss unfused (log_softmax + take_along_axis under autodiff) against fused (models/loss.py), and
   attention with a group axis of size 1 (when there is no GQA) against without; and changes tried
   and not kept because they measured slower (per-client merging of W + s B A; attention with a
   hand-written backward; q, k and v as one matmul);
3. share of this machine's float32 matmul peak (measured between the rounds) from the analytic
   FLOPs, and the matmul bound: the round's dots timed one by one, the least time any fusion of
   the rest of the round could reach with this matmul library;
4. the chunk a round picks when fl.clients_per_chunk is unset (plan.auto_chunk) against the
   regime's chunk (the whole cohort at once in the mid regime).

    python experiments/bench/efficiency_bench.py [--reps 5]   # -> results/efficiency.{json,md}
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import gzip
import json
import re
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import scale_bench as sb
from op_profile import hlo_ops

import fedlora_jax.models as models
from fedlora_jax.federated.plan import auto_chunk
from fedlora_jax.models import layers, llama

FUSED_TOKEN_NLL = models.token_nll
ATTENTION = layers.attention
LINEAR_CALL = layers.Linear.__call__
ATTENTION_CALL = llama.Attention.__call__


def unfused_token_nll(definition, base, lora, tokens, mask, loss_mask=None):
    """The loss before: log_softmax of the sliced logits and the target's entry, under autodiff."""
    logits = models.apply(definition, base, lora, tokens, mask)[:, :-1]
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    weights = (mask if loss_mask is None else loss_mask)[:, 1:].astype(jnp.float32)
    if loss_mask is not None:
        weights = weights * mask[:, 1:].astype(jnp.float32)
    return nll, weights


def grouped_attention(q_bshd, k_bskd, v_bskd, allowed_bst, scale):
    """The attention before: a group axis (of size 1 without GQA) in every einsum."""
    b, s, h, d = q_bshd.shape
    kv = k_bskd.shape[2]
    q = q_bshd.reshape(b, s, kv, h // kv, d)
    logits = jnp.einsum("bskgd,btkd->bkgst", q, k_bskd, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(allowed_bst[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_bskd.dtype)
    return jnp.einsum("bkgst,btkd->bskgd", probs, v_bskd).reshape(b, s, h * d)


def merged_linear_call(self, x):
    """Tried, not kept: per-client merging, y = x (W + s (B A)^T): one matmul per client instead of the
    shared base matmul plus two thin LoRA matmuls (the issue's suggestion for small hidden sizes)."""
    dt = x.dtype
    w = self.kernel[...].astype(dt)
    if self.lora_a is not None:
        w = w + (self.lora_b[...].astype(dt) @ self.lora_a[...].astype(dt)).T * jnp.asarray(self.lora_scale, dt)
    y = x @ w
    if self.bias is not None:
        y = y + layers._lead(self.bias[...].astype(dt), y)
    return y


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _mha(q, k, v, allowed, scale):
    return _mha_fwd(q, k, v, allowed, scale)[0]


def _mha_fwd(q, k, v, allowed, scale):
    logits = jnp.einsum("bshd,bthd->bhst", q, k, preferred_element_type=jnp.float32) * scale
    probs = jax.nn.softmax(jnp.where(allowed[:, None], logits, jnp.finfo(jnp.float32).min), axis=-1)
    return jnp.einsum("bhst,bthd->bshd", probs.astype(v.dtype), v), (q, k, v, probs)


def _mha_bwd(scale, res, d_out):
    q, k, v, probs = res
    d_v = jnp.einsum("bhst,bshd->bthd", probs.astype(d_out.dtype), d_out)
    d_p = jnp.einsum("bshd,bthd->bhst", d_out, v, preferred_element_type=jnp.float32)
    d_s = (probs * (d_p - jnp.sum(d_p * probs, axis=-1, keepdims=True)) * scale).astype(q.dtype)
    return jnp.einsum("bhst,bthd->bshd", d_s, k), jnp.einsum("bhst,bshd->bthd", d_s, q), d_v, None


_mha.defvjp(_mha_fwd, _mha_bwd)


def hand_backward_attention(q_bshd, k_bskd, v_bskd, allowed_bst, scale):
    """Tried, not kept: attention with a hand-written backward (softmax backward and the four
    einsums spelled out), to move XLA:CPU off one batched dot it leaves outside its matmul library."""
    b, s, h, d = q_bshd.shape
    if k_bskd.shape[2] != h:
        return ATTENTION(q_bshd, k_bskd, v_bskd, allowed_bst, scale)
    return _mha(q_bshd, k_bskd, v_bskd, allowed_bst, scale).reshape(b, s, h * d)


def _lora_term(lin, x):
    dt = x.dtype
    return ((x @ lin.lora_a[...].astype(dt).T) @ lin.lora_b[...].astype(dt).T) * jnp.asarray(lin.lora_scale, dt)


def fused_qkv_call(self, x, cos, sin, allowed):
    """Tried, not kept: q, k and v from one matmul with their kernels concatenated (a 3x wider
    matmul runs faster alone), sliced after; their LoRA terms added to the slices."""
    b, s, _ = x.shape
    h, kv, d = self.shape
    dt = x.dtype
    lins = (self.q_proj, self.k_proj, self.v_proj)
    if any(lin.bias is not None for lin in lins):
        return ATTENTION_CALL(self, x, cos, sin, allowed)
    y = x @ jnp.concatenate([lin.kernel[...] for lin in lins], axis=1).astype(dt)
    q, k, v = y[..., : h * d], y[..., h * d : (h + kv) * d], y[..., (h + kv) * d :]
    q, k, v = (t if lin.lora_a is None else t + _lora_term(lin, x) for t, lin in zip((q, k, v), lins))
    q = layers.apply_rope(q.reshape(b, s, h, d), cos, sin)
    k = layers.apply_rope(k.reshape(b, s, kv, d), cos, sin)
    return self.o_proj(llama.attention(q, k, v.reshape(b, s, kv, d), allowed, d**-0.5))


# each variant: (the loss, the attention, Linear.__call__, Attention.__call__, the chunk); "before" is
# the code before this bench's changes; "tried" variants measured slower than the one above them and
# were not kept. The chunk: "regime" is the regime's clients_per_chunk before auto_chunk (the whole
# cohort if it set none), None leaves it unset (plan.auto_chunk picks it)
VARIANTS = {
    "before": (unfused_token_nll, grouped_attention, LINEAR_CALL, ATTENTION_CALL, "regime"),
    "+ fused loss": (FUSED_TOKEN_NLL, grouped_attention, LINEAR_CALL, ATTENTION_CALL, "regime"),
    "+ attention without a size-1 group axis": (FUSED_TOKEN_NLL, ATTENTION, LINEAR_CALL, ATTENTION_CALL, "regime"),
    "tried: + per-client merge W + sBA": (FUSED_TOKEN_NLL, ATTENTION, merged_linear_call, ATTENTION_CALL, "regime"),
    "tried: + attention with a hand-written backward": (
        FUSED_TOKEN_NLL,
        hand_backward_attention,
        LINEAR_CALL,
        ATTENTION_CALL,
        "regime",
    ),
    "now (+ chunk unset: auto_chunk)": (FUSED_TOKEN_NLL, ATTENTION, LINEAR_CALL, ATTENTION_CALL, None),
    "tried: now + q, k, v as one matmul": (FUSED_TOKEN_NLL, ATTENTION, LINEAR_CALL, fused_qkv_call, None),
}
BEFORE, NOW = "before", "now (+ chunk unset: auto_chunk)"
BEFORE_CHUNK = {"cross-device": 128}  # scale_bench's chunks before auto_chunk (others: the whole cohort)


def compiled_round(p, definition, base, lora, block, variant):
    *fns, chunk = variant
    models.token_nll, llama.attention, layers.Linear.__call__, llama.Attention.__call__ = fns  # read at trace time
    try:
        chunk = BEFORE_CHUNK.get(p["name"], p["clients"]) if chunk == "regime" else chunk
        return sb.compiled_round(p, definition, base, lora, block, chunk)
    finally:
        models.token_nll, llama.attention = FUSED_TOKEN_NLL, ATTENTION
        layers.Linear.__call__, llama.Attention.__call__ = LINEAR_CALL, ATTENTION_CALL


_hlo_ops = hlo_ops  # one parser of compiled HLO (op_profile.py)


def classify(line, body, p):
    """The class of one XLA op from its HLO (see the module docstring)."""
    named = re.search(r'op_name="([^"]+)"', line)
    opn = named.group(1) if named else ""
    if "vmap()/while/body" not in opn:  # outside the clients' local steps
        return "optimizer, clip, noise, aggregation"
    way = "backward" if "transpose(jvp" in opn else "forward"
    dots = [x for x in body if " dot(" in x] or ([line] if " dot(" in line else [])
    if dots:
        dims = {int(d) for s in re.findall(r"f32\[([\d,]*)\]", " ".join(dots)) for d in s.split(",") if d}
        batch = re.search(r"lhs_batch_dims=\{([\d,]*)\}", dots[0])
        if batch and len(batch.group(1).split(",")) >= 3:
            kind = "attention"
        elif 8 in dims:  # the LoRA rank of scale_bench.setup
            kind = "LoRA"
        elif p["vocab"] in dims:
            kind = "output head"
        else:
            kind = "base"
        return f"matmul {kind} ({way})"
    text = line + " ".join(body)
    if " exponential(" in text:
        return f"softmax/exp ({way})"
    if " transpose(" in text or " copy(" in text or " concatenate(" in text:
        return f"transpose/copy/concat ({way})"
    if " reduce(" in text:
        return f"reduction ({way})"
    return f"other elementwise ({way})"


def profile(compiled, args, p, rounds=2):
    """Milliseconds per round by class, from a jax.profiler trace of `rounds` rounds; and the
    matmul bound: every dot of the round timed by itself (matmul_bound)."""
    text = compiled.as_text()
    ops = _hlo_ops(text)
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(rounds):
                jax.block_until_ready(compiled(*args))
        (trace,) = glob.glob(f"{tmp}/**/perfetto_trace.json.gz", recursive=True)
        events = json.load(gzip.open(trace))
    events = events["traceEvents"] if isinstance(events, dict) else events
    ms, calls = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e["name"] in ops:
            ms[classify(*ops[e["name"]], p)] += e["dur"] / 1e3 / rounds
            calls[e["name"]] += 1 / rounds
    total = sum(ms.values())
    return {k: {"ms": v, "share": v / total} for k, v in ms.most_common()}, matmul_bound(text, ops, calls)


def _dims(spec, key):
    m = re.search(key + r"=\{([\d,]*)\}", spec)
    return tuple(int(d) for d in m.group(1).split(",") if d) if m else ()


def matmul_bound(text, ops, calls, reps=20):
    """Milliseconds per round that the round's dots take when each runs by itself on the whole
    machine (operand shapes and dimension numbers from the compiled HLO, how often each runs from
    the trace): a lower bound on the round time with this matmul library, whatever fusion of the
    rest (elementwise work, copies, softmax) a compiler or hand-written kernel might reach."""
    found = re.findall(r"%([\w.\-]+) = f32\[([\d,]*)\]", text)
    shapes = {n: tuple(int(d) for d in s.split(",") if d) for n, s in found}
    cache, total = {}, 0.0
    for name, n in calls.items():
        line, body = ops[name]
        for d in [x for x in body if " dot(" in x] or ([line] if " dot(" in line else []):
            lhs, rhs = re.search(r" dot\(%([\w.\-]+), %([\w.\-]+)\)", d).groups()
            dn = ((_dims(d, "lhs_contracting_dims"), _dims(d, "rhs_contracting_dims")),
                  (_dims(d, "lhs_batch_dims"), _dims(d, "rhs_batch_dims")))  # fmt: skip
            key = (shapes[lhs], shapes[rhs], dn)
            if key not in cache:  # `reps` dots in one program (no dispatch per dot); the barrier
                # keeps XLA from hoisting the loop-invariant dot out of the loop
                dot = functools.partial(jax.lax.dot_general, dimension_numbers=dn)
                a, b = jnp.ones(shapes[lhs]), jnp.ones(shapes[rhs])

                def body(_, c, dot=dot):
                    x, y, _ = jax.lax.optimization_barrier(c)
                    return x, y, dot(x, y)

                z = jnp.zeros_like(dot(a, b))
                f = jax.jit(lambda x, y, body=body, z=z: jax.lax.fori_loop(0, reps, body, (x, y, z)))
                jax.block_until_ready(f(a, b))
                t = time.perf_counter()
                jax.block_until_ready(f(a, b))
                cache[key] = (time.perf_counter() - t) / reps * 1e3
            total += n * cache[key]
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--regimes", default="cross-device,mid")
    ap.add_argument("--out", default="experiments/bench/results/efficiency.json")
    a = ap.parse_args()
    rows, peaks = [], []
    for name in a.regimes.split(","):
        p = {**sb.REGIMES[name], "name": name}
        _, definition, base, lora, block = sb.setup(p)
        rounds = {v: compiled_round(p, definition, base, lora, block, f) for v, f in VARIANTS.items()}
        out = {v: jax.block_until_ready(c(*args)) for v, (c, args) in rounds.items()}
        diff = {  # every variant computes the same round (float rounding apart)
            v: max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(*(jax.tree.leaves(out[u][0]) for u in (BEFORE, v))))
            for v in out
        }
        times = {v: [] for v in rounds}
        for _ in range(a.reps):  # interleaved, with the peak: the machine is shared
            peaks.append(sb.matmul_peak())
            for v, (c, args) in rounds.items():
                t = time.perf_counter()
                jax.block_until_ready(c(*args))
                times[v].append(time.perf_counter() - t)
        med = {v: float(np.median(t)) for v, t in times.items()}
        peak = float(np.median(peaks[-a.reps :]))
        flops = sb.analytic_flops(p, base)
        prof, bound_ms = profile(*rounds[NOW], p)
        row = {
            "regime": name,
            "auto_chunk": auto_chunk(p["clients"], p["batch"] * p["seq"], "cpu"),
            "matmul_peak_gflops_median": peak / 1e9,
            "median_round_s": med,
            "speedup_over_before": {v: med[BEFORE] / s for v, s in med.items()},
            "share_of_peak": {v: flops / s / peak for v, s in med.items()},
            "max_abs_state_difference_from_before": diff,
            "profile_now": prof,
            "matmul_bound_s": bound_ms / 1e3,
            "matmul_bound_share_of_peak": flops / (bound_ms / 1e3) / peak,
            "times": times,
            "peaks_gflops": [x / 1e9 for x in peaks[-a.reps :]],
        }
        print(json.dumps({k: v for k, v in row.items() if k != "times"}, indent=1), flush=True)
        rows.append(row)
    res = {"cpus": jax.device_count(), "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    md = [
        "Share of peak: the analytic FLOPs of a round (scale_bench.analytic_flops) over its median time, "
        "against the median float32 matmul peak (2048^2) measured between the rounds of the same run. "
        "Matmul bound: every dot of the round (now) timed by itself, many in one program, as often as "
        "the round runs it; no fusion of the rest of the round can make it faster than that.",
        "",
    ]
    for r in rows:
        md += [
            f"**{r['regime']}** (peak {r['matmul_peak_gflops_median']:.0f} GFLOP/s; auto_chunk "
            f"{r['auto_chunk']} clients; matmul bound {r['matmul_bound_s']:.3f} s = "
            f"{r['matmul_bound_share_of_peak']:.0%} of peak)",
            "",
            "| variant | round s (median) | vs before | share of peak |",
            "| --- | --- | --- | --- |",
        ]
        md += [
            f"| {v} | {m:.3f} | {r['speedup_over_before'][v]:.2f}x | {r['share_of_peak'][v]:.0%} |"
            for v, m in r["median_round_s"].items()
        ]
        md += [
            "",
            "| where the time goes (now; ops run on 2 threads, so the sum exceeds the round) "
            "| op-ms per round | share |",
            "| --- | --- | --- |",
        ]
        md += [f"| {k} | {v['ms']:.1f} | {v['share']:.0%} |" for k, v in r["profile_now"].items()]
        md.append("")
    Path(a.out).with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
