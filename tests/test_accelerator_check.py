"""The accelerator check's correctness part runs on CPU at toy sizes in CI (the GPU run is the same
script without --smoke): every check passes, and each one names its measurement and bound; the levers
section times every setting, judges it against the baseline and names a recommendation."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_accelerator_check_correctness_part_passes_on_cpu(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # one device, as on a single accelerator
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "experiments/bench/accelerator_check.py"),
            "--smoke",
            "--sections",
            "checks,profile,paper,levers",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    res = json.loads((tmp_path / "smoke.json").read_text())
    checks = res["checks"]
    names = " | ".join(checks)
    for needed in ("vmapped round == loop", "chunked", "bfloat16 base close to float32"):
        assert needed in names
    assert checks and all(c["result"] == "PASS" and c["measured"] and c["bound"] for c in checks.values())
    assert not res["failed_checks"]
    assert (tmp_path / "smoke.md").read_text().count("| PASS |") == len(checks)
    # the 1B round's profile by class of op: every class's time is accounted once (shares sum to 1)
    classes = {k: v for k, v in res["profile"]["classes"].items() if not k.startswith("_")}
    assert classes["matmuls (base, head)"]["ms"] > 0 and classes["LoRA products"]["ms"] > 0
    assert abs(sum(v["share"] for v in classes.values()) - 1) < 1e-9
    # the paper's setting and the population round ran (toy shapes): a round time and a rate
    a, b = res["paper"]["paper"], res["paper"]["population"]
    assert a["rounds_timed"] >= 2 and a["seconds_per_round"] > 0 and a["tflops_per_s"] > 0
    assert (
        abs(a["projected_seconds_for_paper_rounds"] - 200 * a["seconds_per_round"])
        < 1e-9 * a["seconds_per_round"] * 200
    )
    assert abs(b["rounds_per_second"] * b["seconds_per_round"] - 1) < 1e-9 and b["client_updates_per_second"] > 0
    # the levers: every setting timed (median, spread, rates, XLA temp memory) and judged against the baseline
    lv = res["levers"]
    settings = lv["settings"]
    expected = {"baseline", "fused attention", "remat dots", "remat full"}
    assert expected < set(settings) and any(n.startswith("fused + remat ") for n in settings), list(settings)
    for name, r in settings.items():
        assert "error" not in r, (name, r)
        assert len(r["times_s"]) == lv["reps"] >= 2 and r["median_s"] > 0 and r["spread_s"] >= 0
        assert r["client_updates_per_s"] > 0 and r["achieved_flops"] > 0 and r["temp_bytes"] > 0
        assert r["correct"] is True and isinstance(r["faster"], bool), (name, r.get("correct_measured"))
        assert r["faster"] == (
            name != "baseline"
            and settings["baseline"]["median_s"] - r["median_s"] > max(r["spread_s"], settings["baseline"]["spread_s"])
        )
    rec = lv["recommended"]["setting"]
    assert rec in settings and (rec == "baseline" or settings[rec]["faster"])
    # the largest clients_per_chunk of the baseline and the best lever: verified by a round (CPU: the cap)
    for name in ("baseline", lv["best_lever"]):
        lc = settings[name]["largest_chunk"]
        assert lc["largest"] == lc["predicted"] == lc["cap"] and lc["steps"][-1]["fits"], (name, lc)
    md = (tmp_path / "smoke.md").read_text()
    assert "## (d) Levers" in md and lv["recommendation"] in md and md.count("recommended: ") == 1
    assert all(f"| {name} |" in md for name in settings)
