"""The checks' bounds, and why each is what it is (both written into the JSON and the table)."""

from __future__ import annotations

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
    "levers": "each lever against the baseline, both bfloat16 on the device: a lever changes the order of "
    "operations (fusion, XLA's attention, recomputation), not the function, so it may be no further from the "
    "baseline than bfloat16 is from float32: the loss of two 1B-shaped layers and the round's mean client loss "
    "relative <= 1e-2, their LoRA gradient (B != 0) cosine >= 0.95; a wrong backward pass (remat) or mask "
    "(attention) gives cosines far below that.",
    "smollm2": "float32 at 'highest' on both sides: only summation order differs (cuBLAS vs Eigen); over 30 "
    "layers ~1e-4 relative, bound max|d| <= 2e-3 max|logit| and top-1 agreement >= 99% (near-ties "
    "may flip). Default precision (TF32) bound 3e-2 and 95%; bfloat16 base vs the float32 CPU "
    "reference: top-1 agreement >= 85% (reported).",
}


def exact_bound(kind, ref_max):
    atol, rtol = TOL[kind]
    return atol + rtol * ref_max
