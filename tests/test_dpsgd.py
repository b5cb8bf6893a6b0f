"""Record-level DP-SGD in the engine: Poisson batches with a static capacity, per-example
clipping, noise, and the accountant's figure for the run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from fedlora_jax.config.run_config import load_config
from fedlora_jax.data.batches import PoissonBatcher, binomial_tail, poisson_capacity, poisson_capacity_bound
from fedlora_jax.data.tokenize import TokenizedData
from fedlora_jax.federated.client import dpsgd_grads
from fedlora_jax.models import LoRAConfig, ModelConfig, init_model, mean_nll
from fedlora_jax.privacy import accounting as acc
from fedlora_jax.runs.runner import run


@pytest.mark.parametrize("n,q,c", [(125, 0.064, 8), (125, 0.064, 30), (40, 0.5, 20), (10, 1.0, 9), (10, 0.3, 10)])
def test_binomial_tail_matches_scipy(n, q, c):
    np.testing.assert_allclose(binomial_tail(n, q, c), stats.binom.sf(c, n, q), rtol=1e-9, atol=1e-300)


def test_capacity_is_the_smallest_meeting_the_tail():
    sizes, b = [125, 90, 300], 8
    cap, p = poisson_capacity(sizes, b, tail=1e-12)
    assert p <= 1e-12
    assert max(stats.binom.sf(cap - 1, n, b / n) for n in sizes) > 1e-12
    assert poisson_capacity([5, 6], 8)[0] == 6  # clients smaller than the batch: everything fits, no overflow
    assert poisson_capacity([5, 6], 8)[1] == 0.0


@pytest.mark.parametrize("b", [1, 4, 8, 16])
def test_capacity_bound_holds_for_every_client_size(b):
    bound = poisson_capacity_bound(b, tail=1e-12)
    assert stats.poisson.sf(bound, b) <= 1e-12 < stats.poisson.sf(bound - 1, b)
    for n in (b + 1, 2 * b, 10 * b, 1000 * b, 10**6):
        assert poisson_capacity([n], b, tail=1e-12)[0] <= bound


def _data(n=200, seq=6):
    rng = np.random.default_rng(0)
    return TokenizedData(
        tokens=rng.integers(0, 50, (n, seq)).astype(np.int32),
        attention_mask=np.ones((n, seq), np.int32),
        loss_mask=np.ones((n, seq), np.int32),
        labels=None,
        truncated=0,
        dropped=0,
        kept_index=np.arange(n),
    )


def test_poisson_batches_take_each_example_at_rate_q():
    data = _data()
    parts = [np.arange(0, 100), np.arange(100, 200)]
    b = PoissonBatcher(data, parts, local_steps=4, batch_size=10, seed=1)
    counts, draws = np.zeros(200), 0
    for p in range(300):  # 300 participations x 4 steps of client 1
        idx, ok = b.poisson_indices(1, p)
        assert idx.shape == (4, b.capacity)
        np.add.at(counts, idx[ok], 1)
        draws += 4
    rate = counts[100:] / draws
    # each example is taken with probability 0.1: the mean over 100 examples of 1200 draws has
    # standard error sqrt(0.1 * 0.9 / 120000) ~ 0.00087; allow 5 standard errors
    assert abs(rate.mean() - 0.1) < 5 * np.sqrt(0.09 / (draws * 100))
    assert counts[:100].sum() == 0  # never another client's examples
    again = b.poisson_indices(1, 7)
    np.testing.assert_array_equal(again[0], b.poisson_indices(1, 7)[0])  # a pure function of (client, participation)
    blk = b.block([1], np.array([0, 3]))
    idx, ok = b.poisson_indices(1, 3)
    np.testing.assert_array_equal(blk["loss_mask"][0].sum(-1) > 0, ok)  # padding slots have loss_mask 0


def _tiny():
    mc = ModelConfig(
        "llama", vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64
    )
    definition, base, lora = init_model(mc, LoRAConfig(r=4, target_modules=("q_proj", "v_proj")), seed=0)
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), lora)  # B != 0
    rng = np.random.default_rng(0)
    batch = {
        "tokens": jnp.asarray(rng.integers(0, 50, (5, 8)), jnp.int32),
        "attention_mask": jnp.ones((5, 8), jnp.int32),
        "loss_mask": jnp.asarray(np.r_[np.ones((4, 8)), np.zeros((1, 8))], jnp.int32),
    }  # the last is padding
    return definition, base, lora, batch


def _per_example_grads(definition, base, lora, batch):
    out = []
    for i in range(4):
        out.append(
            jax.grad(
                lambda x: mean_nll(
                    definition,
                    base,
                    x,
                    batch["tokens"][i : i + 1],
                    batch["attention_mask"][i : i + 1],
                    batch["loss_mask"][i : i + 1],
                )
            )(lora)
        )
    return out


def _norm(t):
    return float(jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(t))))


def test_dpsgd_gradient_without_noise_is_the_clipped_sum_over_the_expected_batch():
    definition, base, lora, batch = _tiny()
    per = _per_example_grads(definition, base, lora, batch)
    _, g = dpsgd_grads(definition, base, lora, batch, 1e6, 0.0, jax.random.key(0), 2.0)
    ref = jax.tree.map(lambda *xs: sum(xs) / 2.0, *per)
    for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(ref)):
        np.testing.assert_allclose(x, y, atol=1e-6)
    clip = 0.3 * min(_norm(p) for p in per)  # every example is clipped to exactly `clip`
    _, g = dpsgd_grads(definition, base, lora, batch, clip, 0.0, jax.random.key(0), 1.0)
    ref = jax.tree.map(lambda *xs: sum(xs), *[jax.tree.map(lambda x: x * clip / _norm(p), p) for p in per])
    for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(ref)):
        np.testing.assert_allclose(x, y, atol=1e-6)


def test_dpsgd_noise_has_the_stated_scale():
    definition, base, lora, batch = _tiny()
    batch = {**batch, "loss_mask": jnp.zeros_like(batch["loss_mask"])}  # all padding: only noise remains
    _, g = dpsgd_grads(definition, base, lora, batch, 1.0, 0.7, jax.random.key(5), 4.0)
    x = np.concatenate([np.ravel(v) for v in jax.tree.leaves(g)])
    # std of n draws of N(0, (0.7/4)^2): relative standard error ~ 1/sqrt(2n); allow 5 of them
    assert abs(x.std() / (0.7 / 4) - 1) < 5 / np.sqrt(2 * x.size)
    assert abs(x.mean()) < 5 * (0.7 / 4) / np.sqrt(x.size)


@pytest.mark.slow
def test_dpsgd_run_reports_the_accountants_epsilon(tmp_path):
    # every client takes part in every round, so the planned participations are the actual ones
    cfg = load_config(
        "tiny",
        [
            "dp.mode=dpsgd",
            "dp.noise=calibrate",
            "dp.epsilon=6",
            "dp.clip_a=1.0",
            "fl.rounds=3",
            "fl.num_clients=4",
            "fl.clients_per_round=4",
            "fl.local_steps=2",
            "eval_every=0",
            "checkpoint_every=0",
        ],
    )
    s = run(cfg, tmp_path / "run", progress=False)
    p = s["privacy"]
    eps, _ = acc.sampled_epsilon(p["noise_multiplier"], p["batch_sampling_rate"], 3 * 2, 1e-5, "add-remove")
    assert p["epsilon"] == pytest.approx(eps, rel=1e-9)
    assert p["epsilon"] == pytest.approx(6.0, rel=2e-2)  # calibrated to the target
    assert p["delta"] >= 1e-5 and p["delta"] - 1e-5 < 1e-9  # the overflow term is reported and tiny
    assert "final_train_loss" not in s  # the clients' un-noised training loss is not published under DP


def test_dpsgd_rejects_noise_rules_it_does_not_define(tmp_path):
    cfg = load_config("tiny", ["dp.mode=dpsgd", "dp.noise=classical"])
    with pytest.raises(ValueError, match="not defined for dp.mode dpsgd"):
        run(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_a_dpsgd_run_at_epsilon_25_publishes_the_delta_it_was_asked_for(tmp_path):
    """Padded batches add (1 + e^eps) x steps x P(overflow) to delta; with the tail fixed at 1e-15 the
    term grows as e^eps (0.07 at eps 25 over 1,000 steps). The tail now follows epsilon: the published
    delta stays within 1% of dp.delta, and the overflow the run reports is the capacity's binomial tail."""
    from fedlora_jax.runs.runner import run

    sets = ["dp.mode=dpsgd", "dp.noise=calibrate", "dp.epsilon=25", "fl.rounds=3", "eval_every=0"]
    s = run(load_config("tiny", sets), out_dir=str(tmp_path / "r"), progress=False)
    p = s["privacy"]
    assert p["delta"] <= 1.01 * 1e-5
    assert p["epsilon"] == pytest.approx(25.0, rel=0.02)
    assert p["overflow_probability"] < 1e-15
