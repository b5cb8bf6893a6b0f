"""Models: logits parity with transformers, GGUF loading, LoRA identities, PEFT round trips."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedlora_jax.adapters import lora as L
from fedlora_jax.adapters import peft_io
from fedlora_jax.models import LoRAConfig, ModelConfig, abstract_model, apply, init_model
from fedlora_jax.models.hub import load_model, params_from_hf, read_folder

ARCHS = ["llama_mha", "llama_gqa", "qwen2", "mistral", "gpt2"]
TARGETS = {"gpt2": ("c_attn", "c_proj", "c_fc")}
LLAMA_ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _tokens(b=2, s=12, vocab=400, seed=0):
    toks = np.random.RandomState(seed).randint(0, vocab, (b, s))
    mask = np.ones((b, s), np.int64)
    mask[1, 9:] = 0  # right padding on the second row
    return toks, mask


def _perturbed(tree, seed=1, scale=0.1):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(tiny_hf, arch):
    import torch

    folder, model = tiny_hf(arch)
    lm = load_model(str(folder))
    toks, mask = _tokens()
    with torch.no_grad():
        ref = model(torch.tensor(toks), attention_mask=torch.tensor(mask)).logits.numpy()
    ours = np.asarray(apply(lm.definition, lm.base, lm.lora, jnp.asarray(toks), jnp.asarray(mask)))
    valid = mask.astype(bool)  # logits at padded positions are not defined by either side
    assert np.abs(ours - ref)[valid].max() <= 1e-4


@pytest.mark.parametrize("arch", ["llama_gqa", "gpt2"])
def test_lora_with_zero_b_equals_base_and_merge_equals_unmerged(tiny_hf, arch):
    folder, _ = tiny_hf(arch)
    targets = TARGETS.get(arch, LLAMA_ALL)
    lm = load_model(str(folder), LoRAConfig(r=4, alpha=8, target_modules=targets))
    toks, mask = _tokens()
    plain = load_model(str(folder), tokenizer=False)
    base_logits = apply(plain.definition, plain.base, {}, toks, mask)
    # B = 0 at initialisation (A is random): the adapted model is the base model
    np.testing.assert_allclose(apply(lm.definition, lm.base, lm.lora, toks, mask), base_logits, atol=1e-6)
    lora = _perturbed(lm.lora)
    merged = L.merge(lm.definition, lm.base, lora)
    zero = jax.tree.map(jnp.zeros_like, lora)
    np.testing.assert_allclose(
        apply(lm.definition, merged, zero, toks, mask), apply(lm.definition, lm.base, lora, toks, mask), atol=1e-4
    )


def test_lora_a_init_matches_peft_bound():
    cfg = ModelConfig("llama", vocab_size=50, hidden_size=256, num_layers=2, num_heads=4, intermediate_size=64)
    _, _, lora = init_model(cfg, LoRAConfig(r=16, target_modules=("q_proj",)))
    a = np.asarray(lora["blocks"]["attn"]["q_proj"]["lora_a"])
    bound = 1 / np.sqrt(256)  # kaiming_uniform(a=sqrt(5)) bound = sqrt(6 / (6 * fan_in))
    assert np.abs(a).max() <= bound
    # a uniform on [-b, b] has variance b^2 / 3; 2*16*256 draws give a 5% tolerance easily
    assert abs(a.var() / (bound**2 / 3) - 1) < 0.05
    assert not np.any(lora["blocks"]["attn"]["q_proj"]["lora_b"])


@pytest.mark.parametrize("arch", ["llama_gqa", "gpt2"])
def test_exported_adapter_loads_in_peft_and_peft_adapter_imports(tiny_hf, tmp_path, arch):
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model

    folder, model = tiny_hf(arch)
    targets = TARGETS.get(arch, ("q_proj", "v_proj", "down_proj"))
    lm = load_model(str(folder), LoRAConfig(r=4, alpha=8, target_modules=targets))
    lora = _perturbed(lm.lora)
    toks, mask = _tokens()
    ours = np.asarray(apply(lm.definition, lm.base, lora, toks, mask))
    peft_io.save_peft(tmp_path / "ours", lm.definition, lora, str(folder))
    peft_model = PeftModel.from_pretrained(model, str(tmp_path / "ours")).eval()
    with torch.no_grad():
        ref = peft_model(torch.tensor(toks), attention_mask=torch.tensor(mask)).logits.numpy()
    valid = mask.astype(bool)
    assert np.abs(ours - ref)[valid].max() <= 1e-4
    peft_model.unload()

    # the other direction: an adapter made by PEFT, with non-zero B, read back by us
    _, fresh = tiny_hf(arch)
    pc = PeftLoraConfig(
        r=4, lora_alpha=16, target_modules=list(targets), init_lora_weights=False, fan_in_fan_out=arch == "gpt2"
    )
    pm = get_peft_model(fresh, pc).eval()
    pm.save_pretrained(str(tmp_path / "peft"))
    with torch.no_grad():
        ref = pm(torch.tensor(toks), attention_mask=torch.tensor(mask)).logits.numpy()
    lc = peft_io.read_peft_config(tmp_path / "peft")
    assert (lc.r, lc.alpha) == (4, 16)
    definition = abstract_model(lm.config, lc)[0]
    imported = peft_io.load_peft(tmp_path / "peft", definition)
    ours = np.asarray(apply(definition, lm.base, imported, toks, mask))
    assert np.abs(ours - ref)[valid].max() <= 1e-4
    pm.unload()


def test_saved_merged_model_loads_in_transformers(tiny_hf, tmp_path):
    import torch
    import transformers as tf

    folder, _ = tiny_hf("llama_gqa")
    lm = load_model(str(folder), LoRAConfig(r=4, target_modules=("q_proj", "o_proj")))
    lora = _perturbed(lm.lora)
    from fedlora_jax.models.hub import save_merged

    save_merged(tmp_path / "merged", lm, L.merge(lm.definition, lm.base, lora))
    model = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    toks, mask = _tokens()
    with torch.no_grad():
        ref = model(torch.tensor(toks), attention_mask=torch.tensor(mask)).logits.numpy()
    ours = np.asarray(apply(lm.definition, lm.base, lora, toks, mask))
    assert np.abs(ours - ref)[mask.astype(bool)].max() <= 1e-4


def _tiny(lora_targets=("q_proj", "v_proj"), r=4, layers=2):
    cfg = ModelConfig(
        "llama", vocab_size=64, hidden_size=32, num_layers=layers, num_heads=4, num_kv_heads=2, intermediate_size=64
    )
    return init_model(cfg, LoRAConfig(r=r, target_modules=lora_targets))


def test_vmap_over_adapters_equals_separate_calls_and_does_not_recompile():
    definition, base, lora = _tiny()
    adapters = [_perturbed(lora, seed=s) for s in range(4)]
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *adapters)
    toks, mask = _tokens(vocab=64)
    f = jax.jit(jax.vmap(apply, in_axes=(None, None, 0, None, None)), static_argnums=0)
    out = f(definition, base, stacked, toks, mask)
    for i, ad in enumerate(adapters):
        np.testing.assert_allclose(out[i], apply(definition, base, ad, toks, mask), atol=1e-5)
    f(definition, base, jax.tree.map(lambda x: x + 1, stacked), toks, mask)
    assert f._cache_size() == 1  # the second call with new values compiled nothing


def test_rank_mask_keeps_masked_entries_zero_and_gradient_zero():
    definition, base, lora = _tiny(r=8)
    toks, mask = _tokens(vocab=64)
    lora = L.rank_mask(_perturbed(lora), 3)  # a rank-3 client inside the rank-8 padded shape

    def loss(lo):
        return jnp.mean(apply(definition, base, L.rank_mask(lo, 3), toks, mask) ** 2)

    grads = jax.grad(loss)(lora)
    for _, m in L.modules(grads):
        assert not np.any(m["lora_a"][:, 3:, :]) and not np.any(m["lora_b"][:, :, 3:])
    opt = optax.adamw(1e-2, weight_decay=0.1)
    new = optax.apply_updates(lora, opt.update(grads, opt.init(lora), lora)[0])
    for _, m in L.modules(new):
        assert not np.any(m["lora_a"][:, 3:, :]) and not np.any(m["lora_b"][:, :, 3:])
        assert np.any(m["lora_a"][:, :3, :])


def test_bfloat16_compute_is_close_to_float32():
    definition, base, lora = _tiny()
    toks, mask = _tokens(vocab=64)
    ref = apply(definition, base, lora, toks, mask)
    d16 = abstract_model(definition.config.replace(dtype="bfloat16"), definition.lora)[0]
    out = apply(d16, base, lora, toks, mask)
    # bfloat16 keeps 8 mantissa bits: relative error ~2^-8 per op, a few ops deep
    assert np.abs(np.asarray(out) - np.asarray(ref)).max() <= 0.05 * np.abs(np.asarray(ref)).max()
    assert not np.allclose(out, ref, atol=1e-7)  # it really computed in bfloat16


def test_compile_cost_flat_in_depth():
    # the scanned stack lowers to one loop body: the HLO text hardly grows with depth
    sizes = []
    for layers in (2, 16):
        definition, base, lora = _tiny(layers=layers)
        toks, mask = _tokens(vocab=64)
        sizes.append(len(jax.jit(apply, static_argnums=0).lower(definition, base, lora, toks, mask).as_text()))
    assert sizes[1] < 1.1 * sizes[0]


# ----------------------------------------------------------------------------- bad input


def test_bad_architecture_target_and_rank(tmp_path):
    with pytest.raises(ValueError, match="unknown architecture 'bert'.*supported: llama"):
        ModelConfig("bert", vocab_size=10, hidden_size=8, num_layers=1, num_heads=2)
    cfg = ModelConfig("llama", vocab_size=10, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=8)
    with pytest.raises(ValueError, match="'c_attn' not in a llama model; allowed: q_proj"):
        init_model(cfg, LoRAConfig(r=2, target_modules=("c_attn",)))
    with pytest.raises(ValueError, match="rank 16 is larger than module q_proj allows"):
        init_model(cfg, LoRAConfig(r=16, target_modules=("q_proj",)))
    with pytest.raises(ValueError, match="rank r must be an integer >= 1"):
        LoRAConfig(r=0)


def test_bad_checkpoints(tiny_hf, tmp_path):
    folder, _ = tiny_hf("llama_mha")
    hf, tensors = read_folder(folder)
    from fedlora_jax.models.hub import config_from_hf

    cfg = config_from_hf(hf)
    name = "model.layers.1.self_attn.k_proj.weight"
    bad = dict(tensors, **{name: tensors[name][:-1]})
    with pytest.raises(ValueError, match=r"k_proj.weight' has shape \(63, 64\) but the config needs \(64, 64\)"):
        params_from_hf(cfg, bad)
    with pytest.raises(ValueError, match="missing tensor 'model.norm.weight'"):
        params_from_hf(cfg, {k: v for k, v in tensors.items() if k != "model.norm.weight"})
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text(json.dumps(hf))
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="only pickled .bin weights"):
        load_model(str(tmp_path / "pickled"))
    with pytest.raises(ValueError, match="refusing pickled checkpoint"):
        load_model(str(tmp_path / "pickled" / "pytorch_model.bin"))
    (tmp_path / "broken.gguf").write_bytes(b"GGUF this is not")
    with pytest.raises(ValueError, match="cannot read GGUF file"):
        load_model(str(tmp_path / "broken.gguf"))
    with pytest.raises(ValueError, match="could not download 'nobody/nothing'.*pass a local folder"):
        load_model("nobody/nothing")


def _plain_nll(logits, targets):
    """The loss as autodiff sees it unfused: log_softmax, then the target's entry."""
    return -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]


