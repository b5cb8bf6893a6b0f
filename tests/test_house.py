"""The round is built from parts that are asked, not branched on; one definition of each figure."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedlora_jax import cli
from fedlora_jax.config.run_config import load_config
from fedlora_jax.federated import aggregation
from fedlora_jax.runs.artifacts import load_for_eval
from fedlora_jax.runs.runner import run

SETS = [
    "fl.rounds=1",
    "fl.num_clients=4",
    "fl.clients_per_round=2",
    "fl.local_steps=2",
    "data.synthetic_examples=120",
    "eval_every=1",
    "checkpoint_every=0",
]


def test_an_aggregator_registered_at_test_time_runs_end_to_end(tmp_path, monkeypatch):
    """A new aggregation is one class in the table: config, round and loop ask it. Identity: an
    aggregator that moves halfway to the mean gives, after one FedAvg round (server lr 1), the
    midpoint of the start and the `mean` run's adapter."""

    class HalfWay(aggregation.Mean):
        name = "test_half_way"

        def finalize(self, state, total, weight_sum, any_kept, global_lora):
            mean, extra = super().finalize(state, total, weight_sum, any_kept, global_lora)
            return jax.tree.map(lambda m, g: 0.5 * (m + g), mean, global_lora), extra

    monkeypatch.setitem(aggregation.AGGREGATORS, HalfWay.name, HalfWay())
    run(load_config("tiny", SETS), tmp_path / "mean", progress=False)
    s = run(load_config("tiny", [*SETS, "fl.aggregation=test_half_way"]), tmp_path / "half", progress=False)
    assert s["rounds"] == 1
    from fedlora_jax.models.factory import build_model

    lora0 = build_model(load_config("tiny", SETS))[2]  # the initial adapter
    mean = load_for_eval(str(tmp_path / "mean"))[2]
    half = load_for_eval(str(tmp_path / "half"))[2]
    for h, m, g in zip(jax.tree.leaves(half), jax.tree.leaves(mean), jax.tree.leaves(lora0)):
        np.testing.assert_allclose(h, 0.5 * (np.asarray(m) + np.asarray(g)), atol=1e-6)


def test_in_run_eval_loss_equals_the_eval_command(tmp_path, capsys):
    out = tmp_path / "r"
    s = run(load_config("tiny", SETS), out, progress=False)
    capsys.readouterr()
    assert cli.main(["eval", str(out), "--task", "loss", "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["loss"] == pytest.approx(s["final_eval_loss"], rel=1e-6)


def test_held_out_loss_is_token_weighted():
    """The loss is total NLL / total response tokens, whatever the batching: batch sizes 1, 3 and
    16 over the same examples agree, and equal the per-example reference."""
    from fedlora_jax.data.pipeline import prepare
    from fedlora_jax.evaluation import heldout_loss
    from fedlora_jax.models import mean_nll, token_nll
    from fedlora_jax.models.factory import build_model, build_tokenizer

    cfg = load_config("tiny", SETS)
    definition, base, lora, _, _ = build_model(cfg)
    ev = prepare(cfg, build_tokenizer(cfg)).eval
    n = min(7, len(ev))
    got = [heldout_loss(definition, base, lora, ev, n, b) for b in (1, 3, 16)]
    total = count = 0.0
    for i in range(n):
        nll, w = token_nll(
            definition,
            base,
            lora,
            jnp.asarray(ev.tokens[i : i + 1]),
            jnp.asarray(ev.attention_mask[i : i + 1]),
            jnp.asarray(ev.loss_mask[i : i + 1]),
        )
        total, count = total + float(jnp.sum(nll * w)), count + float(jnp.sum(w))
    assert got == pytest.approx([total / count] * 3, rel=1e-5)
    # a mean of per-example means would differ when lengths differ (the definition that was removed)
    per_example = np.mean(
        [
            float(
                mean_nll(
                    definition,
                    base,
                    lora,
                    jnp.asarray(ev.tokens[i : i + 1]),
                    jnp.asarray(ev.attention_mask[i : i + 1]),
                    jnp.asarray(ev.loss_mask[i : i + 1]),
                )
            )
            for i in range(n)
        ]
    )
    assert len({int(x) for x in ev.loss_mask[:n].sum(1)}) == 1 or per_example != pytest.approx(total / count, rel=1e-7)


def test_an_algorithm_registered_at_test_time_runs_end_to_end(tmp_path, monkeypatch):
    """A new FL algorithm is a server step and a client hook in the registry: config, round and loop
    ask it. The hook here zeroes every local gradient (so, with no weight decay, the adapter cannot
    move: an identity) and keeps a per-client state, the number of rounds each client trained, which
    must equal the run's participation counts after the run."""
    import optax

    from fedlora_jax.federated import algorithms
    from fedlora_jax.federated.simulation import init_state
    from fedlora_jax.models.factory import build_model
    from fedlora_jax.privacy import mechanisms as modes
    from fedlora_jax.runs.checkpoint import Checkpointer

    class Frozen(algorithms.ClientHook):
        def init_state(self, lora, num_clients):
            return {"count": jnp.zeros((num_clients,), jnp.int32)}

        def context(self, hstate, cid):
            return hstate["count"][cid]

        def correct(self, grads, lora, start, ctx):
            return jax.tree.map(jnp.zeros_like, grads)

        def finish(self, ctx, start, local, steps, lr):
            return ctx + 1

        def carry(self, hstate, g):
            return dict(hstate)

        def accumulate(self, hcarry, new, kept, ids):
            cur = hcarry["count"].at[ids].get(mode="fill", fill_value=0)
            return {"count": hcarry["count"].at[ids].set(jnp.where(kept, new, cur), mode="drop")}

        def finalize(self, hstate, hcarry, num_clients):
            return hcarry

    monkeypatch.setitem(
        algorithms._REGISTRY,
        "test_frozen",
        algorithms.Algorithm("test_frozen", lambda fl: optax.sgd(fl.server_lr), lambda fl: Frozen()),
    )
    sets = [*SETS, "fl.rounds=3", "checkpoint_every=1", "fl.weight_decay=0", "fl.algorithm=test_frozen"]
    cfg = load_config("tiny", sets)
    s = run(cfg, tmp_path / "r", progress=False)
    assert s["rounds"] == 3
    lora0 = build_model(cfg)[2]
    for a, b in zip(jax.tree.leaves(load_for_eval(str(tmp_path / "r"))[2]), jax.tree.leaves(lora0)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    template = init_state(cfg, lora0, cfg.fl.num_clients, modes.build(cfg, lora0, [1] * cfg.fl.num_clients))
    ckpt = Checkpointer(tmp_path / "r" / "checkpoints")
    state, meta = ckpt.restore(template)
    ckpt.close()
    assert meta["round"] == 3 and sum(meta["participations"]) == 3 * cfg.fl.clients_per_round
    np.testing.assert_array_equal(np.asarray(state.hook["count"]), meta["participations"])
