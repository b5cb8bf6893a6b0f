"""The run every section shares (its arguments, sizes, results, clock and budget), the guarded step they
all take (skip what does not fit, record what fails), and the device's facts (card, peak, matmul)."""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from . import report
from .regimes import FULL, PEAKS, SECTION_END, SMOKE
from .tolerances import TOL, TOLERANCES_WHY


class Run:
    """One invocation: `args` (the command line), `p` (FULL or SMOKE), `res` (what the JSON holds)."""

    def __init__(self, args, t0, root: Path):
        self.args, self.t0, self.root = args, t0, root
        self.p = SMOKE if args.smoke else FULL
        self.res: dict = {
            "smoke": args.smoke,
            "budget_s": args.budget,
            "checks": {},
            "timing": {},
            "levers": {},
            "sweep": {},
            "skipped": [],
            "tolerances": TOL,
            "tolerances_why": TOLERANCES_WHY,
        }
        self.out_dir = Path(args.out or os.environ.get("OUT") or root / "experiments/bench/results/accelerator")
        self.stem = "smoke" if args.smoke else "accelerator"
        self.save_lock = threading.Lock()

    def elapsed(self):
        return time.perf_counter() - self.t0

    def log(self, msg):
        print(f"[{self.elapsed():6.1f}s] {msg}", flush=True)

    def deadline(self, name):
        """The end of a section: the cumulative share of the SELECTED sections (a run of one section gets
        the whole budget)."""
        chosen = [n for n in SECTION_END if n in self.args.sections.split(",")]
        starts = {n: SECTION_END[n] - (SECTION_END[m] if m else 0.0) for m, n in zip([None] + chosen[:-1], chosen)}
        total = sum(starts.values()) or 1.0
        end = sum(starts[n] for n in chosen[: chosen.index(name) + 1]) / total if name in chosen else SECTION_END[name]
        return min(end, max(SECTION_END.values())) * self.args.budget

    def left(self, deadline):
        return deadline - self.elapsed()

    def skip(self, what, why):
        line = f"SKIP {what}: {why}"
        self.res["skipped"].append(line)
        self.log(line)

    def step(self, label, fn, on_error, *, deadline=None, need=0.0, why="", start=None, collect=False):
        """One guarded step: skipped (with `why`, formatted with {left} and {need}) when less than `need`
        seconds are left before `deadline`; else `start` is logged and fn() runs; an exception goes to
        on_error(e) and is logged as '{label}: ERROR' with its traceback. Then (after a garbage collection
        if `collect`) the results are saved."""
        if deadline is not None and self.left(deadline) < need:
            self.skip(label, why.format(left=self.left(deadline), need=need, elapsed=self.elapsed()))
            return
        self.log(start or f"{label} ...")
        try:
            fn()
        except Exception as e:
            on_error(e)
            self.log(f"{label}: ERROR {type(e).__name__}: {e}")
            traceback.print_exc()
        if collect:
            gc.collect()
        self.save()

    def save(self):
        report.save(self)

    def watchdog(self):
        hard = self.args.budget + 45.0

        def fire():
            self.log(f"WATCHDOG: {hard:.0f} s reached; writing what was measured and exiting")
            self.res["skipped"].append(f"watchdog stopped the run at {hard:.0f} s")
            try:
                self.save()
            finally:
                os._exit(3)

        t = threading.Timer(max(1.0, hard - self.elapsed()), fire)
        t.daemon = True
        t.start()


def error_text(e):
    return f"{type(e).__name__}: {str(e)[:300]}"


def is_oom(e) -> bool:
    s = str(e).lower()
    return "resource_exhausted" in s or "resource exhausted" in s or "out of memory" in s


def matmul_precision(name):
    """Context: float32 matmul precision for what is traced inside (part of jit's cache key)."""
    ctx = getattr(jax, "default_matmul_precision", None)
    if ctx is None:

        @contextlib.contextmanager
        def ctx(value):
            old = jax.config.jax_default_matmul_precision
            jax.config.update("jax_default_matmul_precision", value)
            try:
                yield
            finally:
                jax.config.update("jax_default_matmul_precision", old)

    return ctx(name)


def tree_np(t):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float64), t)


def max_abs_diff(a, b):
    la, lb = jax.tree.leaves(tree_np(a)), jax.tree.leaves(tree_np(b))
    return max(float(np.max(np.abs(x - y))) for x, y in zip(la, lb)), max(float(np.max(np.abs(y))) for y in lb)


# ----------------------------------------------------------------------------- the device


def card():
    d = jax.devices()[0]
    kind = getattr(d, "device_kind", str(d))
    name = kind
    if d.platform == "gpu":
        try:
            smi = ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]
            name = (
                subprocess.run(smi, capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0] or kind
            )
        except Exception:
            pass
    peak = next((v for k, v in PEAKS if k in kind or k in name), None) if d.platform == "gpu" else None
    return kind, name, peak


def measured_matmul(n):
    if jax.default_backend() == "cpu":
        n = min(n, 1024)
    dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    reps = 10
    t = time.perf_counter()
    for _ in range(reps):
        f(a).block_until_ready()
    return reps * 2 * n**3 / (time.perf_counter() - t), str(jnp.dtype(dtype))


def describe_machine(run: Run):
    """res['machine'] (the card, its peak, the versions, a measured matmul) and res['flops_counting']."""
    kind, name, peak = card()
    machine = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device_kind": kind,
        "card": name,
        "devices": [str(d) for d in jax.devices()],
        "peak_flops": peak,
        "peak_source": "bf16 dense spec sheet" if peak else None,
        "xla_mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
    }
    try:
        import peft
        import torch

        machine.update(torch=torch.__version__, peft=peft.__version__, cuda_torch=torch.cuda.is_available())
    except ImportError as e:
        machine["torch"] = f"missing: {e}"
    run.res["machine"] = machine
    run.res["flops_counting"] = (
        "per token: frozen base kernels 4 FLOPs/param (forward 2, input gradient 2; no weight "
        "gradient for a frozen base), LoRA 6 FLOPs/param, attention 12*L*S*heads*head_dim, "
        "embedding lookup 0, output head as a kernel; six_nt = 6*(kernels+LoRA)*tokens + attention"
    )
    mm, mm_dtype = measured_matmul(run.p["matmul"])
    machine.update(measured_matmul_flops=mm, measured_matmul_dtype=mm_dtype)
    run.log(
        f"device {kind} ({jax.default_backend()}), peak {peak and peak / 1e12} TFLOP/s, measured {mm_dtype} matmul "
        f"{mm / 1e12:.3g} TFLOP/s; budget {run.args.budget:g} s; output {run.out_dir}"
    )