@pytest.mark.parametrize("spread", [1.0, 30.0])
def test_fused_softmax_nll_equals_log_softmax_in_value_and_gradient(spread):
    from fedlora_jax.models.loss import softmax_nll

    logits = spread * jax.random.normal(jax.random.key(0), (3, 7, 50))
    targets = jax.random.randint(jax.random.key(1), (3, 7), 0, 50)
    weights = jax.random.uniform(jax.random.key(2), (3, 7))  # a non-uniform cotangent
    np.testing.assert_allclose(softmax_nll(logits, targets), _plain_nll(logits, targets), rtol=1e-6, atol=1e-5)
    g = jax.grad(lambda x: jnp.sum(weights * softmax_nll(x, targets)))(logits)
    g_ref = jax.grad(lambda x: jnp.sum(weights * _plain_nll(x, targets)))(logits)
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6)
    # the identity the backward pass is built on: each position's gradient sums to 0 over the vocabulary
    np.testing.assert_allclose(jnp.sum(g, axis=-1), 0.0, atol=1e-6)


def test_token_nll_gradient_in_the_adapter_equals_the_unfused_loss():
    from fedlora_jax.models import mean_nll

    mc = ModelConfig("llama", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)
    definition, base, lora = init_model(mc, LoRAConfig(r=4, alpha=8, target_modules=LLAMA_ALL))
    lora = _perturbed(lora)
    toks, mask = _tokens(vocab=64)
    loss_mask = np.ones_like(mask)
    loss_mask[0, :4] = 0  # a prompt that is not scored

    def unfused(lo):
        logits = apply(definition, base, lo, toks, mask)[:, :-1]
        w = (loss_mask * mask)[:, 1:].astype(jnp.float32)
        return jnp.sum(_plain_nll(logits, jnp.asarray(toks[:, 1:])) * w) / jnp.sum(w)

    v, g = jax.value_and_grad(lambda lo: mean_nll(definition, base, lo, toks, mask, loss_mask))(lora)
    v_ref, g_ref = jax.value_and_grad(unfused)(lora)
    np.testing.assert_allclose(v, v_ref, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
