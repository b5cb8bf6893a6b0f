"""(d) Levers: the known speed levers of the 1B round, each kept only if it measures faster on the device.

Settings (model.attention, model.remat): baseline (einsum, none), fused attention (fused, none), remat dots,
remat full, and fused + the better remat (the faster of the two in a first pass). Each is the real round
(build_round, local DP, one chunk of the regime's clients), compiled, warmed, and timed in repetitions
interleaved across the settings (the order rotated each time); median and spread (max - min). 'faster': the
median beats the baseline's by more than the larger of the two spreads. 'correct': the loss and LoRA
gradient (B != 0) of two layers of the same shape, and the round's mean client loss, within the bfloat16
bounds of the baseline's. Recommended: the fastest setting that is correct and faster, else the baseline.
Then attention alone (attention_probe: is cuDNN's fused attention there, and faster?), and the largest
clients_per_chunk of the baseline and of the best lever (sweep.largest_chunk_of)."""

from __future__ import annotations

import gc
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from fedlora_jax.models import abstract_model, apply

from .checks import trained_looking
from .common import error_text
from .rounds import compiled_round, flops_of, lora_config, rates, run_config, setup
from .sweep import largest_chunk_of
from .tolerances import TOL

BASELINE = "baseline"
# name -> (model.attention, model.remat); the fifth, fused + the better remat, follows a first pass
SETTINGS = {
    BASELINE: ("einsum", "none"),
    "fused attention": ("fused", "none"),
    "remat dots": ("einsum", "dots"),
    "remat full": ("einsum", "full"),
}
FUSED_CALL = "__cudnn$fmha"  # cuDNN's fused attention in the HLO (else XLA's own attention)


def model_keys(p, attention, remat):
    """The run config's model.* keys for a row of the regimes' table under a setting (for plan)."""
    return {
        "source": "tiny",
        "vocab_size": p["vocab"],
        "hidden_size": p["hidden"],
        "num_layers": p["layers"],
        "num_heads": p["heads"],
        "num_kv_heads": p.get("kv", p["heads"]),
        "intermediate_size": p.get("inter", 4 * p["hidden"]),
        "dtype": p.get("dtype", "float32"),
        "attention": attention,
        "remat": remat,
    }


def definition_of(mc, attention, remat):
    return abstract_model(mc.replace(attention=attention, remat=remat), lora_config())[0]


def nll(definition, base, lora, tokens, mask):
    logp = jax.nn.log_softmax(apply(definition, base, lora, tokens, mask).astype(jnp.float32)[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))


LOSS_AND_GRAD = jax.jit(jax.value_and_grad(nll, argnums=2), static_argnums=0)


class Gradients:
    """The loss and LoRA gradient of a few layers of the regime's shape (B != 0) under a setting."""

    def __init__(self, p, layers):
        self.mc, _, self.base, lora, block = setup(dict(p, layers=min(layers, p["layers"])), head_scale=12.5)
        self.lora = trained_looking(lora, 0.05, 7)
        self.tokens, self.mask = block["tokens"][0, 0], block["attention_mask"][0, 0]

    def __call__(self, attention, remat):
        loss, g = LOSS_AND_GRAD(definition_of(self.mc, attention, remat), self.base, self.lora, self.tokens, self.mask)
        return float(loss), np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(g)])


def judge(r, ref, grad, grad0):
    """r['correct'] against the baseline's record `ref`: `grad`, `grad0` their (loss, LoRA gradient)."""
    (loss, g), (loss0, g0) = grad, grad0
    loss_rel, round_rel = (
        abs(loss - loss0) / abs(loss0),
        abs(r["round_loss"] - ref["round_loss"]) / abs(ref["round_loss"]),
    )
    cos = float(g @ g0 / (np.linalg.norm(g) * np.linalg.norm(g0) + 1e-30))
    r["correct"] = bool(max(loss_rel, round_rel) <= TOL["bf16_loss_rel"] and cos >= TOL["bf16_update_cos"])
    r["correct_measured"] = f"loss rel {loss_rel:.1e}, grad cosine {cos:.5f}, round loss rel {round_rel:.1e}"


