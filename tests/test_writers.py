"""Metric writers (fedlora_jax/writers.py): TensorBoard and W&B (offline) get the metrics.jsonl rows
(same names, nothing more) for the rounds logging.log_every logs, eval, last and stop rounds
included; a resume duplicates no step; the progress bar says "compiling" then shows eval and
epsilon; metrics.png's figure has integer rounds, a round-0 eval point and a titled epsilon; a
chosen writer whose package is missing is a one-sentence error (exit 2)."""

from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path

import pytest

from fedlora_jax import cli
from fedlora_jax.config.run_config import load_config
from fedlora_jax.core.errors import UserError
from fedlora_jax.runs import reporting, writers
from fedlora_jax.runs.runner import run

SMALL = [
    "fl.num_clients=4",
    "fl.clients_per_round=2",
    "fl.local_steps=2",
    "fl.batch_size=4",
    "data.synthetic_examples=120",
    "checkpoint_every=1",
]
LOCAL = ["dp.mode=local", "dp.noise=multiplier", "dp.noise_multiplier=1.0", "dp.noise_seed=3"]
# 7 rounds, a row logged every 3rd round, eval every 5th: logged 3, 5, 6, 7 (and stop rounds)
THINNED = ["fl.rounds=7", "eval_every=5", "logging.log_every=3", "logging.writers=[tensorboard,wandb]"]


def _jsonl(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]


