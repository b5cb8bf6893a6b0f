"""model.attention: fused (jax.nn.dot_product_attention, XLA's implementation) computes the same
attention as our einsum path: the same outputs within float rounding on CPU, for multi-head and
grouped-query attention, padding and a sliding window, in the forward pass and in the LoRA gradient;
a run config chooses it and refuses an unknown name."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedlora_jax.config.run_config import load_config
from fedlora_jax.core.errors import UserError
from fedlora_jax.models import LoRAConfig, ModelConfig, apply, init_model
from fedlora_jax.models.factory import build_model_config
from fedlora_jax.models.layers import attention, attention_mask


@pytest.mark.parametrize("heads,kv,window", [(4, 4, None), (4, 2, None), (8, 2, 3)])
def test_fused_attention_equals_einsum_attention(heads, kv, window):
    b, s, d = 2, 7, 8
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (b, s, heads, d))
    k = jax.random.normal(ks[1], (b, s, kv, d))
    v = jax.random.normal(ks[2], (b, s, kv, d))
    mask = jnp.array([[1] * s, [1] * (s - 2) + [0] * 2])  # the second row ends in padding
    allowed = attention_mask(mask, window)
    ours = attention(q, k, v, allowed, d**-0.5)
    fused = attention(q, k, v, allowed, d**-0.5, "fused")
    real = np.asarray(mask, bool)  # padded query rows attend to nothing real: compared where they matter
    np.testing.assert_allclose(np.asarray(fused)[real], np.asarray(ours)[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kv", [2])
def test_a_fused_model_gives_the_same_logits_and_lora_gradient(kv):
    mc = ModelConfig(
        "llama", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=kv, intermediate_size=64
    )
    lc = LoRAConfig(r=4, target_modules=("q_proj", "v_proj"))
    d1, base, lora = init_model(mc, lc, seed=0)
    d2, _, _ = init_model(dataclasses.replace(mc, attention="fused"), lc, seed=0)
    lora = jax.tree.map(lambda x: x + 0.1, lora)  # B != 0, so the adapters change the attention
    ids = jax.random.randint(jax.random.key(1), (2, 9), 0, 64)
    mask = jnp.ones((2, 9), jnp.int32).at[1, -3:].set(0)

    def loss(definition, lo):
        logits = apply(definition, base, lo, ids, mask)
        return jnp.sum(jnp.where(mask[..., None] > 0, logits, 0.0) ** 2) / 1e3

    (l1, g1), (l2, g2) = (jax.value_and_grad(loss, argnums=1)(d, lora) for d in (d1, d2))
    np.testing.assert_allclose(float(l2), float(l1), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


def test_the_run_config_chooses_the_attention_implementation():
    assert build_model_config(load_config("tiny", ["model.attention=fused"])).attention == "fused"
    assert build_model_config(load_config("tiny", [])).attention == "einsum"
    with pytest.raises(UserError, match="model.attention"):
        load_config("tiny", ["model.attention=flash"])
