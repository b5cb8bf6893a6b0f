"""Bad input never ends in a traceback: each case runs `fedlora_jax.cli.main` in-process and must
return 2, print exactly one line on stderr that names the offending file/key/value, and write
nothing (the tree under tmp_path is unchanged, and no --out folder appears)."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
from pathlib import Path

import pytest
import yaml

from fedlora_jax import cli
from fedlora_jax.config.run_config import load_config
from fedlora_jax.core.errors import UserError
from fedlora_jax.runs.runfolder import MANIFEST, Manifest


def _safetensors(n: int = 64) -> bytes:
    import numpy as np
    from safetensors.numpy import save

    return save({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((4, n), np.float32)})


WEIGHTS = _safetensors()
TRUNCATED = WEIGHTS[: len(WEIGHTS) - 100]
ADAPTER = {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "r": 4,
    "lora_alpha": 8,
    "target_modules": ["q_proj", "v_proj"],
    "base_model_name_or_path": None,
}
LLAMA = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 300,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
}
TINY_YAML = yaml.safe_dump(load_config("tiny").to_dict(), sort_keys=False)


def _adapter(prefix: str, config=None, weights: bytes | None = WEIGHTS, raw_config: str | None = None) -> dict:
    files = {f"{prefix}/adapter_config.json": raw_config if raw_config is not None else json.dumps(config or ADAPTER)}
    if weights is not None:
        files[f"{prefix}/adapter_model.safetensors"] = weights
    return files


def _run_folder(prefix: str, **extra) -> dict:
    """A run folder of this tool: config.yaml, metrics.jsonl and the manifest that lists them."""
    files = {f"{prefix}/config.yaml": TINY_YAML, f"{prefix}/metrics.jsonl": '{"round": 1}\n'}
    entries = {k.split("/", 1)[1]: {"size": len(v.encode())} for k, v in files.items()}
    manifest = json.dumps({"tool": "fedlora_jax", "entries": entries, "pending": {}})
    return {**files, f"{prefix}/{MANIFEST}": manifest, **extra}


@dataclasses.dataclass
class Case:
    id: str
    argv: list  # "{tmp}" is replaced by the test's tmp_path
    says: str | tuple  # substring(s) of the one stderr line
    files: dict = dataclasses.field(default_factory=dict)  # inputs: relative path -> str | bytes
    dirs: tuple = ()  # input folders
    setup: object = None  # fn(monkeypatch) run before main
    xfail: str | None = None


# central DP with a given noise multiplier, for the cases on vanishing noise
CENTRAL_MULTIPLIER = [
    "dp.mode=central",
    "fl.sampling=poisson",
    "dp.scope=global",
    "fl.num_clients=40",
    "fl.clients_per_round=20",
    "dp.noise=multiplier",
]


def cfg(id, sets, says, **kw):
    return Case(id, ["run", "tiny", "--out", "{tmp}/out", *[x for s in sets for x in ("--set", s)]], says, **kw)


def data(id, name, content, says, extra=()):
    files = {name: content} if content is not None else {}
    return Case(id, ["data", "tiny", "--set", f"data.source={{tmp}}/{name}", *extra], says, files=files)


def privacy(id, args, says):
    return Case(id, ["privacy", *args], says)


def _read_only(monkeypatch):
    import fedlora_jax.runs.outdir as outdir

    monkeypatch.setattr(outdir.os, "access", lambda *a, **k: False)


CONFIG = [
    cfg("yaml-unclosed-list", ["fl.rounds=[1"], "fl.rounds=[1"),
    cfg("empty-section", ["fl="], "fl is empty"),
    cfg("empty-value", ["fl.rounds="], "fl.rounds needs a value"),
    cfg("section-not-mapping", ["fl=3"], "fl must be a mapping"),
    cfg("nan-epsilon", ["dp.epsilon=nan"], "dp.epsilon must be a finite number"),
    cfg("nan-lr", ["fl.lr=.nan"], "fl.lr must be a finite number"),
    cfg("inf-delta", ["dp.delta=inf"], "dp.delta must be a finite number"),
    cfg("inf-clip", ["dp.clip_a=.inf"], "dp.clip_a must be a finite number"),
    cfg("huge-int", ["fl.rounds=1e400"], "fl.rounds must be a finite number"),
    cfg("negative-lr", ["fl.lr=-1"], "fl.lr must be >= 0"),
    cfg("lr-min-above-lr", ["fl.lr_min=1"], "fl.lr_min must be in [0, fl.lr"),
    cfg("negative-lr-min", ["fl.lr_min=-1e-3"], "fl.lr_min must be in"),
    cfg("alpha-zero", ["lora.alpha=0"], "lora.alpha must be > 0"),
    cfg("rank-zero", ["lora.r=0"], "lora.r must be >= 1"),
    cfg("negative-eval-every", ["eval_every=-1"], "eval_every must be >= 0"),
    cfg("negative-checkpoint-every", ["checkpoint_every=-2"], "checkpoint_every must be >= 0"),
    cfg("zero-eval-examples", ["eval_examples=0"], "eval_examples must be >= 1"),
    cfg("zero-eval-batch-size", ["eval_batch_size=0"], "eval_batch_size must be >= 1"),
    cfg("negative-weight-decay", ["fl.weight_decay=-0.1"], "fl.weight_decay must be >= 0"),
    cfg("negative-prox-mu", ["fl.prox_mu=-1"], "fl.prox_mu must be >= 0"),
    cfg("zero-server-lr", ["fl.server_lr=0"], "fl.server_lr must be > 0"),
    cfg("beta-one", ["fl.server_b2=1.0"], "fl.server_b2 must be in [0, 1)"),
    cfg("negative-momentum", ["fl.server_momentum=-0.1"], "fl.server_momentum must be in [0, 1)"),
    cfg("max-examples-zero", ["data.max_examples=0"], "data.max_examples must be >= 1"),
    cfg("budget-zero", ["dp.budget=0"], "dp.budget must be > 0"),
    cfg("budget-below-one-round", ["dp.mode=local", "dp.budget=0.001"], "dp.budget = 0.001 is below one round"),
    cfg("seed-negative", ["seed=-1"], "seed must be an integer in [0, 2**32)"),
    cfg("seed-too-large", ["seed=4294967296"], "seed must be an integer in [0, 2**32)"),
    cfg("seed-fraction", ["seed=1.5"], "seed must be an integer, got 1.5"),
    cfg("removed-log-every", ["log_every=1"], "unknown config key 'log_every'"),
    cfg("unknown-key", ["fl.bogus=1"], "unknown config key 'fl.bogus'"),
    cfg("not-a-number", ["fl.rounds=many"], "fl.rounds must be a number, got 'many'"),
    cfg("bool-not-bool", ["dp.publish_client_metrics=3"], "dp.publish_client_metrics must be true or false"),
    cfg("name-escapes", ["name=../escape"], "name '../escape'"),
    cfg("cohort-too-big", ["fl.clients_per_round=9"], "fl.clients_per_round (9)"),
    cfg("no-targets", ["lora.target_modules=[]"], "lora.target_modules is empty"),
    cfg("bad-dtype", ["model.dtype=float16"], "model.dtype = 'float16'"),
    cfg("columns-not-mapping", ["data.columns=[1]"], "data.columns must be a mapping"),
    cfg("override-without-equals", ["fl.rounds"], "override 'fl.rounds' must look like key.sub=value"),
    cfg("override-empty-key", ["fl..rounds=3"], "'fl..rounds' is not a dotted config key"),
    cfg("yaml-tab-in-value", ["name=\tx"], "found character '\\t'"),
    # central DP with no or vanishing noise: nothing to account (0), or a PLD that does not fit in
    # memory (it ran out of memory at 1e-3) and an epsilon in the hundreds; adaptive clipping divided by it
    cfg(
        "central-z-zero",
        [
            *CENTRAL_MULTIPLIER,
            "dp.noise_multiplier=0",
        ],
        "noise multiplier 0 adds no noise",
    ),
    cfg(
        "central-z-tiny",
        [
            *CENTRAL_MULTIPLIER,
            "dp.noise_multiplier=1e-3",
        ],
        "effective noise multiplier 0.001 is below 0.05",
    ),
    cfg(
        "adaptive-z-zero",
        [
            *CENTRAL_MULTIPLIER,
            "dp.adaptive_clip=true",
            "dp.noise_multiplier=0",
        ],
        "noise multiplier 0 adds no noise",
    ),
    cfg(
        "adaptive-z-tiny",
        [
            *CENTRAL_MULTIPLIER,
            "dp.adaptive_clip=true",
            "dp.noise_multiplier=1e-200",
        ],
        "effective noise multiplier 1e-200 is below 0.05",
    ),
    cfg("dpsgd-z-tiny", ["dp.mode=dpsgd", "dp.noise=multiplier", "dp.noise_multiplier=0.01"], "dp.mode dpsgd"),
    Case(
        "yaml-file-malformed",
        ["run", "{tmp}/bad.yaml", "--out", "{tmp}/out"],
        ("bad.yaml", "line 3"),
        files={"bad.yaml": "name: x\nfl:\n  rounds: [1\n"},
    ),
    Case(
        "yaml-file-tab",
        ["run", "{tmp}/tab.yaml", "--out", "{tmp}/out"],
        ("tab.yaml", "line 2"),
        files={"tab.yaml": "fl:\n\trounds: 3\n"},
    ),
    Case(
        "yaml-file-list",
        ["run", "{tmp}/list.yaml", "--out", "{tmp}/out"],
        ("list.yaml", "got a list"),
        files={"list.yaml": "- fl\n- dp\n"},
    ),
    Case(
        "yaml-file-not-utf8",
        ["run", "{tmp}/latin.yaml", "--out", "{tmp}/out"],
        ("latin.yaml", "not UTF-8"),
        files={"latin.yaml": "name: caf\xe9\n".encode("latin-1")},
    ),
    Case("yaml-file-missing", ["run", "{tmp}/nope.yaml", "--out", "{tmp}/out"], "nope.yaml' is neither a file"),
    Case(
        "yaml-file-bad-value",
        ["data", "{tmp}/v.yaml"],
        "fl.lr must be a finite number",
        files={"v.yaml": "model: {source: tiny}\nfl: {lr: .inf}\n"},
    ),
]

DATA = [
    data("empty-jsonl", "empty.jsonl", "", "empty.jsonl' is empty"),
    data("blank-lines-jsonl", "blank.jsonl", "\n  \n", "blank.jsonl' is empty"),
    data("not-json", "bad.json", '[{"instruction": "a", "output": "b"},', ("bad.json", "not valid JSON")),
    data("jsonl-bad-line", "bad.jsonl", '{"instruction": "a", "output": "b"}\n{oops}\n', ("bad.jsonl", "line 2")),
    data(
        "not-utf8",
        "latin.jsonl",
        '{"instruction": "caf\xe9", "output": "b"}\n'.encode("latin-1"),
        ("latin.jsonl", "not UTF-8"),
    ),
    data("output-number", "int.jsonl", '{"instruction": "a", "output": 42}\n', ("int.jsonl", "'output'", "42")),
    data("output-list", "list.jsonl", '{"instruction": "a", "output": ["x"]}\n', ("list.jsonl", "['x']")),
    data(
        "output-mixed",
        "mixed.jsonl",
        '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": 3}\n',
        ("mixed.jsonl", "record 2"),
    ),
    data("output-null", "null.jsonl", '{"instruction": "a", "output": null}\n', ("null.jsonl", "holds nothing")),
    data("missing-file", "missing.jsonl", None, "missing.jsonl' does not exist"),
    data("csv-header-only", "h.csv", "instruction,output\n", "h.csv' holds no records"),
    data("csv-ragged", "r.csv", "instruction,output\na,b,c\n", ("r.csv", "row 2 has 3 fields")),
    data("parquet-garbage", "g.parquet", b"PAR1 not parquet", ("g.parquet", "not a readable Parquet")),
    data("json-object", "obj.json", '{"instruction": "a", "output": "b"}', ("obj.json", "JSON array")),
    data("json-scalars", "n.jsonl", "1\n2\n", ("n.jsonl", "record 1 is a JSON number")),
    data("no-output-column", "q.jsonl", '{"instruction": "a", "answer": "b"}\n', ("q.jsonl", "no column 'output'")),
    data(
        "unknown-label-column",
        "l.jsonl",
        '{"instruction": "a", "output": "b"}\n',
        "label column 'topic'",
        extra=("--set", "data.label_column=topic"),
    ),
    data("not-a-data-format", "notes.txt", "hello", "notes.txt' is a path but not a"),
    Case(
        "folder-named-json",
        ["data", "tiny", "--set", "data.source={tmp}/d.json"],
        "d.json' is not a file",
        dirs=("d.json",),
    ),
    Case(
        "run-with-bad-data",
        ["run", "tiny", "--out", "{tmp}/out", "--set", "data.source={tmp}/latin.jsonl"],
        ("latin.jsonl", "not UTF-8"),
        files={"latin.jsonl": '{"instruction": "\xe9"}\n'.encode("latin-1")},
    ),
]


def model(id, files, says, xfail=None, dirs=()):
    return Case(
        id,
        ["run", "tiny", "--out", "{tmp}/out", "--set", "model.source={tmp}/m"],
        says,
        files=files,
        dirs=dirs,
        xfail=xfail,
    )


MODEL = [
    model("no-config-json", {"m/model.safetensors": WEIGHTS}, "has no config.json"),
    model(
        "config-without-vocab-size",
        {
            "m/config.json": json.dumps({k: v for k, v in LLAMA.items() if k != "vocab_size"}),
            "m/model.safetensors": WEIGHTS,
        },
        ("config.json", "vocab_size"),
    ),
    model(
        "config-not-json",
        {"m/config.json": "{not json", "m/model.safetensors": WEIGHTS},
        ("config.json", "not valid JSON"),
    ),
    model(
        "truncated-weights", {"m/config.json": json.dumps(LLAMA), "m/model.safetensors": TRUNCATED}, "model.safetensors"
    ),
    model("no-weights", {"m/config.json": json.dumps(LLAMA)}, "has no model.safetensors"),
    model(
        "unknown-architecture",
        {"m/config.json": json.dumps({**LLAMA, "model_type": "bert"}), "m/model.safetensors": WEIGHTS},
        ("config.json", "unknown architecture", "'bert'"),
    ),
    Case(
        "model-missing",
        ["run", "tiny", "--out", "{tmp}/out", "--set", "model.source={tmp}/nothere"],
        "is not an existing folder",
    ),
    Case(
        "model-pickle",
        ["run", "tiny", "--out", "{tmp}/out", "--set", "model.source={tmp}/w.bin"],
        "refusing pickled checkpoint",
    ),
]


def adapter(id, files, says):
    return Case(id, ["eval", "{tmp}/a", "--model", "{tmp}/no-model"], says, files=files)


ADAPTERS = [
    adapter("no-r", _adapter("a", {k: v for k, v in ADAPTER.items() if k != "r"}), "has no 'r'"),
    adapter("r-zero", _adapter("a", {**ADAPTER, "r": 0}), "'r' must be an integer >= 1, got 0"),
    adapter("r-text", _adapter("a", {**ADAPTER, "r": "eight"}), "'r' must be an integer >= 1, got 'eight'"),
    adapter("r-fraction", _adapter("a", {**ADAPTER, "r": 2.5}), "got 2.5"),
    adapter("alpha-negative", _adapter("a", {**ADAPTER, "lora_alpha": -1}), "'lora_alpha' must be a number > 0"),
    adapter(
        "no-targets",
        _adapter("a", {k: v for k, v in ADAPTER.items() if k != "target_modules"}),
        "'target_modules' must be a non-empty list",
    ),
    adapter("targets-regex", _adapter("a", {**ADAPTER, "target_modules": ".*proj"}), "as a regex"),
    adapter("config-not-json", _adapter("a", raw_config="{r: 4"), ("adapter_config.json", "not valid JSON")),
    adapter("config-not-object", _adapter("a", raw_config="[4]"), ("adapter_config.json", "JSON object")),
    adapter("truncated-weights", _adapter("a", weights=TRUNCATED), ("adapter_model.safetensors", "truncated")),
    adapter("garbage-weights", _adapter("a", weights=b"\xff" * 64), ("adapter_model.safetensors", "truncated")),
    adapter("no-weights", _adapter("a", weights=None), "has no adapter_model.safetensors"),
    Case(
        "score-adapter-no-r",
        ["score", "{tmp}/no-model", "--adapter", "{tmp}/a", "--text", "hello"],
        "has no 'r'",
        files=_adapter("a", {k: v for k, v in ADAPTER.items() if k != "r"}),
    ),
    Case(
        "run-folder-truncated-adapter",
        ["eval", "{tmp}/run"],
        ("run/adapter/adapter_model.safetensors", "truncated"),
        files={**_run_folder("run"), **_adapter("run/adapter", weights=TRUNCATED)},
    ),
]

PRIVACY = [
    privacy(
        "unreachable-target",
        ["--mode", "central", "--sampling-rate", "0.1", "--rounds", "10", "--target-epsilon", "1e6"],
        "no noise multiplier reaches epsilon 1000000.0",
    ),
    privacy("target-nan", ["--target-epsilon", "nan"], "--target-epsilon: target epsilon must be a finite number"),
    privacy("target-inf", ["--target-epsilon", "inf"], "--target-epsilon: target epsilon must be a finite number"),
    privacy("target-negative", ["--target-epsilon", "-1"], "--target-epsilon: target epsilon must be > 0"),
    privacy("z-nan", ["--noise-multiplier", "nan"], "--noise-multiplier: noise multiplier must be a finite"),
    privacy("z-inf", ["--noise-multiplier", "inf"], "--noise-multiplier: noise multiplier must be a finite"),
    privacy("z-negative", ["--noise-multiplier", "-1"], "--noise-multiplier: noise multiplier must be >= 0"),
    privacy("z-not-number", ["--noise-multiplier", "lots"], "--noise-multiplier"),
    privacy("delta-zero", ["--noise-multiplier", "1", "--delta", "0"], "--delta must be in (0, 1)"),
    privacy("delta-nan", ["--noise-multiplier", "1", "--delta", "nan"], "--delta must be a finite number"),
    privacy("delta-one", ["--noise-multiplier", "1", "--delta", "1"], "--delta must be in (0, 1)"),
    privacy(
        "rate-above-one",
        ["--mode", "central", "--noise-multiplier", "1", "--sampling-rate", "1.5"],
        "--sampling-rate must be in (0, 1]",
    ),
    privacy(
        "rate-nan",
        ["--mode", "central", "--noise-multiplier", "1", "--sampling-rate", "nan"],
        "--sampling-rate must be a finite number",
    ),
    privacy(
        "batch-rate-zero",
        ["--mode", "dpsgd", "--noise-multiplier", "1", "--batch-sampling-rate", "0"],
        "--batch-sampling-rate must be in (0, 1]",
    ),
    privacy("sigma-without-clip", ["--sigma", "1"], "--sigma needs --clip"),
    privacy("clip-zero", ["--sigma", "1", "--clip", "0"], "--sigma needs --clip C > 0 (got 0.0)"),
    privacy("rounds-zero", ["--noise-multiplier", "1", "--rounds", "0"], "--rounds must be >= 1"),
    privacy("tensors-zero", ["--noise-multiplier", "1", "--tensors", "0"], "--tensors must be >= 1"),
    privacy(
        "participations-above-rounds",
        ["--noise-multiplier", "1", "--rounds", "2", "--participations", "5"],
        "--participations must be in [0, 2]",
    ),
    privacy(
        "cohort-above-clients",
        ["--mode", "central", "--noise-multiplier", "1", "--clients", "2", "--clients-per-round", "5"],
        "--clients-per-round: clients per round must be in [1, 2]",
    ),
    privacy("no-noise", [], "give --noise-multiplier"),
    privacy("two-noises", ["--noise-multiplier", "1", "--target-epsilon", "3"], "give one of"),
]

EVAL = [
    Case("eval-limit-zero", ["eval", "{tmp}/run", "--limit", "0"], "--limit must be >= 1, got 0"),
    Case("eval-limit-negative", ["eval", "{tmp}/run", "--limit", "-3"], "--limit must be >= 1, got -3"),
    Case("eval-limit-not-int", ["eval", "{tmp}/run", "--limit", "ten"], "--limit"),
    Case("eval-max-new-tokens-zero", ["eval", "{tmp}/run", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    Case("eval-target-missing", ["eval", "{tmp}/nothere"], "nothere' does not exist"),
    Case("eval-target-neither", ["eval", "{tmp}/plain"], "neither a run folder", dirs=("plain",)),
    Case("eval-data-without-mc", ["eval", "{tmp}/run", "--data", "{tmp}/mc.jsonl"], "--data is the multiple-choice"),
    Case(
        "eval-mc-bad-answer",
        ["eval", "{tmp}/a", "--model", "{tmp}/no-model", "--task", "multiple_choice", "--data", "{tmp}/mc.jsonl"],
        ("mc.jsonl", "record 1", "'answer'"),
        files={**_adapter("a"), "mc.jsonl": '{"question": "q", "choices": ["a", "b"], "answer": 7}\n'},
    ),
    Case(
        "eval-mc-missing-columns",
        ["eval", "{tmp}/a", "--model", "{tmp}/no-model", "--task", "multiple_choice", "--data", "{tmp}/mc.csv"],
        ("mc.csv", "missing choices"),
        files={**_adapter("a"), "mc.csv": "question,answer\nq,1\n"},
    ),
    Case(
        "eval-run-config-broken",
        ["eval", "{tmp}/run"],
        ("run/config.yaml", "not valid YAML"),
        files={"run/config.yaml": "fl: [\n", "run/metrics.jsonl": ""},
    ),
    Case(
        "score-file-missing",
        ["score", "{tmp}/no-model", "--file", "{tmp}/t.txt"],
        "--file '{tmp}/t.txt' does not exist",
    ),
    Case(
        "score-file-not-utf8",
        ["score", "{tmp}/no-model", "--file", "{tmp}/t.txt"],
        ("t.txt", "not UTF-8"),
        files={"t.txt": b"caf\xe9 au lait"},
    ),
    Case(
        "score-file-empty",
        ["score", "{tmp}/no-model", "--file", "{tmp}/t.txt"],
        ("t.txt", "is empty"),
        files={"t.txt": ""},
    ),
    Case("score-file-folder", ["score", "{tmp}/no-model", "--file", "{tmp}/d"], "d' is not a file", dirs=("d",)),
    Case("score-text-empty", ["score", "{tmp}/no-model", "--text", ""], "--text is empty"),
]


def out(id, args, says, **kw):
    return Case(id, ["run", "tiny", *args], says, **kw)


OUTPUT = [
    out("out-is-file", ["--out", "{tmp}/f"], "'{tmp}/f' is a file", files={"f": "x"}),
    out("out-under-file", ["--out", "{tmp}/f/run"], "'{tmp}/f' is a file, not a folder", files={"f": "x"}),
    out("out-not-empty", ["--out", "{tmp}/mine"], "exists and is not empty", files={"mine/notes.txt": "keep"}),
    out(
        "overwrite-foreign-folder",
        ["--out", "{tmp}/mine", "--overwrite"],
        f"has no {MANIFEST}, so nothing was deleted",
        files={"mine/notes.txt": "keep", "mine/config.yaml": "a: 1\n"},
    ),
    out("overwrite-config-only", ["--out", "{tmp}/r", "--overwrite"], "has no", files={"r/config.yaml": TINY_YAML}),
    out("overwrite-cwd", ["--out", ".", "--overwrite"], "holds the current directory", files={"x.txt": "keep"}),
    out("overwrite-parent-of-cwd", ["--out", "..", "--overwrite"], "holds the current directory"),
    out(
        "overwrite-run-with-foreign-file",
        ["--out", "{tmp}/run", "--overwrite"],
        "'notes.txt'",
        files=_run_folder("run", **{"run/notes.txt": "mine"}),
    ),
    out("resume-and-overwrite", ["--out", "{tmp}/run", "--resume", "--overwrite"], "exclude each other"),
    out("resume-missing", ["--out", "{tmp}/run", "--resume"], "does not exist; there is no run to resume"),
    out(
        "resume-no-config",
        ["--out", "{tmp}/run", "--resume"],
        "holds no run (no config.yaml)",
        files={"run/metrics.jsonl": ""},
    ),
    out(
        "resume-no-checkpoint",
        ["--out", "{tmp}/run", "--resume"],
        "has no checkpoint yet",
        files=_run_folder("run"),
        dirs=("run/checkpoints",),
    ),
    out("read-only-parent", ["--out", "{tmp}/ro/run"], "is not writable", dirs=("ro",), setup=_read_only),
    out("default-out-read-only", [], "'runs/tiny' cannot be made", setup=_read_only),
]

CASES = {
    "config": CONFIG,
    "data": DATA,
    "model": MODEL,
    "adapter": ADAPTERS,
    "privacy": PRIVACY,
    "eval": EVAL,
    "output": OUTPUT,
}
PARAMS = [
    pytest.param(c, id=f"{cat}-{c.id}", marks=[pytest.mark.xfail(reason=c.xfail, strict=False)] if c.xfail else [])
    for cat, cases in CASES.items()
    for c in cases
]


def _tree(root: Path) -> dict:
    """path -> (kind, size, mtime) of everything under root (a folder's mtime changes when an entry
    is created or removed in it, even if it is removed again)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (p.is_dir(), st.st_size if not p.is_dir() else 0, st.st_mtime_ns)
    st = root.stat()
    out["."] = (True, 0, st.st_mtime_ns)
    return out