def _tb(folder: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value}, as TensorBoard reads the folder (purged events left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        steps = [e.step for e in events]
        assert len(steps) == len(set(steps)), f"{tag}: duplicate steps {steps}"
        out[tag] = {e.step: e.value for e in events}
    return out


def _wandb_history(path: Path) -> list[tuple[int, dict]]:
    """(step, values) of the history records in a .wandb file (a leveldb-style log of protobuf
    records: a 7-byte header, then 32 KiB blocks of chunks with a 7-byte crc/length/type header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, i, buf, out = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while i + 7 <= len(data):
        left = 32768 - i % 32768
        _, n, kind = struct.unpack("<IHB", data[i : i + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (n == 0 and kind == 0):
            i += left
            continue
        buf, i = buf + data[i + 7 : i + 7 + n], i + 7 + n
        if kind in (1, 4):  # a full record, or the last chunk of one
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            if rec.WhichOneof("record_type") == "history":
                items = {(x.key or "/".join(x.nested_key)): json.loads(x.value_json) for x in rec.history.item}
                out.append((rec.history.step.num, {k: v for k, v in items.items() if not k.startswith("_")}))
    return out


def _published(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "round" and v is not None}


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """A local-DP run in three sessions: stopped after round 1; resumed and stopped after round 3,
    whose checkpoint is then removed (as if killed after logging round 3, before its checkpoint);
    resumed to the end from round 2 (round 3 reruns). Logged rounds: 1 (stop), 3, 3 again (rerun),
    5, 6, 7."""
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    folder = tmp_path_factory.mktemp("writers") / "run"
    cfg = load_config("tiny", SMALL + LOCAL + THINNED)
    try:
        run(cfg, folder, progress=False, stop_after=1)
        after_first = _tb(folder)
        run(cfg, folder, resume=True, progress=False, stop_after=2)
        before_kill = _tb(folder)
        shutil.rmtree(folder / "checkpoints" / "3")
        summary = run(cfg, folder, resume=True, progress=False)
    finally:
        mp.undo()
    return {"folder": folder, "after_first": after_first, "before_kill": before_kill, "summary": summary}


def test_tensorboard_has_the_metrics_rows_of_the_logged_rounds(resumed):
    folder = resumed["folder"]
    rows = _jsonl(folder)
    assert [r["round"] for r in rows] == [1, 2, 3, 4, 5, 6, 7]  # metrics.jsonl: every round, once
    tb = _tb(folder)
    logged = [r for r in rows if r["round"] in (1, 3, 5, 6, 7)]
    before = resumed["summary"]["eval"]["before"]
    # step 0: the evaluation before the first round, with its n
    step0 = {"round": 0, "eval_loss": before["loss"], "eval_loss_n": before["n"], "eval_loss_tokens": before["tokens"]}
    want: dict[str, dict[int, float]] = {}
    for r in [step0, *logged]:
        for k, v in _published(r).items():
            want.setdefault(k, {})[r["round"]] = v
    # the first session's stop evaluated its exported round-1 adapter and sent it; the resumed run drops
    # that row from metrics.jsonl (superseded) but TensorBoard cannot take a step back: it stays as sent
    for tag, steps in resumed["after_first"].items():
        if tag.startswith("eval_") and 1 in steps:
            want.setdefault(tag, {})[1] = steps[1]
    assert set(tb) == set(want)
    for tag, steps in want.items():
        if tag == "seconds":  # the rerun round's wall time differs; its step must still be right
            assert set(tb[tag]) == set(steps)
            continue
        assert tb[tag] == pytest.approx(steps, rel=1e-6), tag  # TensorBoard stores float32


def test_a_stop_round_is_logged_and_a_resume_duplicates_no_step(resumed):
    assert set(resumed["after_first"]["epsilon"]) == {1}  # stopped after round 1 (not a log_every round)
    assert set(resumed["before_kill"]["epsilon"]) == {1, 3}
    # the third session resumed from round 2: round 3 reran and is logged again; readers see it once
    # (_tb fails on a duplicate step)
    assert set(_tb(resumed["folder"])["epsilon"]) == {1, 3, 5, 6, 7}


def test_dp_run_publishes_exactly_the_metrics_keys(resumed):
    rows = _jsonl(resumed["folder"])
    keys = set().union(*(_published(r) for r in rows))
    assert set(_tb(resumed["folder"])) == keys
    assert not any(k.startswith("unprotected_") or k in ("loss", "update_norm", "first_loss") for k in keys)


def test_wandb_offline_writes_one_local_run_with_the_logged_rows(resumed):
    folder = resumed["folder"]
    state = json.loads((folder / "wandb" / "fedlora_run.json").read_text())
    files = sorted((folder / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 3 and all(f.name == f"run-{state['id']}.wandb" for f in files)  # one run id, 3 sessions
    history = [h for f in files for h in _wandb_history(f)]
    # step 0 is the evaluation before the first round; round 3 was sent before the kill: W&B cannot
    # take a step back, the rerun skips it
    assert [step for step, _ in history] == [0, 1, 3, 5, 6, 7]
    rows = {r["round"]: r for r in _jsonl(folder)}
    before = resumed["summary"]["eval"]["before"]
    rows[0] = {
        "round": 0,
        "eval_loss": before["loss"],
        "eval_loss_n": before["n"],
        "eval_loss_tokens": before["tokens"],
    }
    for step, values in history:
        want = _published(rows[step])
        if step in (1, 3):  # sent by a session that stopped there, with the evaluation of its exported adapter
            assert all(k.startswith("eval_") for k in set(values) - set(want))
            values = {k: v for k, v in values.items() if k in want}
        assert set(values) == set(want)
        assert {k: v for k, v in values.items() if k != "seconds"} == pytest.approx(
            {k: v for k, v in want.items() if k != "seconds"}
        )


def test_metrics_csv_has_every_round(resumed):
    import csv

    with (resumed["folder"] / "metrics.csv").open() as f:
        assert [int(r["round"]) for r in csv.DictReader(f)] == [1, 2, 3, 4, 5, 6, 7]


def test_published_client_metrics_are_marked_and_the_bar_shows_compiling_then_eval_and_epsilon(tmp_path, capsys):
    sets = SMALL + LOCAL + ["dp.publish_client_metrics=true", "fl.rounds=3", "eval_every=3", "logging.log_every=2"]
    cfg = load_config("tiny", sets + ["logging.writers=[tensorboard]"])
    capsys.readouterr()
    run(cfg, tmp_path / "r", progress=True)
    err = capsys.readouterr().err
    rows = _jsonl(tmp_path / "r")
    tb = _tb(tmp_path / "r")
    assert set(tb) == set().union(*(_published(r) for r in rows))
    assert {"unprotected_loss", "unprotected_update_norm"} <= set(tb) and "loss" not in tb
    assert set(tb["epsilon"]) == {2, 3}  # log_every 2; round 3: last and eval
    # the bar: "compiling" during the first round, then eval loss and epsilon of the logged rows only
    assert "compiling" in err
    eps = lambda r: f"eps={rows[r - 1]['epsilon']:.3g}"
    assert err.index("compiling") < err.index(eps(2))
    assert eps(1) not in err and eps(3) in err  # round 1 is not logged (log_every 2)
    assert f"eval={rows[2]['eval_loss']:.3f}" in err
    assert "compiling" not in err[err.index(eps(2)) :]


def _figure(rows, **kw):
    fig = reporting.metrics_figure(rows, **kw)
    fig.canvas.draw()
    return fig


def test_plot_has_integer_rounds_a_round_zero_eval_and_a_title_with_mode_and_epsilon(resumed):
    import matplotlib.pyplot as plt

    rows, s = _jsonl(resumed["folder"]), resumed["summary"]
    title = reporting.plot_title("local", s["privacy"])
    fig = _figure(rows, initial_eval=s["initial_eval_loss"], title=title)
    try:
        for ax in fig.axes:
            ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
            assert ticks and all(float(t).is_integer() for t in ticks), ticks
        (ev,) = [ln for ln in fig.axes[0].get_lines() if "eval" in ln.get_label()]
        assert list(ev.get_xdata())[0] == 0 and list(ev.get_ydata())[0] == s["initial_eval_loss"]
        text = fig._suptitle.get_text()
        assert "local" in text and f"{s['privacy']['epsilon']:.4g}" in text and "delta 1e-05" in text
        # legends below their axes: no legend box overlaps an axes' plotting area
        boxes = [ax.get_window_extent() for ax in fig.axes]
        for ax in fig.axes:
            if ax.get_legend() is not None:
                lb = ax.get_legend().get_window_extent()
                assert not any(lb.overlaps(b) for b in boxes)
    finally:
        plt.close(fig)


def test_plot_leaves_out_none_and_nonpositive_values_on_the_log_axis():
    import matplotlib.pyplot as plt

    rows = [
        {"round": 1, "eval_loss": None, "epsilon": None, "loss": float("nan")},
        {"round": 2, "eval_loss": 2.0, "epsilon": 1.5, "loss": 3.0, "epsilon_paper_tracker": None},
        {"round": 3, "eval_loss": None, "epsilon": 2.5, "loss": 2.5, "epsilon_paper_tracker": 0.7},
    ]
    fig = _figure(rows, initial_eval=None, title=reporting.plot_title("none", {}))
    try:
        for ax in fig.axes:  # 3 rounds: matplotlib's default ticks would be 1, 1.25, 1.5, ...
            ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
            assert ticks and all(float(t).is_integer() for t in ticks), ticks
        (eps,) = fig.axes[1].get_lines()[:1]
        assert list(eps.get_xdata()) == [2, 3] and fig.axes[1].get_yscale() == "log"
        (ev,) = [ln for ln in fig.axes[0].get_lines() if "eval" in ln.get_label()]
        assert list(ev.get_xdata()) == [2]  # no initial eval given: no round-0 point
        (train,) = [ln for ln in fig.axes[0].get_lines() if ln.get_label().startswith("train")]
        assert list(train.get_xdata()) == [2, 3]
        assert "no DP" in fig._suptitle.get_text()
    finally:
        plt.close(fig)
    rows[1]["epsilon"] = 0.0  # a zero epsilon cannot go on a log axis: the axis stays linear
    fig = _figure(rows)
    try:
        assert fig.axes[1].get_yscale() == "linear" and list(fig.axes[1].get_lines()[0].get_xdata()) == [2, 3]
    finally:
        plt.close(fig)


def test_log_every_thins_as_documented():
    cfg = load_config("tiny", ["fl.rounds=10", "eval_every=4", "logging.log_every=3"])
    assert [r for r in range(1, 11) if writers.logs(cfg, r)] == [3, 4, 6, 8, 9, 10]
    assert load_config("tiny").logging.log_every == 1  # default: every round


@pytest.mark.parametrize(
    "name, module, extra",
    [("tensorboard", "tensorboardX", "fedlora-jax[tensorboard]"), ("wandb", "wandb", "fedlora-jax[wandb]")],
)
def test_a_missing_writer_package_is_exit_2_with_the_package_and_extra(
    name, module, extra, tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    out = tmp_path / "r"
    code = cli.main(["run", "tiny", "--set", f"logging.writers=[{name}]", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"'{module}' is not installed" in err and extra in err and len(err.strip().splitlines()) == 1
    assert not out.exists()  # refused before the run folder was made


@pytest.mark.parametrize(
    "sets, message",
    [
        (["logging.log_every=0"], "logging.log_every must be >= 1"),
        (["logging.writers=[tensorbord]"], "logging.writers entry = 'tensorbord' is not allowed"),
        (["logging.writers=[wandb,wandb]"], "lists a writer twice"),
        (["logging.wandb_mode=cloud"], "logging.wandb_mode = 'cloud' is not allowed"),
    ],
)
def test_bad_logging_keys_are_one_sentence(sets, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace(".", r"\.")):
        load_config("tiny", sets)
