"""The prompt prefix of a request, for prefix-aware balancing (:mod:`services.router.balancer`).

Requests whose prompts start alike (a shared system prompt, a conversation's opening turns)
are sent to one replica so that its engine's prefix cache serves them. The key is the first
``size`` characters of the prompt's text, read from the already-parsed body with a budget:
the walk stops once it has them, so its cost does not grow with the conversation. A prompt
shorter than ``size`` has no shared long prefix worth a replica: it gets no key.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


def prefix_key(data: dict[str, Any], path: str, size: int) -> str | None:
    parts: list[str] = []
    budget = size
    for text in _texts(data, path):
        parts.append(text[:budget])
        budget -= len(parts[-1])
        if budget <= 0:
            return "".join(parts)
    return None


def _texts(data: dict[str, Any], path: str) -> Iterator[str]:
    """The prompt's text pieces in order (a generator: it stops where the caller does)."""
    if path == "v1/chat/completions":
        yield from _messages(data.get("messages"))
    elif path == "v1/completions":
        prompt = data.get("prompt")
        if isinstance(prompt, str):
            yield prompt
    else:  # v1/responses
        instructions = data.get("instructions")
        if isinstance(instructions, str):
            yield instructions
        given = data.get("input")
        if isinstance(given, str):
            yield given
        else:
            yield from _messages(given)


def _messages(messages: Any) -> Iterator[str]:
    if not isinstance(messages, list):
        return
    for m in messages:
        if not isinstance(m, dict):
            return
        role = m.get("role")
        yield f"\x00{role}\x00" if isinstance(role, str) else "\x00"
        content = m.get("content")
        if isinstance(content, str):
            yield content
        elif isinstance(content, list):
            for part in content:
                text = part.get("text") if isinstance(part, dict) else None
                if isinstance(text, str):
                    yield text
