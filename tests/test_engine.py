"""The federated engine: round identities, server optimizers, resume, recompilation, learning."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedlora_jax import cli
from fedlora_jax.adapters import lora as L
from fedlora_jax.adapters import peft_io
from fedlora_jax.config.run_config import load_config
from fedlora_jax.core import randomness
from fedlora_jax.federated import aggregation as agg
from fedlora_jax.federated.client import client_update
from fedlora_jax.federated.server import fedopt
from fedlora_jax.federated.simulation import Cohort, build_round, init_state
from fedlora_jax.models import LoRAConfig, ModelConfig, init_model
from fedlora_jax.privacy import mechanisms as modes
from fedlora_jax.runs.runner import run

K, STEPS, B, S = 3, 2, 2, 12


def _config(algorithm="fedavg", aggregation="mean", extra=()):
    return load_config(
        "tiny",
        [
            f"fl.algorithm={algorithm}",
            f"fl.aggregation={aggregation}",
            "fl.num_clients=5",
            f"fl.clients_per_round={K}",
            f"fl.local_steps={STEPS}",
            f"fl.batch_size={B}",
            "fl.lr=1e-2",
            *extra,
        ],
    )


def _setup(algorithm="fedavg", aggregation="mean", extra=()):
    cfg = _config(algorithm, aggregation, extra)
    mc = ModelConfig(
        "llama", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64
    )
    definition, base, lora = init_model(mc, LoRAConfig(r=4, target_modules=("q_proj", "v_proj")), seed=0)
    rng = np.random.RandomState(0)
    block = {
        "tokens": jnp.asarray(rng.randint(0, 64, (K, STEPS, B, S)), jnp.int32),
        "attention_mask": jnp.ones((K, STEPS, B, S), jnp.int32),
        "loss_mask": jnp.asarray(rng.rand(K, STEPS, B, S) < 0.7, jnp.int32),
        "num_examples": jnp.asarray([10.0, 30.0, 20.0]),
    }
    return cfg, definition, base, lora, block


LOCAL = ["dp.mode=local", "dp.noise=multiplier", "dp.noise_multiplier=0.1"]


def _args(block, ids=(0, 2, 4)):
    return (
        Cohort.of(block, ids, np.full((K,), 4), np.ones((K,), bool)),
        randomness.round_keys(0, 3),
        jnp.float32(1e-2),
    )


def _close(a, b, atol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, atol=atol)


@pytest.mark.parametrize("dp_mode", ["none", "local"])
def test_vmapped_round_equals_python_loop_and_does_not_recompile(dp_mode):
    cfg, definition, base, lora, block = _setup(extra=LOCAL if dp_mode == "local" else ())
    from fedlora_jax.privacy.mechanisms import primitives as mech

    mechanism = modes.build(cfg, lora)
    round_fn = build_round(definition, cfg, mechanism, 5)
    state = init_state(cfg, lora, 5)
    new_state, m = round_fn(jax.tree.map(jnp.copy, state), base, *_args(block))
    ids, key = [0, 2, 4], randomness.round_keys(0, 3)["client_noise"]
    released = []
    for i, cid in enumerate(ids):  # the same clients one at a time, with the same keys
        batches = {k: block[k][i] for k in ("tokens", "attention_mask", "loss_mask")}
        local, _, _ = client_update(definition, base, lora, batches, 1e-2)
        if dp_mode == "local":
            assert mechanism.sigma_a == pytest.approx(0.1 * cfg.dp.clip_a)
            local = mech.privatize(
                local,
                lora,
                jax.random.fold_in(key, cid),
                clip_a=cfg.dp.clip_a,
                clip_b=cfg.dp.clip_b,
                sigma_a=mechanism.sigma_a,
                sigma_b=mechanism.sigma_b,
            )
        released.append(local)
    # without DP the weights are example counts; under DP uniform (the counts are not declared public)
    p = np.array([10.0, 30.0, 20.0]) / 60.0 if dp_mode == "none" else np.full(3, 1 / 3)
    expect = jax.tree.map(lambda *xs: sum(w * x for w, x in zip(p, xs)), *released)
    _close(new_state.lora, expect)
    # a second round with new values compiles nothing
    round_fn(new_state, base, *_args(block, (1, 2, 3)))
    assert round_fn._cache_size() == 1


def test_fedavg_one_client_without_dp_is_local_training():
    cfg, definition, base, lora, block = _setup()
    one = {k: v[:1] for k, v in block.items()}
    cfg1 = load_config("tiny", ["fl.num_clients=5", "fl.clients_per_round=1", f"fl.local_steps={STEPS}"])
    round_fn = build_round(definition, cfg1, modes.build(cfg1, lora), 5)
    state, _ = round_fn(
        init_state(cfg1, lora, 5),
        base,
        Cohort.of(one, [2], [4], np.ones((1,), bool)),
        randomness.round_keys(0, 0),
        jnp.float32(1e-2),
    )
    local, _, _ = client_update(
        definition, base, lora, {k: one[k][0] for k in ("tokens", "attention_mask", "loss_mask")}, 1e-2
    )
    _close(state.lora, local)


def test_mean_of_identical_adapters_and_stacking_identity():
    _, definition, _, lora, _ = _setup()
    ad = jax.tree.map(lambda x: x + 0.1, lora)
    stacked = jax.tree.map(lambda x: jnp.stack([x] * 3), ad)
    w = agg.normalized_weights(jnp.asarray([1.0, 5.0, 2.0]), jnp.ones(3, bool))
    _close(agg.weighted_mean(stacked, w), ad, atol=1e-6)
    different = jax.tree.map(lambda x: jnp.stack([x, 2 * x, -x]), ad)
    deltas = agg.stacked_product(definition, different, w)
    scale = definition.lora.scale
    for path, m in L.modules(different):
        expect = sum(float(w[k]) * scale * jnp.einsum("lor,lri->lio", m["lora_b"][k], m["lora_a"][k]) for k in range(3))
        np.testing.assert_allclose(deltas["/".join(path)], expect, atol=1e-6)


@pytest.mark.parametrize("alg, extra", [("fedprox", ["fl.prox_mu=0"]), ("scaffold", [])])
def test_fedprox_mu0_and_scaffold_zero_controls_equal_fedavg(alg, extra):
    cfg, definition, base, lora, block = _setup()
    ref, _ = build_round(definition, cfg, modes.build(cfg, lora), 5)(init_state(cfg, lora, 5), base, *_args(block))
    cfg2, *_ = _setup(alg, extra=extra)
    out, _ = build_round(definition, cfg2, modes.build(cfg2, lora), 5)(init_state(cfg2, lora, 5), base, *_args(block))
    _close(out.lora, ref.lora)
    if alg == "scaffold":  # controls move after a round
        assert any(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(out.hook["global"]))


def test_server_optimizers_match_hand_computation():
    x = {"w": jnp.array([1.0, -2.0])}
    g = {"w": jnp.array([0.5, -0.25])}  # pseudo-gradient: global - aggregate
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    d = -g["w"]
    for kind, v in [
        ("adagrad", tau**2 + d**2),
        ("adam", b2 * tau**2 + (1 - b2) * d**2),
        ("yogi", tau**2 - (1 - b2) * d**2 * np.sign(tau**2 - d**2)),
    ]:
        opt = fedopt(kind, lr, b1, b2, tau)
        upd, _ = opt.update(g, opt.init(x), x)
        m = (1 - b1) * d
        np.testing.assert_allclose(optax.apply_updates(x, upd)["w"], x["w"] + lr * m / (np.sqrt(v) + tau), rtol=1e-5)
    sgdm = optax.sgd(1.0, momentum=0.9)
    st = sgdm.init(x)
    u1, st = sgdm.update(g, st, x)
    u2, _ = sgdm.update(g, st, x)
    np.testing.assert_allclose(u2["w"], -(1 + 0.9) * g["w"], rtol=1e-6)  # momentum buffer g, then 0.9 g + g


def test_non_finite_client_is_dropped_not_averaged():
    cfg, definition, base, lora, block = _setup()
    # one client with a NaN factor: the mean over the others, with their weights renormalised
    good = jax.tree.map(lambda x: jnp.stack([x + 1.0, x * jnp.nan, x - 1.0]), lora)
    finite = agg.all_finite(good)
    assert list(np.asarray(finite)) == [True, False, True]
    w = agg.normalized_weights(jnp.asarray([1.0, 1.0, 3.0]), finite)
    mean = agg.weighted_mean(agg.zero_invalid(good, finite), w)
    _close(mean, jax.tree.map(lambda x: 0.25 * (x + 1.0) + 0.75 * (x - 1.0), lora), atol=1e-6)
    # a round whose every update is non-finite (NaN learning rate) drops all and keeps the global
    round_fn = build_round(definition, cfg, modes.build(cfg, lora), 5)
    state, m = round_fn(
        init_state(cfg, lora, 5),
        base,
        Cohort.of(block, [0, 2, 4], np.full((K,), 4), np.ones((K,), bool)),
        randomness.round_keys(0, 0),
        jnp.float32(jnp.nan),
    )
    assert int(m["dropped"]) == K
    _close(state.lora, lora, atol=0)


def _tiny_cfg(tmp_path, *extra):
    return load_config(
        "tiny",
        [
            "fl.rounds=4",
            "checkpoint_every=2",
            "eval_every=2",
            "fl.num_clients=4",
            "fl.clients_per_round=2",
            "data.synthetic_examples=200",
            *extra,
        ],
    )


@pytest.mark.slow
def test_resume_equals_uninterrupted_run(tmp_path):
    cfg = _tiny_cfg(tmp_path, "dp.mode=local", "dp.noise=multiplier", "dp.noise_multiplier=0.5", "dp.noise_seed=3")
    full = run(cfg, tmp_path / "full", progress=False)
    run(cfg, tmp_path / "part", progress=False, stop_after=2)
    resumed = run(cfg, tmp_path / "part", resume=True, progress=False)
    a = peft_io.load_peft(tmp_path / "full" / "adapter", _definition(tmp_path / "full"))
    b = peft_io.load_peft(tmp_path / "part" / "adapter", _definition(tmp_path / "part"))
    _close(a, b, atol=0)
    assert full["privacy"]["epsilon"] == resumed["privacy"]["epsilon"]
    rows = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="keys that differ: fl.lr"):
        run(
            _tiny_cfg(
                tmp_path,
                "dp.mode=local",
                "dp.noise=multiplier",
                "dp.noise_multiplier=0.5",
                "dp.noise_seed=3",
                "fl.lr=0.5",
            ),
            tmp_path / "full",
            resume=True,
            progress=False,
        )
    _close(peft_io.load_peft(tmp_path / "full" / "adapter", _definition(tmp_path / "full")), a, atol=0)  # untouched


@pytest.mark.slow
def test_dpsgd_resume_draws_the_same_poisson_batches(tmp_path):
    # the batches are a pure function of (seed, client, participation), restored from the ledger
    cfg = _tiny_cfg(
        tmp_path, "dp.mode=dpsgd", "dp.noise=multiplier", "dp.noise_multiplier=1.0", "dp.clip_a=1.0", "dp.noise_seed=3"
    )
    full = run(cfg, tmp_path / "full", progress=False)
    run(cfg, tmp_path / "part", progress=False, stop_after=2)
    resumed = run(cfg, tmp_path / "part", resume=True, progress=False)
    _close(
        peft_io.load_peft(tmp_path / "full" / "adapter", _definition(tmp_path / "full")),
        peft_io.load_peft(tmp_path / "part" / "adapter", _definition(tmp_path / "part")),
        atol=0,
    )
    assert full["privacy"]["epsilon"] == resumed["privacy"]["epsilon"]


def _definition(folder):
    from fedlora_jax.models import abstract_model
    from fedlora_jax.runs.runner import build_model

    cfg = load_config(str(folder / "config.yaml"))
    definition = build_model(cfg)[0]
    return abstract_model(definition.config, peft_io.read_peft_config(folder / "adapter"))[0]


@pytest.mark.slow
def test_tiny_task_learns_without_dp(tmp_path):
    cfg = load_config("tiny", ["fl.rounds=12"])
    s = run(cfg, tmp_path / "r", progress=False)
    # the start is ~ln(vocab) + the random head's excess; learning must remove a third of it
    assert s["final_eval_loss"] < 0.67 * s["initial_eval_loss"]
    for f in ("metrics.jsonl", "metrics.csv", "metrics.png", "summary.json", "adapter/adapter_model.safetensors"):
        assert (tmp_path / "r" / f).exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [
        ["fl.algorithm=fedadam", "fl.server_lr=1e-2"],
        ["fl.algorithm=fedyogi", "fl.server_lr=1e-2"],
        ["fl.algorithm=fedadagrad", "fl.server_lr=1e-2"],
        ["fl.algorithm=fedavgm"],
        ["fl.algorithm=scaffold"],
        ["fl.aggregation=stack", "lora.client_ranks=[2,4,8,8]"],
        ["lora.freeze_a=true", "dp.mode=local"],
        ["lora.freeze_a=true", "dp.mode=local", "dp.scope=global"],
        ["lora.freeze_a=true", "dp.mode=local", "dp.scope=per_factor"],
        ["dp.mode=central", "fl.sampling=poisson", "dp.noise=multiplier", "dp.noise_multiplier=1.0", "dp.scope=global"],
    ],
)
def test_every_algorithm_and_mode_runs(tmp_path, extra):
    s = run(_tiny_cfg(tmp_path, "fl.rounds=2", *extra), tmp_path / "r", progress=False)
    assert s["rounds"] == 2 and np.isfinite(s["final_eval_loss"])
    if "dp.mode" not in " ".join(extra):
        assert np.isfinite(s["final_train_loss"])


def test_budget_stops_before_exceeding(tmp_path):
    from fedlora_jax.privacy import accounting as acc
    from fedlora_jax.privacy.mechanisms import primitives as mech

    # tiny preset: q and v adapters in 2 layers = 4 A and 4 B blocks, clip 0.1, sigma = 40 * 0.1
    z_eff = mech.effective_noise_multiplier(4, 4, 0.1, 0.1, 4.0, 4.0, "replace-one")
    one, two = acc.gaussian_epsilon(z_eff, 1, 1e-5), acc.gaussian_epsilon(z_eff, 2, 1e-5)
    budget = (one + two) / 2  # no client may take part twice
    cfg = _tiny_cfg(tmp_path, "dp.mode=local", "dp.noise=multiplier", "dp.noise_multiplier=40", f"dp.budget={budget}")
    s = run(cfg, tmp_path / "r", progress=False)
    assert s["privacy"]["effective_noise_multiplier"] == pytest.approx(z_eff)
    assert s["stop_reason"].startswith("privacy budget") and 1 <= s["rounds"] <= 2
    assert s["privacy"]["max_participations"] == 1 and s["privacy"]["epsilon"] == pytest.approx(one)


@pytest.mark.parametrize(
    "sets, message",
    [
        (["fl.clients_per_round=50"], "is larger than fl.num_clients"),
        (["fl.rounds=0"], "fl.rounds must be >= 1"),
        (["fl.algorithm=fedsgd"], "choose one of: fedavg, fedprox, scaffold"),
        (["fl.aggregation=median"], "choose one of: mean, stack"),
        (["dp.mode=shuffle"], "choose one of: none, local, central"),
        (["lora.client_ranks=[2,4,8,8,8,8,8,8]"], "mixed client ranks need an aggregation that combines them"),
    ],
)
def test_run_bad_input(sets, message, capsys, tmp_path):
    argv = ["run", "tiny", "--out", str(tmp_path / "o"), "--no-progress"] + [x for s in sets for x in ("--set", s)]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_existing_output_folder_is_not_overwritten(tmp_path, capsys):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("mine")
    assert cli.main(["run", "tiny", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "pass --resume or --overwrite" in capsys.readouterr().err
    assert (tmp_path / "o" / "keep.txt").read_text() == "mine"


def test_run_epsilon_agrees_with_the_privacy_calculator(tmp_path):
    from fedlora_jax.privacy import accounting as acc

    cfg = _tiny_cfg(tmp_path, "fl.rounds=3", "dp.mode=local", "dp.noise=classical", "dp.epsilon=25")
    s = run(cfg, tmp_path / "r", progress=False)
    p = s["privacy"]
    calc = acc.report(
        "local",
        delta=1e-5,
        noise_multiplier=p["noise_multiplier"],
        rounds=3,
        tensors=8,
        participations=p["max_participations"],
    )
    assert p["epsilon"] == pytest.approx(calc["epsilon_pld"], rel=1e-12)
    assert p["epsilon_paper"] == pytest.approx(25.0) and p["epsilon"] > 25.0


@pytest.mark.parametrize(
    "algorithm, aggregation, dp_mode",
    [("fedavg", "mean", "local"), ("scaffold", "mean", "none"), ("fedavg", "stack", "none")],
)
def test_chunked_and_sharded_rounds_equal_the_plain_round(algorithm, aggregation, dp_mode):
    from fedlora_jax.federated.mesh import make_mesh

    dp = LOCAL if dp_mode == "local" else []
    cfg, definition, base, lora, block = _setup(algorithm, aggregation, extra=dp)
    noise = modes.build(cfg, lora)
    ref, ref_m = build_round(definition, cfg, noise, 5)(init_state(cfg, lora, 5), base, *_args(block))
    # chunks of 2 over a cohort of 3: one padded (invalid) slot
    cfg2 = load_config(
        "tiny",
        [
            f"fl.algorithm={algorithm}",
            f"fl.aggregation={aggregation}",
            "fl.num_clients=5",
            f"fl.clients_per_round={K}",
            f"fl.local_steps={STEPS}",
            f"fl.batch_size={B}",
            "fl.clients_per_chunk=2",
            *dp,
        ],
    )
    out, m = build_round(definition, cfg2, noise, 5)(init_state(cfg2, lora, 5), base, *_args(block))
    _same_state(out, ref)
    assert float(m["loss"]) == pytest.approx(float(ref_m["loss"]), rel=1e-6) and int(m["dropped"]) == 0
    # the client axis over a 4-device mesh (chunk of 4 with one padded slot)
    cfg4 = load_config(
        "tiny",
        [
            f"fl.algorithm={algorithm}",
            f"fl.aggregation={aggregation}",
            "fl.num_clients=5",
            f"fl.clients_per_round={K}",
            f"fl.local_steps={STEPS}",
            f"fl.batch_size={B}",
            "fl.clients_per_chunk=4",
            "fl.devices=4",
            *dp,
        ],
    )
    assert len(jax.devices()) >= 4  # tests force 8 CPU devices (conftest)
    out4, _ = build_round(definition, cfg4, noise, 5, mesh=make_mesh(4))(init_state(cfg4, lora, 5), base, *_args(block))
    _same_state(out4, ref)


def _same_state(a, b):
    _close(a.lora, b.lora)
    # SCAFFOLD controls divide the local change by K * lr (here 0.02): float noise grows 50x
    _close(a._replace(lora=None), b._replace(lora=None), atol=1e-3)


@pytest.mark.parametrize("mode", ["local", "dpsgd"])
def test_calibrated_noise_meets_the_target_for_the_most_sampled_client(mode, tmp_path):
    # 8 clients, 2 per round, 6 rounds: some client takes part more often than the expected 1.5
    from fedlora_jax.runs.runner import worst_participations

    sets = [
        f"dp.mode={mode}",
        "dp.noise=calibrate",
        "dp.epsilon=4",
        "dp.clip_a=1.0",
        "fl.rounds=6",
        "fl.num_clients=8",
        "fl.clients_per_round=2",
        "fl.local_steps=1",
        "eval_every=0",
        "checkpoint_every=0",
        "data.synthetic_examples=200",
    ]
    cfg = load_config("tiny", sets)
    assert worst_participations(cfg) > 2
    s = run(cfg, tmp_path / "r", progress=False)
    assert s["privacy"]["max_participations"] == worst_participations(cfg)
    assert s["privacy"]["epsilon"] == pytest.approx(4.0, rel=1e-6 if mode == "local" else 2e-2)


def test_learning_rate_schedule_is_the_papers_cosine_from_optax():
    """cosine_lr (optax's cosine decay) equals lr_min + (lr - lr_min)(1 + cos(pi r / R)) / 2 at
    every round, starts at lr and ends at lr_min."""
    import math

    from fedlora_jax.federated.server import cosine_lr

    lr, lr_min, rounds = 3e-3, 1e-5, 17
    for r in range(rounds + 1):
        want = lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * r / rounds))
        assert cosine_lr(r, rounds, lr, lr_min) == pytest.approx(want, rel=1e-6)
    assert cosine_lr(0, rounds, lr, lr_min) == pytest.approx(lr, rel=1e-7)
    assert cosine_lr(rounds, rounds, lr, lr_min) == pytest.approx(lr_min, rel=1e-6)
    assert cosine_lr(5, rounds, 0.0, 0.0) == 0.0


def test_auto_chunk_takes_the_fewest_equal_chunks_within_the_cpu_token_target():
    from fedlora_jax.federated.plan import CPU_TOKENS_PER_CHUNK, auto_chunk

    for cohort in (1, 2, 3, 7, 64, 100, 257, 10_674):
        for tokens in (1, 24, 64, 256, 2048, 5000):
            for rows in (1, 2, 8):
                assert auto_chunk(cohort, tokens, "gpu", rows) == cohort  # accelerators: the whole cohort
                c = auto_chunk(cohort, tokens, "cpu", rows)
                target = max(1, rows * CPU_TOKENS_PER_CHUNK // tokens)
                n = -(-cohort // c)
                assert 1 <= c <= min(cohort, target)
                assert n == -(-cohort // target)  # no more chunks than the target needs
                assert n * c - cohort < n  # equal chunks: less than one padded slot per chunk


def test_an_unset_chunk_runs_cpu_rounds_in_chunks_that_equal_the_whole_cohort(monkeypatch):
    from fedlora_jax.federated import mesh as plan_mod  # auto_chunk's home (plan re-exports it)

    cfg, definition, base, lora, block = _setup(extra=LOCAL)
    noise = modes.build(cfg, lora)
    whole = _config(extra=[*LOCAL, f"fl.clients_per_chunk={K}"])
    assert cfg.fl.clients_per_chunk is None and jax.default_backend() == "cpu"
    monkeypatch.setattr(plan_mod, "CPU_TOKENS_PER_CHUNK", B * S)  # one client's step: chunks of 1
    state = init_state(cfg, lora, 5)
    auto_fn, whole_fn = build_round(definition, cfg, noise, 5), build_round(definition, whole, noise, 5)
    out, m = auto_fn(state, base, *_args(block))
    ref, ref_m = whole_fn(init_state(whole, lora, 5), base, *_args(block))
    _same_state(out, ref)
    assert float(m["loss"]) == pytest.approx(float(ref_m["loss"]), rel=1e-6)
    # it did chunk: a third of the clients' activations alive at once
    mem = lambda fn, c: fn.lower(init_state(c, lora, 5), base, *_args(block)).compile().memory_analysis()
    assert mem(auto_fn, cfg).temp_size_in_bytes < 0.7 * mem(whole_fn, whole).temp_size_in_bytes


@pytest.mark.parametrize(
    "dp",
    [
        LOCAL,
        ["dp.mode=central", "fl.sampling=poisson", "dp.noise=multiplier", "dp.noise_multiplier=1.0", "dp.scope=global"],
    ],
)
def test_an_unset_chunk_on_a_two_row_mesh_equals_the_whole_cohort_on_one_device(monkeypatch, dp):
    # one client's step per row: chunks of 2 (one per row) over 3 clients, one padded slot
    from fedlora_jax.federated import mesh as plan_mod  # auto_chunk's home (plan re-exports it)
    from fedlora_jax.federated.mesh import make_mesh

    _, definition, base, lora, block = _setup(extra=dp)
    whole, auto = _config(extra=[*dp, f"fl.clients_per_chunk={K}"]), _config(extra=[*dp, "fl.devices=2"])
    noise = modes.build(whole, lora)
    ref, ref_m = build_round(definition, whole, noise, 5)(init_state(whole, lora, 5, noise), base, *_args(block))
    monkeypatch.setattr(plan_mod, "CPU_TOKENS_PER_CHUNK", B * S)
    assert plan_mod.auto_chunk(K, B * S, "cpu", rows=2) == 2
    fn = build_round(definition, auto, noise, 5, mesh=make_mesh(2))
    out, m = fn(init_state(auto, lora, 5, noise), base, *_args(block))
    _same_state(out, ref)
    assert float(m["loss"]) == pytest.approx(float(ref_m["loss"]), rel=1e-6) and int(m["dropped"]) == 0
