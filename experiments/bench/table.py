"""Markdown table of a scale_bench.py result: python experiments/bench/table.py [results/scale.json]"""

import json
import sys
from pathlib import Path


def chunk_label(p, x) -> str:
    """The chunk a regime ran: set, unset (auto_chunk's pick), or the whole cohort (before auto_chunk)."""
    if p["chunk"]:
        return str(p["chunk"])
    return f"unset: auto {x['chunk']}" if "chunk" in x else "all"


def write(path) -> str:
    path = Path(path)
    r = json.loads(path.read_text())
    m = r["machine"]
    lines = [
        f"Machine: {m['platform']}, {m['cpus']} CPUs, jax {m['jax']}, devices {', '.join(m['devices'])}; "
        f"measured matmul peak {r['matmul_peak_flops'] / 1e9:.0f} GFLOP/s (float32 2048^2).",
        "",
        "| regime | clients | ours (client-updates/s) | sequential JAX | PyTorch + PEFT | vs PEFT | vs sequential | "
        "GFLOP/s (share of peak) | compile s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, x in r["regimes"].items():
        p = x["params"]
        lines.append(
            f"| {name} | {p['clients']} (chunk {chunk_label(p, x)}) | {x['ours']['client_updates_per_s']:.2f} | "
            f"{x['sequential_jax']['client_updates_per_s']:.2f} | {x['torch_peft']['client_updates_per_s']:.2f} | "
            f"{x['speedup_vs_torch_peft']:.2f}x | {x['speedup_vs_sequential_jax']:.2f}x | "
            f"{x['achieved_flops'] / 1e9:.1f} ({x['fraction_of_matmul_peak']:.0%}) | {x['ours']['compile_s']:.1f} |"
        )
    if "memory" in r:
        mem = r["memory"]
        lines += [
            "",
            "Peak temporary memory of the compiled round (XLA memory analysis), cross-device model:",
            "",
            "| clients per chunk (cohort 1,024) | MiB |",
            "| --- | --- |",
        ]
        lines += [f"| {k} | {v / 2**20:.0f} |" for k, v in mem["chunk_sweep_cohort_1024"].items()]
        lines += ["", "| cohort (chunk 128) | temp MiB | arguments MiB |", "| --- | --- | --- |"]
        lines += [
            f"| {k} | {v['temp_bytes'] / 2**20:.0f} | {v['argument_bytes'] / 2**20:.1f} |"
            for k, v in mem["cohort_sweep_chunk_128"].items()
        ]
    out = path.with_suffix(".md")
    out.write_text("\n".join(lines) + "\n")
    return out.read_text()


if __name__ == "__main__":
    print(write(sys.argv[1] if len(sys.argv) > 1 else "experiments/bench/results/scale.json"))
