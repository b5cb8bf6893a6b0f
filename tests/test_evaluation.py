"""Evaluation: multiple choice picks the most likely choice, greedy exact match, the eval CLI."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from fedlora_jax import cli
from fedlora_jax.data.pipeline import byte_tokenizer
from fedlora_jax.evaluation import choice_logprobs, exact_match, multiple_choice
from fedlora_jax.models import LoRAConfig, ModelConfig, init_model


def _forced(token_id, vocab=300):
    """A random tiny model forced to prefer `token_id`: every token embeds with hidden unit 0 at
    +10 (the small random blocks keep it positive through the residual stream, and RMSNorm keeps
    it large), and the head reads unit 0 into `token_id`'s logit only, with weight 50."""
    mc = ModelConfig("llama", vocab_size=vocab, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)
    definition, base, lora = init_model(mc, LoRAConfig(r=2, target_modules=("q_proj",)))
    emb = np.asarray(base["embed"]["embedding"]).copy()
    emb[:, 0] = 10.0
    head = np.zeros((32, vocab), np.float32)
    head[0, token_id] = 50.0
    base = {**base, "embed": {"embedding": jnp.asarray(emb)}, "lm_head": {"kernel": jnp.asarray(head)}}
    return definition, base, lora


def test_multiple_choice_picks_the_highest_likelihood_choice():
    tok = byte_tokenizer()
    a = tok("a", add_special_tokens=False)["input_ids"][0]
    definition, base, lora = _forced(a)
    lp, n = choice_logprobs(definition, base, lora, tok, "Pick one: ", ["a", "b", "ab"])
    # as lm-eval does, the question's trailing space is scored with each choice: " a", " b", " ab"
    assert np.argmax(lp) == 0 and list(n) == [2, 2, 3]
    res = multiple_choice(definition, base, lora, tok, ["Q1 ", "Q2 "], [["b", "a"], ["a", "c"]], [1, 0])
    assert res["accuracy"] == 1.0 and res["picks"] == [1, 0]
    # the choice the model prefers is picked even when the key says otherwise
    assert multiple_choice(definition, base, lora, tok, ["Q "], [["a", "b"]], [1])["accuracy"] == 0.0


def test_exact_match_on_a_model_forced_to_emit_the_answer():
    tok = byte_tokenizer()
    a = tok("a", add_special_tokens=False)["input_ids"][0]
    definition, base, lora = _forced(a)
    out = exact_match(definition, base, lora, tok, ["Say a: ", "Say b: "], ["aaaa", "b"], max_new_tokens=4)
    assert out["predictions"] == ["aaaa", "aaaa"] and out["exact_match"] == 0.5


@pytest.mark.slow
def test_eval_cli_on_a_run_and_on_an_adapter(tmp_path, capsys, tiny_hf):
    from fedlora_jax.config.run_config import load_config
    from fedlora_jax.runs.runner import run

    s = run(
        load_config(
            "tiny",
            [
                "fl.rounds=2",
                "data.synthetic_examples=200",
                "fl.num_clients=4",
                "fl.clients_per_round=2",
                "eval_every=1",
                "eval_limit=8",
                "eval_tasks=[loss,exact_match,multiple_choice]",
            ],
        ),
        tmp_path / "r",
        progress=False,
    )
    assert (
        cli.main(
            [
                "eval",
                str(tmp_path / "r"),
                "--task",
                "loss",
                "--task",
                "exact_match",
                "--task",
                "multiple_choice",
                "--limit",
                "8",
                "--json",
            ]
        )
        == 0
    )
    rows = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [r["task"] for r in rows] == ["loss", "exact_match", "multiple_choice"]
    assert rows[0]["perplexity"] == pytest.approx(np.exp(rows[0]["loss"]))
    # the run's own evaluation of its last round equals the CLI's evaluation of the saved adapter
    assert s["final_scores"]["eval_exact_match"] == rows[1]["exact_match"]
    assert s["final_scores"]["eval_mc_accuracy"] == rows[2]["accuracy"]
    metrics = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= m["eval_mc_accuracy"] <= 1 for m in metrics) and len(metrics) == 2
    # an adapter that does not belong to the model says so in one sentence
    folder, _ = tiny_hf("gpt2")
    assert cli.main(["eval", str(tmp_path / "r" / "adapter"), "--model", str(folder)]) == 2
    assert "does not match model" in capsys.readouterr().err


def test_eval_cli_bad_input(tmp_path, capsys):
    from fedlora_jax.config.run_config import load_config

    with pytest.raises(ValueError, match="eval_tasks entry = 'bleu' is not allowed; choose one of: loss, exact_match"):
        load_config("tiny", ["eval_tasks=[loss,bleu]"])
    from fedlora_jax.runs.runner import run

    with pytest.raises(ValueError, match="eval_tasks has exact_match but the run has no held-out split"):
        run(load_config("tiny", ["eval_tasks=[exact_match]", "data.eval_fraction=0"]), tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()
    from fedlora_jax.evaluation import run_task

    with pytest.raises(ValueError, match="unknown task 'bleu'; allowed: loss, exact_match, multiple_choice"):
        run_task("bleu", None, None, None, None)
    assert cli.main(["eval", str(tmp_path)]) == 2
    assert "neither a run folder" in capsys.readouterr().err
    f = tmp_path / "mc.jsonl"
    f.write_text(json.dumps({"question": "q", "options": ["a"], "answer": 0}) + "\n")
    from fedlora_jax.evaluation import load_multiple_choice

    with pytest.raises(ValueError, match="missing choices; columns found: question, options, answer"):
        load_multiple_choice(str(f))
