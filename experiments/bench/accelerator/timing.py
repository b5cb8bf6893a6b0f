"""(b) Timing: each regime of the table, our round against sequential JAX and PyTorch + PEFT (after
warm-up, interleaved, medians); and where the 1B round's time goes, and the paper's setting."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from .baselines import sequential_round, torch_round
from .common import error_text
from .regimes import REGIME_NEED_S
from .rounds import compiled_round, flops_of, rates, run_config, setup

BENCH = Path(__file__).resolve().parents[1]  # op_profile.py, paper_scale.py


def seconds_of(fn):
    """fn made to return the seconds it took."""

    def call():
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    return call


# each method builds (call() -> seconds for n clients, n, fields for the regime's results, cleanup or None)


def _ours(m):
    call, compile_s, compiled = compiled_round(m.definition, m.cfg, m.lora, m.base, m.block, m.k)
    mem = compiled.memory_analysis()
    return (
        seconds_of(call),
        m.k,
        {"ours_compile_s": compile_s, "ours_temp_bytes": getattr(mem, "temp_size_in_bytes", None)},
        None,
    )


def _sequential(m):
    return seconds_of(sequential_round(m.definition, m.cfg, m.lora, m.base, m.block, m.k)), m.k, {}, None


def _torch(m):
    call, n, info, cleanup = torch_round(m.p, m.block, m.p["torch_clients"])
    return call, n, {"torch_peft_info": info}, cleanup


# name, builder, the key of its build + first call seconds, its log line (formatted with the regime's results
# and n), None or the label of its skip line when it fails (the JAX timings stand without it)
METHODS = (
    ("ours", _ours, "ours_compile_and_first_s", "ours compiled in {ours_compile_s:.1f} s", None),
    ("sequential_jax", _sequential, "sequential_jax_compile_and_first_s",
     "sequential JAX warm ({sequential_jax_compile_and_first_s:.1f} s)", None),
    ("torch_peft", _torch, "torch_peft_build_and_first_s",
     "PyTorch+PEFT warm ({torch_peft_build_and_first_s:.1f} s, {n} clients timed)", "PyTorch+PEFT"),
)  # fmt: skip


def time_regime(run, name, p, deadline, reps_max):
    r = {"params": p}
    run.res["timing"][name] = r
    mc, definition, base, lora, block = setup(p)
    m = SimpleNamespace(
        p=p, definition=definition, base=base, lora=lora, block=block, k=p["clients"], cfg=run_config(p)
    )
    fl = flops_of(mc, base, lora, p, m.k)
    r["flops"] = fl
    methods, cleanups = {}, []
    try:
        for key, build, first_key, line, optional in METHODS:
            t, built = time.perf_counter(), None
            try:
                built = call, n, fields, cleanup = build(m)
                cleanups += [cleanup] if cleanup else []
                call()
            except Exception as e:
                if optional is None:
                    raise
                run.skip(f"{optional} in {name}", error_text(e))
                if built and built[3]:
                    cleanups.remove(built[3])
                    built[3]()
                continue
            r[first_key] = time.perf_counter() - t
            r.update(fields)
            methods[key] = (call, n)
            run.log(f"  {name}: " + line.format(**r, n=n))
        time_methods(run, name, r, methods, fl, deadline, reps_max, m.k)
    finally:
        for cleanup in cleanups:
            cleanup()


def time_methods(run, name, r, methods, fl, deadline, reps_max, k):
    # one more warm run each gives the per-repetition cost; then as many interleaved reps as fit
    times = {m: [call()] for m, (call, _) in methods.items()}
    per_rep = sum(v[0] for v in times.values())
    reps = int(max(1, min(reps_max, (run.left(deadline) - 2) // max(per_rep, 1e-3))))
    r["reps"] = reps
    order = list(methods)
    for i in range(reps - 1):
        for m in order[i % len(order) :] + order[: i % len(order)]:
            times[m].append(methods[m][0]())
    for m, (_, n) in methods.items():
        med = statistics.median(times[m])
        # the same analytic FLOPs per client update for every method (PyTorch's differ by its loss/softmax only)
        r[m] = {
            "times_s": times[m],
            "median_s": med,
            "clients": n,
            "client_updates_per_s": n / med,
            "achieved_flops": fl["executed"] * n / k / med,
        }
    if "torch_peft" in methods:
        r["ours_vs_torch_peft"] = r["ours"]["client_updates_per_s"] / r["torch_peft"]["client_updates_per_s"]
    r["ours_vs_sequential_jax"] = r["ours"]["client_updates_per_s"] / r["sequential_jax"]["client_updates_per_s"]
    r["timing_note"] = (
        "medians of interleaved repetitions after warm-up; float32 regimes at JAX's default matmul "
        "precision (TF32 on Ampere+ GPUs) and PyTorch with allow_tf32; local DP clip-and-noise "
        "in all three"
    )
    r.update(rates(run.res["machine"], fl, r["ours"]["median_s"]))
    run.log(
        f"  {name}: ours {r['ours']['client_updates_per_s']:.1f} cu/s, seq JAX "
        f"{r['sequential_jax']['client_updates_per_s']:.1f}, torch+PEFT "
        f"{r.get('torch_peft', {}).get('client_updates_per_s', float('nan')):.1f}; ratios "
        f"{r.get('ours_vs_torch_peft', float('nan')):.2f}x / {r['ours_vs_sequential_jax']:.2f}x; "
        f"{r['achieved_flops'] / 1e12:.3g} TFLOP/s ({reps} reps)"
    )


def section_timing(run):
    """The regimes (--regimes, else all), each with its share of the section; unused time carries over."""
    p_all = run.p
    names = (run.args.regimes or p_all.get("default_regimes") or ",".join(p_all["regimes"])).split(",")
    end = run.deadline("timing")
    start = run.elapsed()
    share = p_all["regime_share"]
    total = sum(share[n] for n in names)
    acc = 0.0
    for name in names:
        acc += share[name] / total
        deadline = start + acc * (end - start)  # unused time carries over to the next regime
        need = 5 if run.args.smoke else REGIME_NEED_S.get(name, 20)
        p = p_all["regimes"][name]

        def on_error(e, name=name, p=p):
            run.res["timing"][name] = {"params": p, "error": error_text(e)}

        run.step(
            f"timing {name}",
            lambda: time_regime(run, name, p, deadline, run.args.reps or p_all["reps"]),
            on_error,
            deadline=deadline,
            need=need,
            why="{left:.0f} s left for it, needs ~{need} s",
            start=f"timing {name} ({run.left(deadline):.0f} s for it) ...",
            collect=True,
        )


def section_profile(run):
    """Where the 1B round's time goes, by class of op (op_profile.py: a jax.profiler trace joined to the
    compiled HLO): every lever is judged by this profile, not by guesses."""
    sys.path.insert(0, str(BENCH))
    from op_profile import profile_by_class

    name = "llama-1b"
    p = run.p["regimes"][name]
    mc, definition, base, lora, block = setup(p)
    cfg = run_config(p)
    call, compile_s, compiled = compiled_round(definition, cfg, lora, base, block, p["clients"])
    classes = profile_by_class(compiled, call, rank=cfg.lora.r)
    run.res["profile"] = {"regime": name, "params": p, "compile_s": compile_s, "classes": classes}
    run.log("profile " + ", ".join(f"{k} {v['share']:.0%}" for k, v in classes.items() if not k.startswith("_")))


def section_paper(run):
    """The paper's setting (Llama-2-7B shape in bf16, 20 clients, 2 per round, 10 steps, batch 16, seq
    512, rank 32) and a 10,000-client central-DP population round: experiments/bench/paper_scale.py."""
    sys.path.insert(0, str(BENCH))
    import paper_scale

    smoke = run.args.smoke
    budget = max(run.left(run.deadline("paper")), 10.0)
    rounds_s, population_s = (1.0, 1.0) if smoke else (0.6 * budget, min(40.0, 0.15 * budget))
    run.res["paper"] = {"paper": paper_scale.paper_round("smoke" if smoke else "paper", rounds_s, "bfloat16")}
    run.save()
    run.res["paper"]["population"] = paper_scale.population_round("smoke" if smoke else "paper", population_s)
    a, b = run.res["paper"]["paper"], run.res["paper"]["population"]
    run.log(f"paper setting: {a['seconds_per_round']:.3g} s/round; population: {b['rounds_per_second']:.3g} rounds/s")
