"""The command line's surface: --version, help on every option, presets in run --help, `config`."""

import argparse
import importlib.metadata

import pytest
import yaml

import fedlora_jax
from fedlora_jax import cli
from fedlora_jax.config.run_config import load_config, preset_names
from fedlora_jax.runs.outdir import prepare_out


def _parsers(parser, path=("fedlora-jax",)):
    """(command path, parser) for the top parser and every subcommand's, recursively."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, path + (name,))


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    out = capsys.readouterr().out.strip()
    try:
        want = importlib.metadata.version("fedlora-jax")
    except importlib.metadata.PackageNotFoundError:
        want = fedlora_jax.__version__
    assert out == f"fedlora-jax {want}"


def test_every_option_of_every_command_has_help():
    parsers = list(_parsers(cli.build_parser()))
    commands = {p[-1] for p, _ in parsers}
    assert {"run", "score", "privacy", "generate", "config", "eval", "audit", "data", "plan"} <= commands
    missing = []
    for path, parser in parsers:
        for action in parser._actions:
            if action.help is argparse.SUPPRESS:
                continue
            if not (action.help or "").strip():
                missing.append(f"{' '.join(path)} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, f"options without help: {missing}"


def test_the_walk_sees_an_option_without_help():
    """The walk above can fail: an option added without help is reported."""
    p = cli.build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices["run"]
    sub.add_argument("--undocumented")
    bad = [a for _, q in _parsers(p) for a in q._actions if not (a.help or "").strip()]
    assert [a.dest for a in bad] == ["undocumented"]


def test_run_help_lists_presets_and_where_keys_are_documented(capsys):
    assert cli.main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    assert preset_names()
    for name in preset_names():
        assert f"  {name} " in out or f"  {name}\n" in out, name
    assert "README" in out and "Config sections" in out
    assert "fedlora-jax config" in out


@pytest.mark.parametrize("config, overrides", [(None, []), ("tiny", ["fl.rounds=3", "dp.mode=local"])])
def test_config_prints_what_run_writes(config, overrides, tmp_path, capsys):
    argv = ["config"] + ([config] if config else []) + [x for o in overrides for x in ("--set", o)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    cfg = load_config(config, overrides)
    prepare_out(cfg, tmp_path / "run", resume=False, overwrite=False)  # what `run` writes first
    written = (tmp_path / "run" / "config.yaml").read_text()
    assert yaml.safe_load(printed) == yaml.safe_load(written)
    assert load_config(str(tmp_path / "run" / "config.yaml")) == cfg
    (tmp_path / "printed.yaml").write_text(printed)
    assert load_config(str(tmp_path / "printed.yaml")) == cfg  # the printout is itself a config


def test_config_shows_defaults_not_in_the_preset(capsys):
    assert cli.main(["config", "tiny"]) == 0
    d = yaml.safe_load(capsys.readouterr().out)
    assert "delta" in d["dp"] and "clip_a" in d["dp"]  # tiny.yaml sets only dp.mode


@pytest.mark.parametrize(
    "argv, words",
    [
        (["config", "--set", "fl.nope=3"], "unknown config key 'fl.nope'"),
        (["config", "no-such-preset"], "neither a file nor a preset"),
        (["config", "--set", "fl.rounds=-1"], "fl.rounds"),
    ],
)
def test_config_bad_keys_exit_2_with_the_loaders_sentence(argv, words, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedlora-jax config: error:") and words in err[0]


def test_resume_without_config_uses_the_run_folders_config(tmp_path, capsys):
    """`run --out DIR --resume` with no CONFIG continues the run in DIR with its own config.yaml
    (not the `default` preset, which would differ in every key)."""
    from fedlora_jax import cli

    out = tmp_path / "r"
    sets = ["--set", "fl.rounds=1", "--set", "checkpoint_every=1", "--set", "data.synthetic_examples=120"]
    assert cli.main(["run", "tiny", *sets, "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    assert cli.main(["run", "--out", str(out), "--resume", "--no-progress"]) == 0
    printed = capsys.readouterr()
    assert "already finished" in printed.out + printed.err


def test_too_few_examples_names_the_examples_dropped_for_seq_len(tmp_path, capsys):
    """8 clients, rows too long for seq_len: the error says how many were dropped and why."""
    import json

    from fedlora_jax import cli

    rows = [{"instruction": "x" * 80, "output": "y"} for _ in range(30)] + [{"instruction": "a", "output": "b"}] * 2
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc = cli.main(["data", "tiny", "--set", f"data.source={f}", "--set", "data.seq_len=32"])
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip() and not x.startswith("warning")]
    assert rc == 2
    assert "30 of 32 examples were dropped" in err[-1] and "data.seq_len 32" in err[-1], err


def test_main_leaves_the_callers_logging_and_warning_format_as_it_found_them(capsys):
    """The CLI configures its one-line diagnostics for its own call only: a library user (or a later
    test) that captures the `fedlora_jax` logger through the root logger still sees its records."""
    import logging
    import warnings

    logger = logging.getLogger("fedlora_jax")
    before = (list(logger.handlers), logger.propagate, logger.level, warnings.formatwarning)
    assert cli.main(["config", "tiny"]) == 0
    assert (list(logger.handlers), logger.propagate, logger.level, warnings.formatwarning) == before