def build(run, res, name, attention, remat, m):
    """Compile and warm a setting's round; record its compile time, XLA memory and correctness inputs."""
    r = res["settings"][name] = {"attention": attention, "remat": remat}
    t = time.perf_counter()
    call, compile_s, compiled = compiled_round(
        definition_of(m.mc, attention, remat), m.cfg, m.lora, m.base, m.block, m.k
    )
    mem = compiled.memory_analysis()
    r.update(compile_s=compile_s, temp_bytes=getattr(mem, "temp_size_in_bytes", None))
    m.memory[name] = {f"{key}_bytes": getattr(mem, f"{key}_size_in_bytes", 0) for key in ("temp", "output", "argument")}
    if attention == "fused":
        r["attention_kernel"] = "cuDNN fused" if FUSED_CALL in compiled.as_text() else "XLA (no cuDNN call in the HLO)"
    r["round_loss"] = float(call()[1]["loss"])
    r["compile_and_first_s"] = time.perf_counter() - t
    m.grad[name] = m.gradients(attention, remat)
    m.calls[name] = call
    run.log(f"  {name}: compiled in {compile_s:.1f} s, XLA temp {(r['temp_bytes'] or 0) / 2**30:.3g} GiB")


def interleaved(calls, reps):
    """{name: [seconds] * reps}, the order rotated each repetition."""
    times, order = {n: [] for n in calls}, list(calls)
    for i in range(reps):
        for n in order[i % len(order) :] + order[: i % len(order)]:
            t = time.perf_counter()
            calls[n]()
            times[n].append(time.perf_counter() - t)
    return times


def summarize(run, res, m, times, fl):
    s, machine, k = res["settings"], run.res["machine"], m.k
    b = times[BASELINE]
    b_med, b_spread = statistics.median(b), max(b) - min(b)
    for name, ts in times.items():
        med, spread = statistics.median(ts), max(ts) - min(ts)
        r = s[name]
        r.update(times_s=ts, median_s=med, spread_s=spread, client_updates_per_s=k / med, vs_baseline=b_med / med)
        r.update(rates(machine, fl, med))
        r["faster"] = name != BASELINE and b_med - med > max(spread, b_spread)
        if name == BASELINE:
            r.update(correct=True, correct_measured="the reference")
        else:
            judge(r, s[BASELINE], m.grad[name], m.grad[BASELINE])
    kept = [n for n in times if s[n]["faster"] and s[n]["correct"]]
    pick = min(kept, key=lambda n: s[n]["median_s"]) if kept else BASELINE
    att, rem = s[pick]["attention"], s[pick]["remat"]
    why = (
        f"{s[pick]['vs_baseline']:.3g}x the baseline's client-updates/s, beyond the run-to-run spread"
        if kept
        else "no correct lever beats the baseline by more than the run-to-run spread"
    )
    res["recommended"] = {"setting": pick, "attention": att, "remat": rem, "why": why}
    res["recommendation"] = f"recommended: {pick} (model.attention={att}, model.remat={rem}): {why}"
    levers = [n for n in times if n != BASELINE and s[n].get("correct")]
    res["best_lever"] = min(levers, key=lambda n: s[n]["median_s"]) if levers else None
    run.log("  " + res["recommendation"])


def attention_probe(run, res, p, reps=5):
    """Attention alone, forward and backward, at the round's shape (clients x batch rows, the model's dtype and
    mask): ours (einsum), jax.nn.dot_product_attention's XLA implementation (what model.attention: fused gets:
    JAX's default) and its cuDNN one, with our mask and with is_causal (cuDNN as a lever needs a package change)."""
    from fedlora_jax.models.layers import attention, attention_mask

    b, s, h, kv, d = p["clients"] * p["batch"], p["seq"], p["heads"], p.get("kv", p["heads"]), p["hidden"] // p["heads"]
    dt = jnp.dtype(p.get("dtype", "float32"))
    q, k, v = (jax.random.normal(jax.random.key(i), (b, s, n, d), dt) for i, n in enumerate((h, kv, kv)))
    allowed = attention_mask(jnp.ones((b, s), jnp.int32))
    sdpa = jax.nn.dot_product_attention
    impls = {
        "einsum (ours)": lambda q, k, v: attention(q, k, v, allowed, d**-0.5),
        "xla": lambda q, k, v: sdpa(q, k, v, mask=allowed[:, None], scale=d**-0.5, implementation="xla"),
        "cudnn, our mask": lambda q, k, v: sdpa(q, k, v, mask=allowed[:, None], scale=d**-0.5, implementation="cudnn"),
        "cudnn, is_causal": lambda q, k, v: sdpa(q, k, v, scale=d**-0.5, is_causal=True, implementation="cudnn"),
    }
    out = res["attention_probe"] = {"shape": [b, s, h, kv, d], "dtype": str(dt), "ms": {}, "errors": {}}
    for name, fn in impls.items():
        loss = lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v).astype(jnp.float32))  # noqa: E731
        f = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        try:
            jax.block_until_ready(f(q, k, v))
            ts = []
            for _ in range(reps):
                t = time.perf_counter()
                jax.block_until_ready(f(q, k, v))
                ts.append(time.perf_counter() - t)
            out["ms"][name] = 1e3 * statistics.median(ts)
        except Exception as e:
            out["errors"][name] = error_text(e)[:160]
    run.log(f"  attention alone (ms, forward + backward): {out['ms']}; unavailable: {list(out['errors'])}")


