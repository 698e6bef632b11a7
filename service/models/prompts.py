"""encode_prompt: text or chat messages -> token ids with exactly one leading BOS.

Chat messages use the tokenizer's chat template when it has one (``add_generation_prompt=True``).
Without one (e.g. the base Gemma 3 270M, whose GGUF carries no template) they are rendered in a plain
fallback format, one line per message and an open assistant turn at the end::

    System: You are terse.
    User: Name a colour.
    Assistant:

(``FALLBACK_ROLE_PREFIX`` gives the role labels.) Raw string prompts are used as they are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from steering.errors import invalid

CHAT_ROLES: tuple[str, ...] = ("system", "user", "assistant")
FALLBACK_ROLE_PREFIX: dict[str, str] = {"system": "System", "user": "User", "assistant": "Assistant"}


def _validate_messages(prompt: Sequence[Any]) -> list[dict[str, str]]:
    if len(prompt) == 0:
        raise invalid("prompt", "message list must not be empty")
    messages: list[dict[str, str]] = []
    for i, message in enumerate(prompt):
        if not isinstance(message, Mapping):
            raise invalid(
                f"prompt[{i}]", f"must be a dict with 'role' and 'content', got {type(message).__name__}"
            )
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise invalid(f"prompt[{i}].role", f"must be one of {list(CHAT_ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise invalid(f"prompt[{i}].content", f"must be a string, got {type(content).__name__}")
        messages.append({"role": role, "content": content})
    if not any(m["content"].strip() for m in messages):
        raise invalid("prompt", "all message contents are empty")
    return messages


def format_fallback_chat(messages: Sequence[Mapping[str, str]]) -> str:
    """The plain chat format used when the tokenizer has no template (see module docstring)."""
    lines = [f"{FALLBACK_ROLE_PREFIX[m['role']]}: {m['content']}" for m in messages]
    lines.append(f"{FALLBACK_ROLE_PREFIX['assistant']}:")
    return "\n".join(lines)


def encode_prompt(
    tokenizer: Any, prompt: str | list[dict], *, chat_template: bool | None = None
) -> list[int]:
    """Token ids for ``prompt``, starting with exactly one BOS when ``tokenizer.bos_token_id`` is set.

    ``prompt`` is raw text or a list of ``{"role": system|user|assistant, "content": str}`` messages.
    ``chat_template``: None (default) -- messages use the tokenizer's template if it has one, else the
    fallback format; text is used as is. True -- always chat-format: text becomes a single user message
    (template if present, else fallback). False -- never use the tokenizer's template: messages use the
    fallback format, text is used as is.
    """
    if chat_template is not None and not isinstance(chat_template, bool):
        raise invalid("chat_template", f"must be True, False or None, got {chat_template!r}")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise invalid("prompt", "must not be empty")
        if chat_template:
            prompt = [{"role": "user", "content": prompt}]
    elif not isinstance(prompt, Sequence):
        raise invalid("prompt", f"must be a string or a list of messages, got {type(prompt).__name__}")
    if isinstance(prompt, str):
        text = prompt
    else:
        messages = _validate_messages(prompt)
        if chat_template is not False and getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:
            text = format_fallback_chat(messages)
    ids = list(tokenizer(text, add_special_tokens=False).input_ids)
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return ids
    start = 0
    while start < len(ids) and ids[start] == bos:
        start += 1
    return [bos, *ids[start:]]
