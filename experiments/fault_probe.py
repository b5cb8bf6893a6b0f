"""Fault probe (issue 28): >= 200 cases run against the CLI on the tiny preset, one at a time, each
classified as

- clean: exit 0, or exit 2 with exactly one error line on stderr (`fedlora-jax CMD: error: ...`;
  the CLI's one-line `warning: ...` lines may precede it); exit 130 after an interrupt is clean too;
- traceback: a Python traceback on stderr, any other exit status, or exit 2 with more than one line;
- hang: still running at the case's timeout (killed);
- data loss: a file the case put there as the user's (a foreign file) is gone or changed afterwards.

Run: python experiments/fault_probe.py [--only SUBSTRING] [--out experiments/results/fault_probe]
Writes cases.jsonl (one line per case: id, family, argv, exit status, seconds, class, stderr tail)
and table.md (the summary by family) into --out, and prints the table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

SETS = ["fl.rounds=2", "fl.num_clients=4", "fl.clients_per_round=2", "fl.local_steps=1", "checkpoint_every=1"]
RUN_SETS = sum((["--set", s] for s in SETS), [])
FAST, RUN = 90, 240  # timeouts (s): a case that fails before the model loads; one that trains


@dataclass
class Case:
    id: str
    family: str
    argv: list  # after `fedlora-jax`; "{w}" is the case's work folder
    setup: object = None  # fn(work: Path) -> list of foreign files (relative to work)
    timeout: int = FAST
    kill_after: float | None = None  # send SIGKILL this many seconds in (then `then` runs)
    then: list | None = None  # a second command after the first (e.g. --resume after a kill)
    foreign: list = field(default_factory=list)


def env() -> dict:
    return {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
        "JAX_PLATFORMS": "cpu",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def cli(argv, cwd, timeout, kill_after=None):
    """(exit status or None for a hang, stderr, seconds)."""
    t0 = time.time()
    p = subprocess.Popen(
        [sys.executable, "-m", "fedlora_jax.cli", *argv],
        cwd=cwd,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, err = p.communicate(timeout=kill_after if kill_after is not None else timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        _, err = p.communicate()
        return (None if kill_after is None else -9), err, time.time() - t0
    return p.returncode, err, time.time() - t0


def classify(rc, err: str, lost: list) -> str:
    if lost:
        return "data loss"
    if rc is None:
        return "hang"
    # the CLI's warnings are one line each (`warning: ...`), beside the one error sentence
    lines = [x for x in err.strip().splitlines() if x.strip() and not x.startswith("warning: ")]
    if "Traceback (most recent call last)" in err:
        return "traceback"
    if rc in (0, 130):
        return "clean"
    if rc == 2 and len(lines) == 1 and lines[0].startswith("fedlora-jax"):
        return "clean"
    return "traceback"


def digest(p: Path):
    if p.is_symlink():
        return ("link", os.readlink(p))
    if p.is_dir():
        return ("dir",)
    return ("file", hashlib.sha256(p.read_bytes()).hexdigest()) if p.exists() else None


# ----------------------------------------------------------------------------- bases (made once)

BASES: dict[str, Path] = {}


def make_bases(root: Path) -> None:
    done, part = root / "base_done", root / "base_partial"
    rc, err, _ = cli(["run", "tiny", *RUN_SETS, "--out", str(done), "--no-progress"], root, RUN)
    assert rc == 0, err[-3000:]
    code = (
        "from fedlora_jax.config.run_config import load_config; from fedlora_jax.runs.runner import run; "
        f"run(load_config('tiny', {SETS!r}), {str(part)!r}, progress=False, stop_after=1)"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=root, env=env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    BASES.update(done=done, partial=part)


def copy(base: str, dst: Path) -> Path:
    shutil.copytree(BASES[base], dst, symlinks=True)
    return dst


def write(p: Path, content) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(content) if isinstance(content, bytes) else p.write_text(content)


# ----------------------------------------------------------------------------- the cases


def cases() -> list[Case]:
    out: list[Case] = []

    # -- bad config values (--set), fail before anything loads
    numeric = [
        "fl.rounds", "fl.num_clients", "fl.clients_per_round", "fl.local_steps", "fl.batch_size", "fl.lr",
        "lora.r", "lora.alpha", "dp.epsilon", "dp.delta", "dp.clip_a", "dp.noise_multiplier", "eval_every",
        "checkpoint_every", "seed", "data.seq_len",
    ]  # fmt: skip
    for key in numeric:
        for bad in ("nan", "-3", "1e400", "[1, 2]"):
            out.append(
                Case(f"set-{key}={bad}", "config --set", ["run", "tiny", "--set", f"{key}={bad}", "--out", "{w}/o"])
            )
    for s in [
        "fl.rounds=0", "fl.clients_per_round=9", "dp.mode=bogus", "dp.noise=bogus", "fl.sampling=bogus",
        "data.partition=bogus", "fl.aggregation=bogus", "nokey=1", "fl.nokey=1", "fl=3", "dp.delta=1",
        "lora.target_modules=[]", "model.dtype=float8", "fl.devices=[0]", "dp.budget=-1",
        "fl.rounds=10000000", "dp.noise_seed=-1", "seed=4294967296", "fl.rounds=1e6", "lora.r=2.5",
    ]:  # fmt: skip
        out.append(Case(f"set-{s}", "config --set", ["run", "tiny", "--set", s, "--out", "{w}/o"]))

    # -- values that make an output non-finite (refused before training)
    for sets in [
        ["dp.mode=local", "dp.noise=multiplier", "dp.noise_multiplier=0"],
        ["dp.mode=local", "dp.noise=classical", "dp.epsilon=1e-320"],
        ["dp.mode=local", "dp.noise=classical", "dp.delta=1e-320"],
        ["dp.mode=local", "dp.noise=analytic", "dp.epsilon=1e-300"],
        ["dp.mode=local", "dp.noise=calibrate", "dp.epsilon=1e-300"],
        ["dp.mode=central", "fl.sampling=poisson", "dp.noise=multiplier", "dp.noise_multiplier=0"],
        ["dp.mode=central", "fl.sampling=poisson", "dp.noise=calibrate", "dp.epsilon=1e-320"],
        ["dp.mode=dpsgd", "dp.noise=multiplier", "dp.noise_multiplier=0"],
        ["dp.mode=local", "dp.noise=multiplier", "dp.noise_multiplier=1e-320"],
        ["dp.mode=local", "dp.clip_a=1e-320"],
        ["dp.mode=local", "dp.noise=classical", "dp.epsilon=1e300"],
        ["dp.mode=local", "dp.noise=multiplier", "dp.noise_multiplier=1e300"],
    ]:
        argv = ["run", "tiny", *RUN_SETS, *sum((["--set", s] for s in sets), []), "--out", "{w}/o", "--no-progress"]
        out.append(Case("finite-" + ",".join(sets), "non-finite values", argv, timeout=RUN))

    # -- config files
    files = {
        "dup-nested": "fl:\n  rounds: 2\n  rounds: 5\n",
        "dup-top": "seed: 1\nseed: 2\n",
        "dup-section": "fl:\n  rounds: 2\nfl:\n  lr: 0.1\n",
        "empty": "",
        "list": "- 1\n- 2\n",
        "scalar": "3\n",
        "binary": b"\xff\xfe\x00bad",
        "tab-indent": "fl:\n\trounds: 2\n",
        "unclosed": "fl: {rounds: 2\n",
        "unknown-key": "bogus: 1\n",
        "deep": "a: " + "[" * 2000 + "]" * 2000 + "\n",
        "null-section": "fl:\n",
        "anchor-merge": "base: &b {rounds: 2}\n",
        "section-is-list": "fl: [1, 2]\n",
        "bool-rounds": "fl:\n  rounds: true\n",
    }
    for name, text in files.items():
        out.append(
            Case(
                f"yaml-{name}",
                "config files",
                ["config", "{w}/c.yaml"],  # parsed and resolved as run does (an empty file is the default config)
                setup=lambda w, t=text: write(w / "c.yaml", t) or [],
            )
        )
    out.append(Case("yaml-missing", "config files", ["config", "{w}/nope.yaml"]))
    out.append(Case("yaml-folder", "config files", ["config", "{w}"]))

    # -- flags of the other commands
    privacy = [
        ["--seed", "-1"], ["--seed", "99999999999999999999"], ["--rounds", "1000000000"], ["--rounds", "0"],
        ["--clients", "4", "--clients-per-round", "2", "--rounds", "1000000000"], ["--delta", "0"], ["--delta", "1"],
        ["--delta", "nan"], ["--noise-multiplier", "nan"], ["--noise-multiplier", "-1"], ["--noise-multiplier", "0"],
        ["--clients", "0"], ["--clients", "4", "--clients-per-round", "5"], ["--clients-per-round", "2"],
        ["--mode", "central", "--sampling-rate", "2"],
        ["--mode", "central", "--rounds", "100000000", "--sampling-rate", "0.1"],
        ["--target-epsilon", "-1"], ["--target-epsilon", "inf"], ["--mode", "dpsgd"], ["--tensors", "0"],
        ["--sigma", "1"], ["--clip", "1"], ["--participations", "5"], ["--rounds", "1e3"],
        ["--mode", "dpsgd", "--batch-sampling-rate", "0.01", "--local-steps", "100000000"],
        ["--clients", "4", "--clients-per-round", "2", "--rounds", "100000"], ["--noise-multiplier", "1e-320"],
    ]  # fmt: skip
    for a in privacy:
        z = (
            []
            if any(x in a for x in ("--noise-multiplier", "--sigma", "--target-epsilon"))
            else ["--noise-multiplier", "1"]
        )
        out.append(Case("privacy " + " ".join(a), "privacy flags", ["privacy", *z, *a]))
    for a in [["--seed", "-5"], ["--seed", "99999999999999999999"], ["--trials", "0"], ["--confidence", "2"]]:
        out.append(Case("audit " + " ".join(a), "other flags", ["audit", "tiny", *a]))
    gen = [
        ["--seed", "99999999999999999999"], ["--seed", "-1"], ["--max-new-tokens", "0"], ["--temperature", "-1"],
        ["--temperature", "nan"], ["--prompt", ""], ["--max-new-tokens", "99999999999999999999"],
    ]  # fmt: skip
    for a in gen:
        argv = ["generate", "tiny", *(a if "--prompt" in a else ["--prompt", "hi", *a])]
        out.append(Case("generate " + " ".join(a), "other flags", argv))
    for a in [
        ["run", "tiny", "--out", ""], ["run", "tiny", "--out", "  "], ["run", "tiny", "--resume", "--overwrite"],
        ["run", "tiny", "--out", "{w}/f", "--set", "fl.rounds=1"], ["plan", "tiny", "--device-memory", "nan"],
        ["plan", "tiny", "--device-memory", "-1"], ["eval", "{w}/nothing"], ["score", "tiny", "--text", ""],
        ["config", "tiny", "--set", "fl.rounds"], ["config", "tiny", "--set", "=3"],
    ]:  # fmt: skip
        out.append(Case("flags " + " ".join(a), "other flags", a, setup=lambda w: write(w / "f", "mine") or ["f"]))

    # -- data
    def data_file(rows, name="d.jsonl"):
        return lambda w: write(w / name, "".join(json.dumps(r) + "\n" for r in rows)) or []

    rows = [{"instruction": f"q{i}", "output": f"a{i}", "topic": ["x", "y"][i % 2]} for i in range(40)]
    nolabel = [dict(r) for r in rows]
    nolabel[3].pop("topic")
    nulllabel = [dict(r) for r in rows]
    nulllabel[5]["topic"] = None
    bc = ["--set", "data.partition=by_column", "--set", "data.label_column=topic", "--set", "fl.num_clients=2"]
    bc += ["--set", "fl.clients_per_round=2"]
    for name, setup in [
        ("by-column-missing-label", data_file(nolabel)),
        ("by-column-null-label", data_file(nulllabel)),
        ("empty-file", lambda w: write(w / "d.jsonl", "") or []),
        ("not-json", lambda w: write(w / "d.jsonl", "{oops\n") or []),
        ("no-output-column", data_file([{"instruction": "q"}] * 10)),
        ("output-not-text", data_file([{"instruction": "q", "output": 3}] * 10)),
        ("label-a-list", data_file([{**r, "topic": [1]} for r in rows])),
        ("one-row", data_file(rows[:1])),
    ]:
        argv = ["data", "tiny", "--set", "data.source={w}/d.jsonl", *bc]
        out.append(Case(f"data-{name}", "data", argv, setup=setup))

    # -- damaged run folders, then --resume
    def damage(base, fn):
        def setup(w):
            run = copy(base, w / "run")
            fn(run)
            return []

        return setup

    def trunc_ckpt(step):
        def fn(run):
            for p in (run / "checkpoints" / str(step)).rglob("*"):
                if p.is_file():
                    p.write_bytes(b"")

        return fn

    def first_line(text):
        def fn(run):
            lines = (run / "metrics.jsonl").read_text().splitlines()
            (run / "metrics.jsonl").write_text("\n".join([text, *lines[1:]]) + "\n")

        return fn

    def rm(rel):
        def fn(run):
            p = run / rel
            shutil.rmtree(p) if p.is_dir() else p.unlink()

        return fn

    def put(rel, content):
        return lambda run: write(run / rel, content)

    damages = {
        "metrics-array-line": first_line("[1, 2]"),
        "metrics-string-line": first_line('"x"'),
        "metrics-garbage-line": first_line("{garbage"),
        "metrics-no-round": first_line('{"lr": 1}'),
        "metrics-empty": put("metrics.jsonl", ""),
        "metrics-missing": rm("metrics.jsonl"),
        "metrics-binary": put("metrics.jsonl", b"\xff\xfe\x00"),
        "metrics-truncated-last": lambda r: write(
            r / "metrics.jsonl", (r / "metrics.jsonl").read_text() + '{"round": 2, "l'
        ),
        "summary-corrupt": put("summary.json", '{"rounds": 1, '),
        "summary-empty": put("summary.json", ""),
        "summary-list": put("summary.json", "[]"),
        "summary-missing": rm("summary.json"),
        "config-empty": put("config.yaml", ""),
        "config-garbage": put("config.yaml", "fl: [\n"),
        "config-unknown-key": lambda r: write(r / "config.yaml", (r / "config.yaml").read_text() + "bogus: 1\n"),
        "config-missing": rm("config.yaml"),
        "ckpt-zero-length": trunc_ckpt(1),
        "ckpt-meta-corrupt": put("checkpoints/1/meta/metadata", "{not json"),
        "ckpt-meta-list": put("checkpoints/1/meta/metadata", "[1]"),
        "ckpt-meta-empty": put("checkpoints/1/meta/metadata", ""),
        "ckpt-state-missing": rm("checkpoints/1/state"),
        "ckpt-all-missing": rm("checkpoints"),
        "ckpt-is-file": lambda r: (rm("checkpoints")(r), write(r / "checkpoints", "x")),
        "ckpt-commit-missing": rm("checkpoints/1/commit_success.txt"),
        "ckpt-metadata-file-corrupt": put("checkpoints/1/_CHECKPOINT_METADATA", "{"),
        "manifest-corrupt": put("fedlora_manifest.json", "{"),
        "manifest-list": put("fedlora_manifest.json", "[]"),
        "manifest-missing": rm("fedlora_manifest.json"),
        "wrong-ckpt-step-only-0": rm("checkpoints/1"),
    }
    for name, fn in damages.items():
        out.append(
            Case(
                f"resume-{name}",
                "damaged run + --resume",
                ["run", "--out", "{w}/run", "--resume", "--no-progress"],
                setup=damage("partial", fn),
                timeout=RUN,
            )
        )
    for name in ("summary-corrupt", "summary-list", "config-empty", "manifest-corrupt"):
        out.append(
            Case(
                f"resume-done-{name}",
                "damaged run + --resume",
                ["run", "--out", "{w}/run", "--resume", "--no-progress"],
                setup=damage("done", damages[name]),
                timeout=RUN,
            )
        )

    # -- eval / generate / score on run folders (damaged or not)
    def nan_adapter(run):
        from safetensors.numpy import load_file, save_file

        f = run / "adapter" / "adapter_model.safetensors"
        t = load_file(str(f))
        k = sorted(t)[0]
        t[k] = np.full_like(t[k], np.nan)
        save_file(t, str(f))

    def inf_adapter(run):
        from safetensors.numpy import load_file, save_file

        f = run / "adapter" / "adapter_model.safetensors"
        t = load_file(str(f))
        k = sorted(t)[-1]
        t[k] = np.full_like(t[k], np.inf)
        save_file(t, str(f))

    for name, fn in [
        ("nan-adapter", nan_adapter),
        ("inf-adapter", inf_adapter),
        ("truncated-adapter", lambda r: write(r / "adapter/adapter_model.safetensors", b"\x10\x00")),
        ("no-adapter", rm("adapter")),
        ("config-empty", put("config.yaml", "")),
    ]:
        for cmd in (
            ["eval", "{w}/run"],
            ["generate", "{w}/run", "--prompt", "hi", "--max-new-tokens", "2"],
            ["score", "{w}/run/base_model", "--adapter", "{w}/run/adapter", "--text", "hello"],
        ):
            out.append(Case(f"{cmd[0]}-{name}", "eval/generate/score", cmd, setup=damage("done", fn), timeout=RUN))

    # -- --overwrite with foreign files, and folders that are not runs
    ow = ["run", "tiny", *RUN_SETS, "--out", "{w}/run", "--overwrite", "--no-progress"]

    def foreign(base, *rels, content="mine"):
        def setup(w):
            run = copy(base, w / "run") if base else (w / "run")
            for rel in rels:
                write(run / rel, content)
            return [f"run/{rel}" for rel in rels]

        return setup

    for rel in [
        "adapter/MY_NOTES.txt", "checkpoints/keepme.txt", "checkpoints/2/state/mine.bin", "base_model/notes.md",
        "notes.txt", "checkpoints/0/meta/x", "adapter/sub/deeper/file.txt", ".hidden", "metrics.jsonl.bak",
        "checkpoints/3/state/x",
    ]:  # fmt: skip
        out.append(Case(f"overwrite-foreign-{rel}", "--overwrite", ow, setup=foreign("done", rel), timeout=RUN))

    def symlink_out(w):
        run = copy("done", w / "run")
        write(w / "precious.txt", "mine")
        (run / "adapter" / "link.txt").symlink_to(w / "precious.txt")
        return ["precious.txt", "run/adapter/link.txt"]

    def changed(rel):
        def setup(w):
            run = copy("done", w / "run")
            write(run / rel, "my own content, not the tool's")
            return [f"run/{rel}"]

        return setup

    def user_folder(w):
        d = w / "run"
        write(d / "config.yaml", yaml.safe_dump({"name": "tiny", "fl": {"rounds": 2}}))
        write(d / "metrics.jsonl", '{"round": 1}\n')
        write(d / "checkpoints" / "my_model.bin", b"\0" * 100)
        return ["run/config.yaml", "run/metrics.jsonl", "run/checkpoints/my_model.bin"]

    def fake_manifest(w):
        d = w / "run"
        write(d / "mine.txt", "mine")
        write(d / "config.yaml", "a: 1\n")
        write(d / "fedlora_manifest.json", json.dumps({"tool": "other", "entries": {}}))
        return ["run/mine.txt", "run/config.yaml"]

    def outside_manifest(w):
        run = copy("done", w / "run")
        write(w / "outside.txt", "mine")
        m = json.loads((run / "fedlora_manifest.json").read_text())
        m["entries"]["../outside.txt"] = {"size": 4}
        write(run / "fedlora_manifest.json", json.dumps(m))
        return ["outside.txt"]

    def empty_dir(w):
        run = copy("done", w / "run")
        (run / "adapter" / "my_empty_dir").mkdir()
        return ["run/adapter/my_empty_dir"]

    extra = {
        "symlink-to-user-file": symlink_out,
        "changed-config": changed("config.yaml"),
        "changed-adapter": changed("adapter/adapter_model.safetensors"),
        "changed-summary": changed("summary.json"),
        "user-folder-like-a-run": user_folder,
        "manifest-of-another-tool": fake_manifest,
        "manifest-lists-outside-file": outside_manifest,
        "foreign-empty-dir": empty_dir,
        "no-manifest-run": damage("done", rm("fedlora_manifest.json")),
        "run-folder-clean": damage("done", lambda r: None),
        "partial-run-clean": damage("partial", lambda r: None),
    }
    for name, setup in extra.items():
        out.append(Case(f"overwrite-{name}", "--overwrite", ow, setup=setup, timeout=RUN))
    out.append(
        Case(
            "resume-user-folder-like-a-run",
            "--overwrite",
            ["run", "tiny", "--out", "{w}/run", "--resume"],
            setup=user_folder,
        )
    )
    out.append(
        Case("fresh-into-user-folder", "--overwrite", ["run", "tiny", "--out", "{w}/run"], setup=foreign(None, "a.txt"))
    )

    # -- resume: the ordinary ways
    rs = ["run", "--out", "{w}/run", "--resume", "--no-progress"]
    out.append(Case("resume-partial", "resume", rs, setup=damage("partial", lambda r: None), timeout=RUN))
    out.append(Case("resume-done", "resume", rs, setup=damage("done", lambda r: None), timeout=RUN))
    out.append(
        Case(
            "resume-changed-config",
            "resume",
            ["run", "tiny", *RUN_SETS, "--set", "fl.lr=0.5", "--out", "{w}/run", "--resume"],
            setup=damage("partial", lambda r: None),
            timeout=RUN,
        )
    )
    out.append(
        Case("resume-with-foreign-file", "resume", rs, setup=foreign("partial", "adapter/MY_NOTES.txt"), timeout=RUN)
    )
    sets4 = ["--set", "fl.rounds=6"] + RUN_SETS[2:]
    for delay in (4.0, 7.0, 10.0, 13.0):
        out.append(
            Case(
                f"kill-9-at-{delay:g}s-then-resume",
                "resume",
                ["run", "tiny", *sets4, "--out", "{w}/run", "--no-progress"],
                kill_after=delay,
                then=["run", "--out", "{w}/run", "--resume", "--no-progress"],
                timeout=RUN,
            )
        )
        out.append(
            Case(
                f"kill-9-at-{delay:g}s-then-overwrite",
                "resume",
                ["run", "tiny", *sets4, "--out", "{w}/run", "--no-progress"],
                kill_after=delay,
                then=["run", "tiny", *RUN_SETS, "--out", "{w}/run", "--overwrite", "--no-progress"],
                timeout=RUN,
            )
        )

    # -- hangs
    for a in [
        ["run", "tiny", "--set", "fl.rounds=10000000", "--set", "dp.mode=local", "--set", "dp.noise=calibrate",
         "--out", "{w}/o"],
        ["run", "tiny", "--set", "fl.rounds=100000", "--set", "dp.mode=local", "--set", "dp.noise=calibrate",
         "--out", "{w}/o",
         "--set", "fl.num_clients=4", "--set", "fl.clients_per_round=2", "--set", "checkpoint_every=0", "--no-progress",
         "--set", "dp.budget=0.001"],
        ["plan", "tiny", "--set", "fl.rounds=10000000"],
        ["privacy", "--noise-multiplier", "1", "--clients", "4", "--clients-per-round", "2", "--rounds", "1000000000"],
        ["privacy", "--mode", "central", "--rounds", "100000000", "--sampling-rate", "0.1", "--noise-multiplier", "1"],
        ["privacy", "--participations", "100000", "--rounds", "100000", "--noise-multiplier", "1"],
    ]:  # fmt: skip
        out.append(Case("hang " + " ".join(a[:6]), "hangs", a, timeout=RUN))
    return out


def run_case(case: Case, root: Path) -> dict:
    work = root / "cases" / case.id.replace("/", "_").replace(" ", "_")[:120]
    work.mkdir(parents=True)
    foreign = case.setup(work) if case.setup else []
    foreign = list(foreign or [])
    before = {f: digest(work / f) for f in foreign}
    argv = [a.replace("{w}", str(work)) for a in case.argv]
    rc, err, secs = cli(argv, work, case.timeout, case.kill_after)
    if case.then is not None:
        then = [a.replace("{w}", str(work)) for a in case.then]
        rc, err2, s2 = cli(then, work, case.timeout)
        err, secs = err2, secs + s2
    lost = [f for f, d in before.items() if digest(work / f) != d]
    cls = classify(rc, err, lost)
    shutil.rmtree(work, ignore_errors=True)
    tail = [x for x in err.strip().splitlines() if x.strip()]
    return {
        "id": case.id,
        "family": case.family,
        "argv": case.argv,
        "exit": rc,
        "seconds": round(secs, 1),
        "class": cls,
        "lost": lost,
        "stderr": tail[-3:] if cls != "clean" else tail[-1:],
    }


CLASSES = ("clean", "traceback", "hang", "data loss")


def table(results: list[dict]) -> str:
    fams = list(dict.fromkeys(r["family"] for r in results))
    lines = ["| family | cases | " + " | ".join(CLASSES) + " |", "|---|---:|" + "---:|" * len(CLASSES)]
    for f in [*fams, None]:
        rs = [r for r in results if f is None or r["family"] == f]
        c = Counter(r["class"] for r in rs)
        name = "**all**" if f is None else f
        lines.append(f"| {name} | {len(rs)} | " + " | ".join(str(c[k]) for k in CLASSES) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="run only the cases whose id contains this")
    ap.add_argument("--rerun", help="a cases.jsonl: run again only its cases that were not clean, and merge")
    ap.add_argument("--out", default="experiments/results/fault_probe")
    args = ap.parse_args()
    all_cases = cases()
    assert len({c.id for c in all_cases}) == len(all_cases), "case ids must be unique"
    chosen = [c for c in all_cases if not args.only or args.only in c.id]
    previous = {}
    if args.rerun:
        previous = {r["id"]: r for r in map(json.loads, Path(args.rerun).read_text().splitlines())}
        chosen = [c for c in chosen if previous.get(c.id, {}).get("class", "traceback") != "clean"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="fault_probe_"))
    results = []
    t0 = time.time()
    try:
        make_bases(root)
        with (out / "cases.jsonl").open("w") as f:
            for i, c in enumerate(chosen, 1):
                r = run_case(c, root)
                results.append(r)
                f.write(json.dumps(r) + "\n")
                f.flush()
                mark = "" if r["class"] == "clean" else f"  <-- {r['class']}: {(r['stderr'] or [''])[-1][:200]}"
                print(
                    f"[{i}/{len(chosen)}] {r['class']:9s} {r['exit']!s:>4} {r['seconds']:6.1f}s {c.id}{mark}",
                    flush=True,
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if previous:  # the first pass's results, the rerun ones replaced
        again = {r["id"]: r for r in results}
        results = [again.get(c.id, previous.get(c.id)) for c in all_cases if c.id in again or c.id in previous]
        with (out / "cases.jsonl").open("w") as f:
            f.writelines(json.dumps(r) + "\n" for r in results)
    text = table(results)
    minutes = (time.time() - t0) / 60
    (out / "table.md").write_text(f"{text}\n\n{len(results)} cases in {minutes:.0f} min.\n")
    print(text)
    return 0 if all(r["class"] == "clean" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
