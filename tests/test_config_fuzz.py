"""Fuzzing `--set key=value`: load_config either returns a RunConfig or raises a UserError with a
one-line message, whatever the key (real or not) and the value (numbers incl. nan/inf/negatives,
strings, lists, malformed YAML, nothing)."""

from __future__ import annotations

import dataclasses
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedlora_jax.config.run_config import RunConfig, load_config
from fedlora_jax.core.errors import UserError


def _keys() -> list[str]:
    keys = []
    for f in dataclasses.fields(RunConfig):
        keys.append(f.name)
        if dataclasses.is_dataclass(f.default):
            keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(f.default)]
    return keys


KEYS = _keys()
UNKNOWN = [
    "log_every",
    "nosuch",
    "fl.bogus",
    "dp.mode.x",
    "model.source.y",
    "fl..rounds",
    ".fl",
    "fl.",
    "",
    "seed.x",
    "lora.r.s",
    "eval_tasks.0",
]
FRAGMENTS = [
    "",
    " ",
    "[1",
    "]",
    "{a:",
    "{",
    "}",
    "\t",
    "\tx",
    "- a",
    ": -",
    "'open",
    '"open',
    "!!python/object x",
    "&a [*a]",
    "*nope",
    "!!binary xyz",
    "[[[]]]",
    "{a: {b: {c: 1}}}",
    "null",
    "~",
    "yes",
    "no",
    "on",
    ".nan",
    ".inf",
    "-.inf",
    "nan",
    "inf",
    "1e400",
    "-1e400",
    "0x1F",
    "0o17",
    "1_000",
    "2020-01-01",
    "[a, 1, 2.5, null]",
    "{instruction: q}",
    "q_proj,v_proj",
    "[loss, exact_match]",
    "\x00",
    "\u2028",
    "\x85x",
    "#comment",
    "key: value",
    "a=b",
    "--- 1",
    "| \n x",
    "%YAML 1.1",
]
FLOATS = st.floats(allow_nan=True, allow_infinity=True)
INTS = st.one_of(st.integers(-10, 10), st.integers(-(2**70), 2**70), st.sampled_from([2**32 - 1, 2**32]))
SCALARS = st.one_of(
    INTS.map(str),
    FLOATS.map(repr),
    FLOATS.map(lambda x: "{:g}".format(x)),
    st.sampled_from(FRAGMENTS),
    st.text(max_size=12),
    st.sampled_from(
        [
            "true",
            "false",
            "local",
            "central",
            "dpsgd",
            "none",
            "tiny",
            "synthetic",
            "mean",
            "stack",
            "poisson",
            "uniform",
            "calibrate",
            "per_factor",
            "bfloat16",
            "alpaca",
            "by_column",
        ]
    ),
)
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=4).map(lambda xs: "[" + ", ".join(xs) + "]"))
ITEMS = st.one_of(
    st.tuples(st.sampled_from(KEYS + UNKNOWN), VALUES).map(lambda kv: f"{kv[0]}={kv[1]}"),
    st.sampled_from(["fl.rounds", "=", "==", "fl.rounds==3", "=3"]),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ITEMS)
def test_set_never_raises_anything_but_a_one_line_user_error(item):
    try:
        cfg = load_config("tiny", [item])
    except UserError as e:
        msg = str(e)
        assert msg and len(msg.splitlines()) == 1, msg
        return
    assert isinstance(cfg, RunConfig)
    for section in (cfg, cfg.model, cfg.lora, cfg.data, cfg.fl, cfg.dp):  # nothing non-finite got through
        for f in dataclasses.fields(section):
            v = getattr(section, f.name)
            assert not (isinstance(v, float) and not math.isfinite(v)), (item, f.name, v)


def test_keys_cover_every_field():
    assert "fl.rounds" in KEYS and "dp.public_counts" in KEYS and "eval_choices" in KEYS
