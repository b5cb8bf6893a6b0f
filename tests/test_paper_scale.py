"""experiments/bench/paper_scale.py (the paper's 7B setting and a 10,000-client population round on
a device) runs its whole code path at toy shapes on CPU: every figure is finite and the 200-round
projection is 200 x the measured round."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "experiments" / "bench" / "paper_scale.py"


@pytest.mark.slow
def test_paper_scale_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("paper_scale", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "r.json"
    r = mod.main(["--scale", "smoke", "--seconds", "0", "--population-seconds", "0", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(r))
    a, b = r["paper"], r["population"]
    assert a["rounds_timed"] >= 2 and a["seconds_per_round"] > 0
    assert a["projected_seconds_for_paper_rounds"] == pytest.approx(200 * a["seconds_per_round"])
    assert math.isfinite(a["tflops_per_s"]) and a["tflops_per_s"] > 0 and a["base_bytes"] > 0
    assert b["rounds_per_second"] == pytest.approx(1 / b["seconds_per_round"]) and b["client_updates_per_second"] > 0
