"""Conversations rendered with the tokenizer's own chat template, loss on the assistant turns.

A conversation is a list of {"role", "content"} turns (roles system, user, assistant). It is
rendered by `tokenizer.apply_chat_template` as a whole, so its tokens are those the model sees at
inference, token for token. The loss mask covers every assistant turn: its content and the
end-of-turn token the template emits after it (SmolLM2/ChatML `<|im_end|>`, Llama 3 `<|eot_id|>`,
the EOS of most others), nothing else: no system or user turn, no role header, no newline after
the end-of-turn token.

Assistant turns are located by rendering prefixes of the conversation: the text up to turn i with
the generation prompt (where the assistant's content starts) and the text through turn i. Each
must be a prefix of the whole rendering (a template that rewrites earlier turns once later ones
follow is refused); the turn's tokens start after the longest common token prefix of the first
and end at the last special token (the end-of-turn) inside the turn, or the turn's end if the
template emits none.

A tokenizer without a chat template uses FALLBACK_CHAT_TEMPLATE, ChatML spelt with the tokenizer's
own EOS token:

    <|im_start|>system\\n{system}{eos}\\n        (left out when there is no system text)
    <|im_start|>user\\n{user}{eos}\\n
    <|im_start|>assistant\\n{assistant}{eos}\\n

The byte tokenizer of the random `tiny` model uses it too (its EOS is `<|im_end|>`, so this is
plain ChatML). `<|im_start|>` is ordinary text for a tokenizer that lacks the token.

System prompt (`data.system_prompt`): None leaves a conversation as the data gives it, so a
template's own default applies (SmolLM2 adds "You are a helpful AI assistant named SmolLM..."
when the first turn is not a system turn); a string is the system turn of every conversation
that has none of its own; "" asks for no system prompt: an empty system turn, which stops such
defaults (the fallback template renders nothing for it, ChatML templates an empty system block).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..core.errors import UserError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from transformers import PreTrainedTokenizerBase

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant"}

FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] != 'system' or m['content'] %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chat_template(tokenizer: PreTrainedTokenizerBase) -> str:
    """The tokenizer's own chat template, else FALLBACK_CHAT_TEMPLATE."""
    return getattr(tokenizer, "chat_template", None) or FALLBACK_CHAT_TEMPLATE


def with_system(messages: list, system_prompt: str | None) -> list:
    """The conversation with `system_prompt` as its system turn when it has none (see module doc)."""
    if system_prompt is None or (messages and messages[0]["role"] == "system"):
        return list(messages)
    return [{"role": "system", "content": system_prompt}, *messages]


_JSON_TYPES = {
    "dict": "object",
    "list": "array",
    "str": "string",
    "int": "number",
    "float": "number",
    "bool": "boolean",
    "NoneType": "null",
}


def json_type(v: object) -> str:
    return _JSON_TYPES.get(type(v).__name__, type(v).__name__)


_json_type = json_type


