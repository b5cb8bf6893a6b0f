"""(c) Sweep: for the sweep's regime (the 1B base), clients_per_chunk doubled, one chunk per round, until
the XLA resource-exhausted error, the cap or the budget; round time, TFLOP/s and memory of each. And the
largest chunk of one setting predicted from XLA's memory analysis and verified by a round (the levers)."""

from __future__ import annotations

import gc
import time

import jax

from fedlora_jax.federated import plan as plan_lib

from .common import error_text, is_oom
from .rounds import compiled_round, flops_of, random_block, rates, run_config, setup


def sweep_step(run, step, mc, definition, base, lora, p0, chunk, timed=2):
    """Compile and run one round of `chunk` clients (one chunk), then `timed` more; fills `step`. Raises on OOM."""
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
    for _ in range(timed):
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


HEADROOM = 0.97  # of the free pool, for the allocator's fragmentation


def round_bytes(m, base_bytes):
    """What a round allocates beyond the resident base: XLA's temp, output and (other) argument bytes."""
    return m["temp_bytes"] + m["output_bytes"] + m["argument_bytes"] - base_bytes


def largest_chunk_of(run, out, cfg, mc, definition, base, lora, p0, at_k, cost, deadline, cap):
    """The largest clients_per_chunk (one chunk per round) of a setting that fits the free device memory:
    the round's bytes are linear in the chunk, so XLA's memory analysis at one client (plan.measure) and at
    the timed chunk (`at_k`: k, its memory analysis) predict it; a round at that chunk verifies it (10% fewer
    after a resource-exhausted error, while the budget lasts). Beside it plan.plan's analytic figure (which
    knows no remat). Without a memory limit (CPU) the prediction is the cap. `cost`: (compile s, round s at k)."""
    k, at = at_k
    st = jax.devices()[0].memory_stats() or {}
    limit = st.get("bytes_limit")
    free = limit - st.get("bytes_in_use", 0) if limit else None
    base_bytes = sum(x.nbytes for x in jax.tree.leaves(base))
    try:
        pl = plan_lib.plan(cfg, limit / 2**30 if limit else None)
        out.update(
            plan_memory_chunk=pl.get("memory_clients_per_chunk"),
            plan_per_client_bytes=pl["estimate"]["per_client_bytes"],
        )
    except Exception as e:  # a UserError where not one client fits
        out["plan_error"] = error_text(e)
    sds = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), t)  # noqa: E731
    m1 = plan_lib.measure(cfg, definition, sds(base), sds(lora), 1)
    per_client = (round_bytes(at, base_bytes) - round_bytes(m1, base_bytes)) / max(k - 1, 1)
    fixed = round_bytes(m1, base_bytes) - per_client
    if free is None or per_client <= 0:  # no memory limit (CPU), or an analysis that does not grow with the chunk
        predicted = cap
    else:
        predicted = int(min(cap, (HEADROOM * free - fixed) // per_client))
        out["stopped_by"] = "not one client fits the free memory" if predicted < 1 else None
    out.update(free_bytes=free, per_client_bytes=per_client, fixed_bytes=fixed, predicted=predicted, cap=cap, steps=[])
    run.log(f"  predicted largest clients_per_chunk {predicted} ({per_client / 2**20:.4g} MiB per client)")
    chunk, compile_s, round_k = predicted, *cost
    while chunk >= 1:
        need = 1.3 * compile_s + 2 * round_k * chunk / k + 3
        if run.left(deadline) < need:
            out["stopped_by"] = f"budget ({run.left(deadline):.0f} s left, a round at {chunk} needs ~{need:.0f} s)"
            run.skip(f"levers: verify clients_per_chunk={chunk}", out["stopped_by"])
            break
        step = {"chunk": chunk}
        out["steps"].append(step)
        try:
            sweep_step(run, step, mc, definition, base, lora, p0, chunk, timed=1)
            ooms = [st["chunk"] for st in out["steps"] if st.get("error") == "RESOURCE_EXHAUSTED"]
            stop = " (the cap)" if chunk == cap else (f"; {min(ooms)} ran out of memory" if ooms else "")
            out.update(largest=chunk, stopped_by="fits" + stop)
            run.log(f"  clients_per_chunk={chunk} fits: round {step['round_s']:.3g} s")
            break
        except Exception as e:
            step.update(fits=False, error="RESOURCE_EXHAUSTED" if is_oom(e) else error_text(e))
            run.log(f"  clients_per_chunk={chunk}: {step['error']}")
            if not is_oom(e):
                out["stopped_by"] = f"error at {chunk}"
                break
            chunk = int(chunk * 0.9)
        finally:
            gc.collect()
            run.save()
