"""The 2-D device mesh ('clients', 'model') on 8 forced CPU devices (conftest): the base split over
'model' and the clients over 'clients' compute the single-device round; plan's per-device bytes
track XLA's memory analysis of the partitioned program; fl.devices is checked."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedlora_jax import cli
from fedlora_jax.config.run_config import load_config
from fedlora_jax.core import randomness
from fedlora_jax.core.errors import UserError
from fedlora_jax.federated import mesh as M
from fedlora_jax.federated.plan import plan
from fedlora_jax.federated.simulation import Cohort, build_round, init_state
from fedlora_jax.models import LoRAConfig, ModelConfig, init_model
from fedlora_jax.privacy import mechanisms as modes

K, STEPS, B, S, N = 3, 2, 2, 12, 5
SHAPES = [(8, 1), (4, 2), (2, 4), (1, 8)]
SETTINGS = {
    "fedavg_local": ["dp.mode=local", "dp.noise=multiplier", "dp.noise_multiplier=0.1"],
    "central": [
        "dp.mode=central",
        "fl.sampling=poisson",
        "dp.noise=multiplier",
        "dp.noise_multiplier=0.5",
        "dp.scope=global",
    ],
    "stack": ["fl.aggregation=stack"],
}


def _setup(extra, mc=None):
    cfg = load_config(
        "tiny",
        [
            f"fl.num_clients={N}",
            f"fl.clients_per_round={K}",
            f"fl.local_steps={STEPS}",
            f"fl.batch_size={B}",
            "fl.lr=1e-2",
            *extra,
        ],
    )
    # every split dimension (heads x head_dim, kv heads x head_dim, MLP, vocab) divisible by 8
    mc = mc or ModelConfig(
        "llama", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64
    )
    lc = LoRAConfig(r=4, target_modules=("q_proj", "v_proj", "down_proj"))
    definition, base, lora = init_model(mc, lc, seed=0)
    rng = np.random.RandomState(0)
    block = {
        "tokens": jnp.asarray(rng.randint(0, mc.vocab_size, (K, STEPS, B, S)), jnp.int32),
        "attention_mask": jnp.ones((K, STEPS, B, S), jnp.int32),
        "loss_mask": jnp.asarray(rng.rand(K, STEPS, B, S) < 0.7, jnp.int32),
        "num_examples": jnp.asarray([10.0, 30.0, 20.0]),
    }
    args = (
        Cohort.of(block, [0, 2, 4], np.full((K,), 4), np.ones((K,), bool)),
        randomness.round_keys(0, 3),
        jnp.float32(1e-2),
    )
    return cfg, definition, base, lora, args


def _max_diff(a, b):
    return max((float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))), default=0.0)


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_a_round_on_every_mesh_shape_equals_the_single_device_round(setting):
    assert len(jax.devices()) >= 8
    cfg, definition, base, lora, args = _setup(SETTINGS[setting])
    mech = modes.build(cfg, lora)
    ref, ref_m = build_round(definition, cfg, mech, N)(init_state(cfg, lora, N, mech), base, *args)
    moved = _max_diff(ref.lora, lora)
    assert moved > 1e-3  # the round changed the adapter: equality below is not of two no-ops
    for shape in SHAPES:
        mesh = M.make_mesh(shape)
        sharded = M.shard_base(base, mesh)
        q = sharded["blocks"]["attn"]["q_proj"]["kernel"]
        # each device holds 1/model of a split kernel (here [layers, 32, 32 / model])
        assert {s.data.shape for s in q.addressable_shards} == {(2, 32, 32 // shape[1])}
        out, m = build_round(definition, cfg, mech, N, mesh=mesh)(init_state(cfg, lora, N, mech), sharded, *args)
        # the same function; only float sums inside split matmuls are reordered (float32: ~1e-7)
        assert _max_diff(out.lora, ref.lora) < 1e-5 * max(1.0, moved), shape
        assert _max_diff(out._replace(lora=None, round=None), ref._replace(lora=None, round=None)) < 1e-4, shape
        assert float(m["loss"]) == pytest.approx(float(ref_m["loss"]), rel=1e-5)
        assert int(m["dropped"]) == int(ref_m["dropped"])


def test_a_dimension_the_model_axis_does_not_divide_is_replicated_and_named():
    # head_dim 10: k/v have 2 kv heads x 10 = 20 columns, not divisible by 8 (they stay whole)
    mc = ModelConfig(
        "llama", vocab_size=64, hidden_size=40, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=64
    )
    cfg, definition, base, lora, args = _setup(SETTINGS["fedavg_local"], mc)
    lay = M.layout(base, 8)
    assert sorted(lay["not_divisible"]) == ["blocks/attn/k_proj/kernel", "blocks/attn/v_proj/kernel"]
    assert "blocks/mlp/down_proj/kernel" in lay["split"] and "embed/embedding" in lay["split"]
    assert not any("norm" in p for p in lay["split"] + lay["not_divisible"])
    # per-device bytes: whole for the replicated leaves, 1/8 for the split ones
    total = sum(x.nbytes for x in jax.tree.leaves(base))
    split = sum(
        x.nbytes for p, x in jax.tree_util.tree_flatten_with_path(base)[0] if "/".join(M._names(p)) in lay["split"]
    )
    assert M.per_device_bytes(base, 8) == total - split + split // 8
    mech = modes.build(cfg, lora)
    ref, _ = build_round(definition, cfg, mech, N)(init_state(cfg, lora, N, mech), base, *args)
    mesh = M.make_mesh((1, 8))
    out, _ = build_round(definition, cfg, mech, N, mesh=mesh)(
        init_state(cfg, lora, N, mech), M.shard_base(base, mesh), *args
    )
    assert _max_diff(out.lora, ref.lora) < 1e-5


@pytest.mark.parametrize("devices", ["[4,2]", "[2,4]", "[1,8]"])
def test_plan_per_device_bytes_track_xla_on_the_partitioned_round(devices):
    sets = [f"fl.devices={devices}", "model.hidden_size=128", "model.intermediate_size=512", "data.seq_len=64"]
    out = plan(load_config("tiny", sets), device_gib=1.0, do_measure=True)
    e, x = out["estimate"], out["measured"]
    rows, m = e["mesh"]
    assert x["per_device"] and rows * m == 8
    single = plan(load_config("tiny", sets[1:]), device_gib=1.0)["estimate"]
    # the split kernels count 1/model per device: the base per device shrinks close to 1/model
    assert e["base_bytes"] == single["base_bytes"]
    assert single["base_bytes"] / m <= e["base_bytes_per_device"] < single["base_bytes"] / m * 1.1
    # one client per 'clients' row: estimate (base + client) within 3x of XLA's per-device bytes
    est = e["base_bytes_per_device"] + e["per_client_bytes"]
    xla = x["chunk_1"]["temp_bytes"] + x["chunk_1"]["argument_bytes"]
    assert xla / 3 < est < 3 * xla
    assert x["per_client_temp_bytes"] / 3 < e["per_client_bytes"] < 3 * x["per_client_temp_bytes"]


def test_largest_chunk_on_a_mesh_counts_every_clients_row():
    est = {"mesh": [4, 2], "base_bytes": 8 * 2**30, "base_bytes_per_device": 2**30, "per_client_bytes": 2**30}
    # each device: (9 - 1) GiB free -> 8 clients per row; 4 rows
    assert M.mesh_shape([4, 2]) == (4, 2)
    from fedlora_jax.federated.plan import largest_chunk

    assert largest_chunk(est, 10 * 2**30, cohort=1000) == 32
    assert largest_chunk(est, 10 * 2**30, cohort=20) == 20


@pytest.mark.parametrize("value, parsed", [("4", (4,)), ("[2,4]", (2, 4)), ("2,4", (2, 4)), ("[1]", (1,))])
def test_fl_devices_accepts_a_count_or_a_mesh_shape(value, parsed):
    assert load_config("tiny", [f"fl.devices={value}"]).fl.devices == parsed


@pytest.mark.parametrize("value", ["0", "[2,0]", "[1,2,3]", "[]", "[2,1.5]", "two"])
def test_a_bad_fl_devices_is_one_sentence_naming_it(value):
    with pytest.raises(UserError, match=r"fl\.devices"):
        load_config("tiny", [f"fl.devices={value}"])


def test_a_mesh_larger_than_the_visible_devices_exits_2_before_loading(tmp_path, capsys):
    assert cli.main(["run", "tiny", "--out", str(tmp_path / "r"), "--set", "fl.devices=[4,4]"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs 16 devices but 8 are visible" in err
    assert not (tmp_path / "r").exists()


def test_a_run_on_a_2x4_mesh_equals_the_single_device_run(tmp_path):
    from fedlora_jax.runs.runner import run

    sets = ["fl.rounds=2", "fl.num_clients=4", "fl.clients_per_round=2", "fl.local_steps=2", "eval_every=1"]
    one = run(load_config("tiny", sets), tmp_path / "one", progress=False)
    mesh = run(load_config("tiny", [*sets, "fl.devices=[2,4]"]), tmp_path / "mesh", progress=False)
    assert mesh["final_eval_loss"] == pytest.approx(one["final_eval_loss"], rel=1e-5)
    assert mesh["final_eval_loss"] != pytest.approx(mesh["initial_eval_loss"], rel=1e-4)  # it trained


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch_two(tmp_path, out, args, extra=()):
    """Two processes x 4 CPU devices of one multi-host run; [(rc, stdout, stderr)] per process."""
    import os
    import subprocess
    import sys

    port = _free_port()
    procs = []
    for i in range(2):
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        env.update(
            JAX_PLATFORMS="cpu",
            JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
            TMPDIR=str(tmp_path),
            XLA_FLAGS="--xla_force_host_platform_device_count=4",
            JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(i),
        )
        cmd = [sys.executable, "-m", "fedlora_jax.cli", "run", "tiny", "--out", str(out), *extra, *args]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return [(p.wait(timeout=600), *p.communicate()) for p in procs]


def test_a_multi_host_dp_run_uses_process_0s_secret_noise_seed_on_every_process(tmp_path):
    """Under DP without dp.noise_seed each run draws a secret seed: all processes must use process
    0's (else each host's devices add different noise and sample different cohorts). The run must
    equal one process given that seed (read from the checkpoint, the server's private state)."""
    import json
    import os
    import subprocess
    import sys

    sets = [
        "fl.rounds=2",
        "fl.num_clients=4",
        "fl.clients_per_round=2",
        "fl.local_steps=2",
        "eval_every=1",
        "dp.mode=local",
        "dp.noise=multiplier",
        "dp.noise_multiplier=0.3",
        "dp.clip_a=0.5",
        "dp.clip_b=0.5",
    ]
    args = [x for s in [*sets, "fl.devices=[2,4]", "fl.distributed=true"] for x in ("--set", s)]
    (rc0, _, err0), (rc1, _, err1) = _launch_two(tmp_path, tmp_path / "run", args, ["--no-progress"])
    assert rc0 == 0 and rc1 == 0, err0[-2000:] + err1[-2000:]
    meta = json.loads((tmp_path / "run" / "checkpoints" / "2" / "meta" / "metadata").read_text())
    seed = meta["noise_seed"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    one = subprocess.run(
        [sys.executable, "-m", "fedlora_jax.cli", "run", "tiny", "--out", str(tmp_path / "one"), "--no-progress"]
        + [x for s in [*sets, "fl.devices=[2,4]", f"dp.noise_seed={seed}"] for x in ("--set", s)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    rows = lambda p: [json.loads(line)["eval_loss"] for line in (p / "metrics.jsonl").read_text().splitlines()]
    assert rows(tmp_path / "run") == pytest.approx(rows(tmp_path / "one"), rel=1e-6)


def test_two_processes_of_a_multi_host_run_equal_one_process_on_the_same_mesh(tmp_path):
    """fl.distributed on one machine: 2 processes x 4 CPU devices (gloo collectives) form one 2x4
    mesh; process 0 writes the run folder, process 1 nothing of its own; the metrics equal a
    single process on 8 devices with the same mesh shape; --resume of the finished run is a no-op."""
    import json
    import os
    import subprocess
    import sys

    sets = ["fl.rounds=2", "fl.num_clients=4", "fl.clients_per_round=2", "fl.local_steps=2", "eval_every=1"]
    args = [x for s in [*sets, "fl.devices=[2,4]", "fl.distributed=true"] for x in ("--set", s)]
    base_env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    base_env.update(JAX_PLATFORMS="cpu")

    def launch(extra):
        return _launch_two(tmp_path, tmp_path / "run", args, extra)

    (rc0, out0, err0), (rc1, out1, err1) = launch(["--no-progress"])
    assert rc0 == 0 and rc1 == 0, err0[-2000:] + err1[-2000:]
    # (gloo's C++ layer prints its connections on stdout; ours is the last line)
    assert "eval loss" in out0 and out1.strip().splitlines()[-1] == (
        f"process 1 of 2: 2 rounds (completed); process 0 wrote the run folder {tmp_path / 'run'}"
    )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("fedlora_process")]  # scratch removed
    multi = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    single = subprocess.run(
        [sys.executable, "-m", "fedlora_jax.cli", "run", "tiny", "--out", str(tmp_path / "one"), "--no-progress"]
        + [x for s in [*sets, "fl.devices=[2,4]"] for x in ("--set", s)],
        env={**base_env, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
        capture_output=True,
        text=True,
    )
    assert single.returncode == 0, single.stderr[-2000:]
    one = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [r["eval_loss"] for r in multi] == pytest.approx([r["eval_loss"] for r in one], rel=1e-6)
    assert multi[-1]["eval_loss"] < multi[0]["eval_loss"]
    (rc0, out0, _), (rc1, out1, _) = launch(["--resume"])
    assert rc0 == 0 and rc1 == 0 and "already finished" in out0 and "already finished" in out1
    # as if killed before the last round's checkpoint: both processes resume from the one before
    import shutil

    (tmp_path / "run" / "summary.json").unlink()
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "2")
    (rc0, _, err0), (rc1, out1, err1) = launch(["--resume", "--no-progress"])
    assert rc0 == 0 and rc1 == 0, err0[-2000:] + err1[-2000:]
    resumed = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["eval_loss"] for r in resumed] == pytest.approx([r["eval_loss"] for r in one], rel=1e-6)
