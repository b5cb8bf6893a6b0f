"""(c) Sweep: for the sweep's regime (the 1B base), clients_per_chunk doubled, one chunk per round, until
the XLA resource-exhausted error, the cap or the budget; round time, TFLOP/s and memory of each."""

from __future__ import annotations

import gc
import time

import jax

from .common import is_oom
from .rounds import compiled_round, flops_of, random_block, rates, run_config, setup


def sweep_step(run, step, mc, definition, base, lora, p0, chunk):
    """Compile and run one round of `chunk` clients (one chunk); fills `step`. Raises on OOM."""
    p = dict(p0, clients=chunk)
    block = random_block(p, seed=chunk)
    call, compile_s, compiled = compiled_round(definition, run_config(p, chunk), lora, base, block, chunk)
    step["compile_s"] = compile_s
    mem = compiled.memory_analysis()
    if mem is not None:
        step.update(
            temp_bytes=mem.temp_size_in_bytes,
            argument_bytes=mem.argument_size_in_bytes,
            output_bytes=mem.output_size_in_bytes,
        )
        st = jax.devices()[0].memory_stats() or {}
        if st.get("bytes_limit"):  # XLA's own account: what the round allocates beyond its arguments
            step["predicted_fits"] = mem.temp_size_in_bytes + mem.output_size_in_bytes <= st["bytes_limit"] - st.get(
                "bytes_in_use", 0
            )
    call()
    ts = []
    for _ in range(2):
        t1 = time.perf_counter()
        call()
        ts.append(time.perf_counter() - t1)
    fl = flops_of(mc, base, lora, p, chunk)
    best = min(ts)
    step.update(fits=True, round_s=best, times_s=ts, client_updates_per_s=chunk / best)
    step.update(rates(run.res["machine"], fl, best, of=("peak_flops",)), flops=fl)
    st = jax.devices()[0].memory_stats() or {}
    step["peak_bytes_in_use"] = st.get("peak_bytes_in_use")


def section_sweep(run):
    """Double clients_per_chunk (one chunk per round) from the start until the XLA
    resource-exhausted error, the cap or the budget; if the start does not fit, halve."""
    sw = run.p["sweep"]
    deadline = run.deadline("sweep")
    p0 = dict(run.p["regimes"][sw["regime"]])
    cap = run.args.sweep_cap or sw["cap"]
    res = run.res["sweep"]
    res.update(
        regime=sw["regime"],
        cap=cap,
        steps=[],
        params=p0,
        note="cohort = clients_per_chunk (one chunk per round); memory grows with the chunk, not the cohort",
    )
    res["pool_bytes"] = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
    mc, definition, base, lora, _ = setup(dict(p0, clients=1))
    chunk, largest, smallest_oom, cost, stopped = sw["start"], None, None, None, None
    while True:
        if chunk > cap:
            stopped = f"cap {cap} reached"
            break
        if smallest_oom is not None and chunk >= smallest_oom:
            stopped = f"out of memory at {smallest_oom}"
            break
        # compile time hardly grows with the chunk; the round's run time doubles
        need = (1.3 * cost[0] + 8 * cost[1] + 3) if cost else (5 if run.args.smoke else 25)
        if run.left(deadline) < need:
            stopped = f"budget ({run.left(deadline):.0f} s left, the next step needs ~{need:.0f} s): not proven maximal"
            break
        step = {"chunk": chunk}
        res["steps"].append(step)
        run.log(f"sweep clients_per_chunk={chunk} ({run.left(deadline):.0f} s left) ...")
        t = time.perf_counter()
        try:
            sweep_step(run, step, mc, definition, base, lora, p0, chunk)
            largest = chunk
            cost = (step["compile_s"], step["round_s"])
            of_peak = (
                f" ({100 * step['fraction_of_peak']:.1f}% of the card's peak)" if step.get("fraction_of_peak") else ""
            )
            run.log(
                f"  fits: round {step['round_s']:.3f} s, {step['achieved_flops'] / 1e12:.3g} TFLOP/s{of_peak}"
                f"; compile {step['compile_s']:.1f} s"
            )
        except Exception as e:
            gc.collect()
            if not is_oom(e):
                step.update(fits=False, error=f"{type(e).__name__}: {str(e)[:300]}")
                stopped = f"error at {chunk}"
                run.log(f"  ERROR {type(e).__name__}: {str(e)[:300]}")
                break
            step.update(fits=False, error="RESOURCE_EXHAUSTED", seconds=time.perf_counter() - t)
            run.log(f"  out of memory (RESOURCE_EXHAUSTED) at clients_per_chunk={chunk}")
            smallest_oom = chunk if smallest_oom is None else min(smallest_oom, chunk)
            if largest is None:  # the start did not fit: halve
                if chunk == 1:
                    stopped = "out of memory at 1"
                    break
                chunk //= 2
                continue
        finally:
            gc.collect()
            run.save()
        if largest is not None and largest < sw["start"]:  # came down by halving: the next size up did not fit
            stopped = f"out of memory at {smallest_oom}"
            break
        chunk *= 2
    res["largest_fitting"] = largest
    res["stopped_by"] = stopped
    fitting = [s for s in res["steps"] if s.get("fits")]
    if fitting:
        best = max(fitting, key=lambda s: s["achieved_flops"])
        res["best"] = {k: best.get(k) for k in ("chunk", "achieved_flops", "fraction_of_peak", "client_updates_per_s")}
    run.log(f"sweep: largest clients_per_chunk that fits {largest} ({stopped})")
