"""Data: response-only masks, partitions, static round blocks, loading and bad input."""

import json

import numpy as np
import pytest

from fedlora_jax import cli
from fedlora_jax.core.errors import UserError
from fedlora_jax.data import RoundBatcher, load_examples, partition, synthetic, tokenize_examples
from fedlora_jax.data.tokenize import render_prompt


def _ds(rows):
    import datasets

    return datasets.Dataset.from_list(rows)


@pytest.mark.parametrize("template", ["alpaca", "chat", "plain"])
def test_loss_mask_covers_exactly_the_response_and_eos(tiny_tokenizer, template):
    rows = [
        {"instruction": "What is 2+2?", "input": "", "output": "4"},
        {"instruction": "Reverse", "input": "abc", "output": "cba please"},
    ]
    data = tokenize_examples(_ds(rows), tiny_tokenizer, template, seq_len=128)
    for k, row in enumerate(rows):
        prompt = render_prompt(template, row["instruction"], row["input"], tiny_tokenizer)
        p = tiny_tokenizer(prompt, add_special_tokens=template != "chat")["input_ids"]
        r = tiny_tokenizer(row["output"], add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
        n = len(p) + len(r)
        assert list(data.tokens[k, :n]) == p + r
        assert list(np.nonzero(data.loss_mask[k])[0]) == list(range(len(p), n))
        # chat: the template's newline after the end-of-turn token follows, outside the loss
        assert data.attention_mask[k].sum() == n + (template == "chat")
        assert tiny_tokenizer.decode(data.tokens[k][data.loss_mask[k] == 1]).startswith(row["output"])


def test_truncation_and_drops_are_counted(tiny_tokenizer):
    rows = [
        {"instruction": "x " * 200, "input": "", "output": "y"},  # prompt alone too long: dropped
        {"instruction": "hi", "input": "", "output": "z " * 100},  # response truncated
        {"instruction": "hi", "input": "", "output": "ok"},
    ]
    data = tokenize_examples(_ds(rows), tiny_tokenizer, "plain", seq_len=32)
    assert (data.dropped, data.truncated, len(data)) == (1, 1, 2)
    assert list(data.kept_index) == [1, 2] and data.attention_mask[0].sum() == 32


@pytest.mark.parametrize("method", ["iid", "dirichlet", "dirichlet_balanced", "by_column"])
def test_every_example_lands_in_exactly_one_client(method):
    labels = np.repeat(np.arange(6), [50, 30, 20, 80, 5, 15])
    parts = partition(len(labels), 7, method, labels, alpha=0.5, seed=3)
    allidx = np.concatenate(parts)
    assert len(parts) == 7 and all(len(p) for p in parts)
    assert sorted(allidx.tolist()) == list(range(len(labels)))
    again = partition(len(labels), 7, method, labels, alpha=0.5, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_dirichlet_limits():
    n_per, labels_n, k = 2000, 4, 5
    labels = np.repeat(np.arange(labels_n), n_per)
    # alpha -> inf: each client's label share -> the global 1/4; multinomial sd of a share in a
    # client of ~1,600 is sqrt(p(1-p)/1600) ~ 0.011, plus a Dirichlet(1e4) sd ~ 0.002: allow 5 sd
    parts = partition(len(labels), k, "dirichlet", labels, alpha=1e4, seed=0)
    for p in parts:
        share = np.bincount(labels[p], minlength=labels_n) / len(p)
        assert np.abs(share - 0.25).max() < 5 * (np.sqrt(0.25 * 0.75 / len(p)) + 0.002)
    # alpha -> 0: Dirichlet draws become one-hot, so each label goes (almost) entirely to one client
    labels = np.repeat(np.arange(10), 200)
    parts = partition(len(labels), k, "dirichlet", labels, alpha=1e-3, seed=0)
    owner_share = np.array([[np.sum(labels[p] == v) for p in parts] for v in range(10)]) / 200
    # (the sampler redraws until no client is empty, which can keep a split label: allow a few)
    assert np.median(owner_share.max(axis=1)) > 0.99 and np.mean(owner_share.max(axis=1)) > 0.9


def test_dirichlet_balanced_splits_few_examples_over_many_clients():
    """1,000 clients of 2 examples each (the population study's size) with a label-skewed mix:
    the label-wise dirichlet leaves clients empty there; the balanced one gives every client
    its iid share of examples and draws only its label mix from Dirichlet(alpha)."""
    labels = np.repeat(np.arange(4), [800, 600, 400, 200])
    n, k = len(labels), 1000
    with pytest.raises(UserError, match="dirichlet_balanced"):
        partition(n, k, "dirichlet", labels, alpha=0.5, seed=0)
    parts = partition(n, k, "dirichlet_balanced", labels, alpha=0.5, seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(n))
    assert [len(p) for p in parts] == [len(p) for p in np.array_split(np.arange(n), k)]
    # label skew: a client of 2 examples under an iid split holds two labels with probability
    # 1 - sum p_v^2 = 0.70; under q ~ Dirichlet(a) with a = 0.5 x 4 x prior = (.8, .6, .4, .2),
    # E[sum q_v^2] = sum a_v (a_v + 1) / (A (A + 1)) = 3.2 / 6, so 0.47 of the clients hold two
    # (sd 0.016 over 1,000 clients; the last clients draw from what is left, which mixes a little)
    mixed = np.mean([len(set(labels[p])) > 1 for p in parts])
    assert 0.35 < mixed < 0.6


def test_dirichlet_balanced_limits():
    labels = np.repeat(np.arange(4), 2000)
    k = 5
    # alpha -> inf: every client's label share -> the prior 1/4, within 5 multinomial sd (the
    # last clients draw from what is left, which the first ones left in proportion)
    parts = partition(len(labels), k, "dirichlet_balanced", labels, alpha=1e4, seed=0)
    for p in parts:
        share = np.bincount(labels[p], minlength=4) / len(p)
        assert np.abs(share - 0.25).max() < 5 * (np.sqrt(0.25 * 0.75 / len(p)) + 0.002)
    # alpha -> 0: one-hot mixes; 8 clients of 1,000 over 4 labels of 2,000: every client holds a
    # single label, except where a label runs out under it (at most one split per label)
    parts = partition(len(labels), 8, "dirichlet_balanced", labels, alpha=1e-3, seed=0)
    held = [len(set(labels[p])) for p in parts]
    assert sum(h == 1 for h in held) >= 4 and sum(h - 1 for h in held) <= 4


def test_by_column_merges_and_splits():
    labels = np.array(["a"] * 10 + ["b"] * 3 + ["c"] * 4)
    parts = partition(len(labels), 3, "by_column", labels)
    assert sorted(len(p) for p in parts) == [3, 4, 10] and all(len(set(labels[p])) == 1 for p in parts)
    parts = partition(len(labels), 2, "by_column", labels)
    assert sorted(len(p) for p in parts) == [7, 10]
    parts = partition(len(labels), 4, "by_column", labels)
    assert sorted(len(p) for p in parts) == [3, 4, 5, 5]


def test_round_blocks_static_deterministic_and_wrapping(tiny_tokenizer):
    rows = synthetic.generate(40, seed=1)
    data = tokenize_examples(_ds(rows), tiny_tokenizer, "plain", seq_len=24)
    parts = [np.arange(0, 3), np.arange(3, 40)]  # client 0 has 3 examples: must wrap around
    b = RoundBatcher(data, parts, local_steps=2, batch_size=4, seed=0)
    blk1 = b.block([0, 1], participations=np.array([0, 0]))
    blk2 = b.block([1, 0], participations=np.array([1, 1]))
    assert blk1["tokens"].shape == blk2["tokens"].shape == (2, 2, 4, 24)
    assert list(blk1["num_examples"]) == [3, 37]
    idx0 = b.indices(0, 0)
    assert sorted(idx0[:3].tolist()) == [0, 1, 2] and sorted(idx0[3:6].tolist()) == [0, 1, 2]  # each epoch once
    again = RoundBatcher(data, parts, 2, 4, seed=0).block([0, 1], np.array([0, 0]))
    assert all(np.array_equal(blk1[k], again[k]) for k in blk1)
    # in order: the second round continues where the first stopped
    np.testing.assert_array_equal(b.indices(1, 8), np.concatenate([b.indices(1, 0), b.indices(1, 8)])[8:])
    assert set(b.indices(1, 0)).isdisjoint(set(b.indices(1, 8)))


def test_local_json_round_trips_through_datasets(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"a{i}", "user": "u" + str(i % 3)} for i in range(9)]
    f = tmp_path / "qa.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    ds = load_examples(str(f), columns={"instruction": "question", "output": "answer"}, label_column="user")
    assert ds["instruction"] == [r["question"] for r in rows] and ds["output"] == [r["answer"] for r in rows]
    assert ds["input"] == [""] * 9 and ds["label"] == [r["user"] for r in rows]


def test_chatterbot_has_topics():
    ds = load_examples("chatterbot", label_column="topic")
    assert len(ds) > 1500 and len(set(ds["label"])) == 21


def test_synthetic_answers_are_correct():
    for ex in synthetic.generate(40, seed=0):
        if ex["task"] == "arithmetic":
            a, b = map(int, ex["input"].split(" + "))
            assert int(ex["output"]) == a + b
        elif ex["task"] == "reverse":
            assert ex["output"] == ex["input"][::-1]
        elif ex["task"] == "sort":
            assert ex["output"].split() == sorted(ex["input"].split())
        else:
            assert ex["output"] == ex["input"]


def test_data_cli_json(capsys):
    assert cli.main(["data", "tiny", "--set", "data.partition=by_column", "--set", "fl.num_clients=4", "--json"]) == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(s["clients"]) == 4 and s["label_column"] == "task"
    assert sum(c["examples"] for c in s["clients"]) == s["train_examples"]
    assert all(len(c["labels"]) == 1 for c in s["clients"])  # one task per client


@pytest.mark.parametrize(
    "sets, message",
    [
        (["data.source=nobody/nothing"], "could not load dataset 'nobody/nothing'"),
        (["data.template=fancy"], "data.template = 'fancy' is not allowed; choose one of: alpaca, chat, plain"),
        (["data.partition=random"], "choose one of: iid, dirichlet, dirichlet_balanced, by_column"),
        (["data.seq_len=5"], "seq_len 5 is too short for every prompt"),
        (["fl.num_clients=5000", "fl.clients_per_round=2"], "5000 clients but only"),
        (["data.columns={instruction: question}"], "has no column 'question' (for instruction); columns found:"),
        (["data.bogus=1"], "unknown config key 'data.bogus'"),
    ],
)
def test_data_cli_bad_input(sets, message, capsys):
    argv = ["data", "tiny"] + [x for s in sets for x in ("--set", s)]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_empty_dataset(tmp_path):
    f = tmp_path / "e.csv"
    f.write_text("instruction,output\n")
    with pytest.raises(ValueError):
        load_examples(str(f))


def test_label_wise_dirichlet_advises_raising_alpha_only_where_that_can_help():
    """With fewer examples per label than clients, even shares (alpha -> infinity) leave clients empty:
    'raise alpha' was advised at alpha 1e6 anyway. It is advised only where even shares fill every client."""
    from fedlora_jax.data.partition import partition

    labels = np.repeat(np.arange(4), 225)  # 900 examples, 225 per label
    with pytest.raises(UserError) as e:
        partition(900, 800, "dirichlet", labels=labels, alpha=1e6)
    assert "raise alpha" not in str(e.value) and "lower num_clients" in str(e.value)
    labels = np.repeat(np.arange(2), 50)  # 50 per label over 40 clients: even shares fill them all
    with pytest.raises(UserError, match="raise alpha"):
        partition(100, 40, "dirichlet", labels=labels, alpha=1e-3)
