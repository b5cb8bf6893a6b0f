"""The sizes, as tables: the timed regimes, the checks' models, the levers, the sweep, the budget's shares
and the cards' peaks. FULL is the GPU run, SMOKE the CPU toy sizes (--smoke)."""

from __future__ import annotations

LORA = dict(r=8, alpha=16, targets=("q_proj", "v_proj"))
CLIP, Z = 0.1, 0.2  # local DP in the timed rounds: clip 0.1 per matrix, sigma = Z * CLIP

# a model's shape and its round: one row per model; None leaves the column out (kv: heads, inter: 4 x hidden,
# dtype: float32, tie: False); torch_clients is how many clients the PyTorch+PEFT baseline times
COLUMNS = ("hidden", "layers", "heads", "kv", "inter", "vocab", "clients", "steps", "batch", "seq", "dtype",
           "torch_clients", "tie")  # fmt: skip
_, F32, BF16 = None, "float32", "bfloat16"
REGIMES = ("cross-device", "mid", "smollm2", "llama-1b")  # timed in this order; the rest are the checks' models

# fmt: off
FULL_SHAPES = {
    #                hidden layers heads kv  inter vocab  clients steps batch seq  dtype torch tie
    "cross-device": (64,    2,     4,    _,  _,    512,   256,    2,    2,    32,  F32,  32,   _),
    "mid":          (128,   2,     4,    _,  _,    1024,  64,     4,    4,    64,  F32,  32,   _),
    "smollm2":      (576,   30,    9,    3,  1536, 49152, 4,      2,    2,    128, F32,  4,    True),
    "llama-1b":     (2048,  16,    16,   _,  5632, 32000, 16,     2,    4,    128, BF16, 16,   _),
    "check_model":  (64,    2,     4,    _,  _,    512,   8,      3,    2,    32,  _,    _,    _),
    "bf16_model":   (256,   4,     4,    _,  _,    2048,  4,      2,    4,    64,  _,    _,    _),
}
SMOKE_SHAPES = {
    "cross-device": (32,    1,     2,    _,  _,    128,   8,      1,    2,    16,  F32,  4,    _),
    "mid":          (64,    1,     2,    _,  _,    256,   8,      2,    2,    16,  F32,  4,    _),
    "smollm2":      (64,    2,     4,    2,  128,  512,   2,      1,    2,    32,  F32,  2,    True),
    "llama-1b":     (64,    2,     4,    _,  128,  256,   4,      1,    2,    16,  BF16, 2,    _),
    "check_model":  (32,    1,     2,    _,  _,    128,   4,      2,    2,    16,  _,    _,    _),
    "bf16_model":   (64,    2,     4,    _,  _,    256,   2,      1,    2,    16,  _,    _,    _),
}
# fmt: on


def sizes(shapes, **rest) -> dict:
    """The run's sizes: each row of `shapes` as {column: value} (absent columns left out), and `rest`."""
    p = {name: {c: v for c, v in zip(COLUMNS, row) if v is not None} for name, row in shapes.items()}
    return {
        "regimes": {name: p[name] for name in REGIMES},
        "check_model": p["check_model"],
        "bf16_model": p["bf16_model"],
        **rest,
    }


FULL = sizes(
    FULL_SHAPES,
    regime_share={"cross-device": 0.2, "mid": 0.15, "smollm2": 0.25, "llama-1b": 0.4},
    smollm2_check=dict(batch=2, seq=128, layers=None),
    sweep=dict(regime="llama-1b", start=16, cap=256),
    levers=dict(regime="llama-1b", reps=5, cap=1024, grad_layers=2),
    matmul=8192,
    reps=5,
)
SMOKE = sizes(
    SMOKE_SHAPES,
    regime_share={"cross-device": 0.25, "mid": 0.25, "smollm2": 0.25, "llama-1b": 0.25},
    smollm2_check=dict(batch=2, seq=16, layers=1),
    sweep=dict(regime="cross-device", start=1, cap=2),
    levers=dict(regime="llama-1b", reps=3, cap=8, grad_layers=2),
    matmul=256,
    reps=2,
    default_regimes="llama-1b",  # the bfloat16 path (the sweep takes the float32 one); --regimes for more
)

# seconds a timed regime needs at least (smoke: 5 each; a regime not named here: 20)
REGIME_NEED_S = {"cross-device": 15, "mid": 15, "smollm2": 30, "llama-1b": 40}

# cumulative shares of --budget (a section that ends early leaves its time to the next); levers: five 1B
# compiles, interleaved repetitions and two largest-chunk rounds (the sweep's doubling is its rough check)
SECTION_END = {"checks": 0.22, "profile": 0.29, "paper": 0.46, "timing": 0.66, "levers": 0.90, "sweep": 0.97}

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