def test_table_size():
    assert len(PARAMS) >= 60
    assert all(len(cases) >= 6 for cases in CASES.values())


@pytest.mark.parametrize("case", PARAMS)
def test_bad_input(case, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"  # the cwd; tmp_path itself holds it, so '..' is a real folder we watch
    work.mkdir()
    for name in case.dirs:
        (work / name).mkdir(parents=True, exist_ok=True)
    for name, content in case.files.items():
        f = work / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(content) if isinstance(content, bytes) else f.write_text(content)
    argv = [a.replace("{tmp}", str(work)) for a in case.argv]
    monkeypatch.chdir(work)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if case.setup:
        case.setup(monkeypatch)
    before = _tree(tmp_path)
    outs = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--out"]
    new_outs = [o for o in outs if not Path(o).exists()]

    rc = cli.main(argv)

    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1, err
    says = (case.says,) if isinstance(case.says, str) else case.says
    for s in says:
        assert s.replace("{tmp}", str(work)) in lines[0], lines[0]
    assert lines[0].startswith(f"fedlora-jax {argv[0]}: error: ") or lines[0].startswith("fedlora-jax")
    assert _tree(tmp_path) == before, "something was written"
    assert not any(Path(o).exists() for o in new_outs)


# ----------------------------------------------------------------------------- beyond the table


def _fake_run(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(TINY_YAML)
    (folder / "metrics.jsonl").write_text('{"round": 1}\n')
    (folder / "checkpoints" / "1").mkdir(parents=True)
    (folder / "adapter").mkdir()
    (folder / "adapter" / "adapter_model.safetensors").write_bytes(WEIGHTS)
    Manifest.create(folder, "config.yaml", "metrics.jsonl", "checkpoints", "adapter")  # as a run records them


def test_overwrite_replaces_a_run_folder(tmp_path):
    from fedlora_jax.runs.outdir import prepare_out

    run = tmp_path / "run"
    _fake_run(run)
    cfg = load_config("tiny", ["fl.rounds=3"])
    prepare_out(cfg, run, resume=False, overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == sorted(["config.yaml", MANIFEST])
    assert load_config(str(run / "config.yaml")) == cfg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # the old run is gone, no leftovers


@pytest.mark.parametrize("overwrite", [False, True])
def test_full_disk_keeps_what_was_there(tmp_path, monkeypatch, overwrite):
    from fedlora_jax.runs.outdir import prepare_out

    run = tmp_path / "deep" / "run"
    if overwrite:
        _fake_run(run)
    before = _tree(tmp_path)

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(UserError, match="No space left on device") as e:
        prepare_out(load_config("tiny"), run, resume=False, overwrite=overwrite)
    assert str(run) in str(e.value) and "\n" not in str(e.value)
    monkeypatch.undo()
    if overwrite:  # the old run is back in place, untouched
        assert {k: v[:2] for k, v in _tree(tmp_path).items()} == {k: v[:2] for k, v in before.items()}
        assert sorted(p.name for p in run.parent.iterdir()) == ["run"]
    else:
        assert list(tmp_path.iterdir()) == []


def test_run_errors_from_a_full_disk_are_one_sentence(tmp_path, monkeypatch, capsys):
    import fedlora_jax.runs.runner as runner

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "out" / "metrics.jsonl"))

    monkeypatch.setattr(runner, "run", full)
    assert cli.main(["run", "tiny", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "metrics.jsonl" in err[0] and "No space left on device" in err[0]


def test_a_budget_that_stops_before_round_one_prints_sanely(tmp_path, monkeypatch, capsys):
    """The run loop may stop before round 1 (dpsgd's budget is left to it): the CLI prints n/a."""
    import fedlora_jax.runs.runner as runner

    summary = {
        "rounds": 0,
        "stop_reason": "privacy budget 0.1 would be exceeded in round 1",
        "model": "tiny",
        "initial_eval_loss": 8.0,
        "final_eval_loss": None,
        "final_train_loss": None,
        "initial_scores": {},
        "final_scores": {},
        "privacy": {
            "mechanism": "dpsgd (record level)",
            "epsilon": None,
            "epsilon_mean": None,
            "delta": None,
            "max_participations": 0,
        },
        "wall_seconds": 1.0,
        "outputs": {},
    }
    monkeypatch.setattr(runner, "run", lambda *a, **k: summary)
    assert cli.main(["run", "tiny", "--out", str(tmp_path / "o")]) == 0
    text = capsys.readouterr().out
    assert "0 rounds" in text and "no round ran" in text
    assert cli.main(["run", "tiny", "--out", str(tmp_path / "o"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["privacy"]["epsilon"] is None


def test_json_output_is_strict():
    text = cli.dumps({"a": float("nan"), "b": [float("inf"), -float("inf"), 1.5], "c": {"d": None}})
    assert json.loads(text) == {"a": None, "b": [None, None, 1.5], "c": {"d": None}}
    assert "NaN" not in text and "Infinity" not in text
