"""The audit's power against each planted fault: the fewest trials (of a grid) at which the audit's
verdict reads VIOLATION, and the detector that fired; plus the unmodified code at each trial count.

The faults are the test catalogue's (tests/test_audit_faults.py: planted by a mechanism subclass or a
monkeypatched key function, never in the product). Writes experiments/results/audit_power.jsonl
and prints a Markdown table (the README's).

    python experiments/audit_power.py [--trials 100 400 1600 4000]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    import pytest
    from test_audit_faults import FAULTS, LOCAL, _mech  # the catalogue

    from fedlora_jax.privacy import mechanisms as modes
    from fedlora_jax.privacy.audit import auditor as audit

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, nargs="+", default=[100, 400, 1600, 4000])
    p.add_argument(
        "--faults", nargs="*", help="only these faults of the catalogue (default: all, and the unmodified code)"
    )
    p.add_argument("--out", default=str(ROOT / "experiments" / "results" / "audit_power.jsonl"))
    args = p.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    cases = {"unmodified (local)": (LOCAL, modes.LocalDP, None, "-")} | FAULTS
    if args.faults:
        cases = {k: v for k, v in cases.items() if k in args.faults}
    for name, (overrides, cls, plant, detector) in cases.items():
        mp = pytest.MonkeyPatch()
        try:
            if plant is not None:
                plant(mp)
            cfg, mech = _mech(cls, overrides)
            first = None
            for n in sorted(args.trials):
                t0 = time.perf_counter()
                r = audit.audit(cfg, n, compositions=1, mechanism=mech)
                row = {
                    "fault": name,
                    "trials": n,
                    "detected": not r["consistent"],
                    "detected_by": r["detected_by"],
                    "expected_detector": detector,
                    "epsilon_lower": r["epsilon_lower"],
                    "epsilon_accountant": r["epsilon_accountant"],
                    "seconds": time.perf_counter() - t0,
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
                if row["detected"] and first is None:
                    first = n
        finally:
            mp.undo()
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print("\n| planted fault | detector | detected at (trials) |\n| --- | --- | --- |")
    for name in cases:
        mine = [r for r in rows if r["fault"] == name]
        hit = [r for r in mine if r["detected"]]
        by = ", ".join(hit[0]["detected_by"]) if hit else "-"
        at = f"{hit[0]['trials']:,}" if hit else f"not at <= {max(args.trials):,}"
        print(f"| {name.replace('_', ' ')} | {by} | {at} |")


if __name__ == "__main__":
    main()