def normalize_conversation(value: object, where: str) -> list[dict]:
    """A conversation as [{"role", "content"}] from {role, content} or ShareGPT {from, value} turns
    (from: system/human/gpt); a UserError naming `where`, the turn and the value when it is not one."""
    if not isinstance(value, (list, tuple)):
        got = "nothing" if value is None else f"{value!r} (a {_json_type(value)})"
        raise UserError(
            f"{where} holds {got}; a conversation must be a list of {{role, content}} turns "
            "(or ShareGPT {from, value} turns)"
        )
    if not value:
        raise UserError(f"{where} holds an empty conversation; give at least a user and an assistant turn")
    out = []
    for j, turn in enumerate(value, 1):
        at = f"{where} turn {j}"
        if not isinstance(turn, dict):
            raise UserError(f"{at} is {turn!r} (a {_json_type(turn)}); a turn must be an object with role and content")
        share = turn.get("role") is None and turn.get("from") is not None  # (a hub dataset may hold both keys)
        rk, ck = ("from", "value") if share else ("role", "content")
        if turn.get(rk) is None or ck not in turn:
            raise UserError(
                f"{at} has the keys {', '.join(map(repr, turn)) or 'none'}; a turn needs role and content "
                "(or ShareGPT's from and value)"
            )
        role, content = turn[rk], turn[ck]
        allowed = SHAREGPT_ROLES if share else {r: r for r in ROLES}
        if not isinstance(role, str) or role not in allowed:
            raise UserError(
                f"{at} has the {rk} {role!r}; allowed: "
                + ("system, human or gpt (ShareGPT; user and assistant also)" if share else "system, user or assistant")
            )
        if not isinstance(content, str):
            got = "nothing" if content is None else f"{content!r} (a {_json_type(content)})"
            raise UserError(f"{at} ({allowed[role]}) holds {got} as its {ck}; a turn's {ck} must be text")
        out.append({"role": allowed[role], "content": content})
    if not any(t["role"] == "assistant" for t in out):
        raise UserError(
            f"{where} has no assistant turn, so nothing to train on; roles found: "
            + ", ".join(dict.fromkeys(t["role"] for t in out))
        )
    return out


def _special_ids(tokenizer) -> set:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special)
    return ids


def _render(tokenizer, template, messages, generation_prompt: bool, where: str) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as e:  # a template's raise_exception (roles must alternate, ...) or a jinja error
        why = " ".join(str(e).split()) or type(e).__name__
        raise UserError(f"{where}: the tokenizer's chat template refused the conversation ({why})") from None


def _common(a: list, b: list) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def encode_conversations(
    conversations: Sequence[list[dict]],
    tokenizer: PreTrainedTokenizerBase,
    system_prompt: str | None = None,
    names: Sequence[str] | None = None,
) -> list[tuple[list[int], list[int]]]:
    """[(token ids, loss mask)] of normalized conversations (see the module doc); the ids equal
    `apply_chat_template(conversation, tokenize=True)`. `names[k]` names conversation k in errors."""
    template = chat_template(tokenizer)
    special = _special_ids(tokenizer)
    texts, plans = [], []
    for k, conv in enumerate(conversations):
        at = names[k] if names is not None else f"conversation {k + 1}"
        msgs = with_system(conv, system_prompt)
        full = _render(tokenizer, template, msgs, False, at)
        turns = []
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            before = _render(tokenizer, template, msgs[:i], True, at)
            through = _render(tokenizer, template, msgs[: i + 1], False, at)
            if not full.startswith(through):
                raise UserError(
                    f"{at}: the chat template renders turn {i + 1} differently once later turns follow, so "
                    "its assistant tokens cannot be located; split the conversation into one per assistant turn"
                )
            turns.append((len(texts), len(texts) + 1))
            texts.extend([before[: _common(before, through)], through])  # (a template without a generation prompt)
        plans.append((len(texts), turns))
        texts.append(full)
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    out = []
    for full_at, turns in plans:
        full = list(ids[full_at])
        mask = [0] * len(full)
        for before_at, through_at in turns:
            start = _common(ids[before_at], full)
            end = _common(ids[through_at], full)
            # up to and including the turn's end-of-turn token; not the newline a template puts after it
            last = next((j for j in range(end - 1, start - 1, -1) if full[j] in special), None)
            end = end if last is None else last + 1
            mask[start:end] = [1] * (end - start)
        out.append((full, mask))
    return out


def encode_conversation(
    messages: Sequence[dict], tokenizer: PreTrainedTokenizerBase, system_prompt: str | None = None
) -> tuple[list[int], list[int]]:
    """(token ids, loss mask) of one conversation ([{"role", "content"}] or ShareGPT turns)."""
    conv = normalize_conversation(messages, "the conversation")
    return encode_conversations([conv], tokenizer, system_prompt, ["the conversation"])[0]