def section_levers(run):
    lv = run.p["levers"]
    p, deadline = run.p["regimes"][lv["regime"]], run.deadline("levers")
    k = p["clients"]
    res = run.res["levers"]
    res.update(regime=lv["regime"], params=p, settings={}, note=NOTE)
    mc, _, base, lora, block = setup(p)
    fl = flops_of(mc, base, lora, p, k)
    m = _Setup(mc=mc, base=base, lora=lora, block=block, k=k, cfg=run_config(p, k), calls={}, memory={}, grad={})
    m.gradients = Gradients(p, lv["grad_layers"])
    built_s = []  # seconds each setting took to build (compile, first round, gradient)

    def add(name, attention, remat):
        def on_error(e):
            res["settings"][name] = {"attention": attention, "remat": remat, "error": error_text(e)}

        def fn():
            t = time.perf_counter()
            build(run, res, name, attention, remat, m)
            built_s.append(time.perf_counter() - t)

        need = 1.3 * max(built_s, default=3.0 if run.args.smoke else 25.0) + 2
        why = "{left:.0f} s left in the levers' share, a setting needs ~{need:.0f} s"
        run.step(f"levers {name}", fn, on_error, deadline=deadline, need=need, why=why)

    for name, (attention, remat) in SETTINGS.items():
        add(name, attention, remat)
        if BASELINE not in res["settings"]:  # skipped (its line says why): nothing to compare against
            return
        if BASELINE not in m.calls:
            raise RuntimeError(f"the baseline did not build: {res['settings'][BASELINE].get('error')}")
    first = interleaved(m.calls, 1)
    remats = [n for n in ("remat dots", "remat full") if n in first]
    if "fused attention" in m.calls and remats:
        better = min(remats, key=lambda n: first[n][0])
        add(f"fused + {better}", "fused", SETTINGS[better][1])
    per_rep = sum(v[0] for v in first.values()) * len(m.calls) / len(first)
    reps = max(2, min(run.args.reps or lv["reps"], int(0.5 * run.left(deadline) // max(per_rep, 1e-3))))
    res.update(first_pass_s={n: v[0] for n, v in first.items()}, reps=reps)
    summarize(run, res, m, interleaved(m.calls, reps), fl)
    m.calls.clear(), m.grad.clear()
    m.gradients = None
    gc.collect()
    run.step(
        "levers attention probe",
        lambda: attention_probe(run, res, p),
        lambda e: res.update(attention_probe={"error": error_text(e)}),
        deadline=deadline,
        need=3 if run.args.smoke else 10,
        why="{left:.0f} s left in the levers' share, needs ~{need} s",
    )
    for name in dict.fromkeys([BASELINE, res["best_lever"]]):
        if name:
            largest(run, res, name, m, deadline)


def largest(run, res, name, m, deadline):
    r, p = res["settings"][name], res["params"]
    att, rem = r["attention"], r["remat"]
    out = r["largest_chunk"] = {}
    cap = run.args.sweep_cap or run.p["levers"]["cap"]
    args = (run_config(p, m.k, model=model_keys(p, att, rem)), m.mc.replace(attention=att, remat=rem))
    run.step(
        f"levers largest clients_per_chunk of {name}",
        lambda: largest_chunk_of(
            run, out, *args, definition_of(m.mc, att, rem), m.base, m.lora, p, (m.k, m.memory[name]),
            (r["compile_s"], r["median_s"]), deadline, cap,
        ),
        lambda e: out.update(error=error_text(e)),
        deadline=deadline,
        need=2.5 * r["compile_s"] + 3 * r["median_s"] + 3,
        why="{left:.0f} s left in the levers' share, needs ~{need:.0f} s",
        collect=True,
    )  # fmt: skip


class _Setup:
    def __init__(self, **kw):
        self.__dict__.update(kw)


NOTE = (
    "the real round (local DP, one chunk of the regime's clients), medians of interleaved repetitions after "
    "warm-up; spread = max - min; TFLOP/s counts the round's useful FLOPs (remat's recomputation is not "
    "counted, so TFLOP/s is proportional to client-updates/s); correct: loss and LoRA gradient of two layers of "
    "the same shape and the round's mean client loss within the bfloat16 bounds of the baseline's"
)
