"""The prompt prefix of a request, for prefix-aware balancing (:mod:`services.router.balancer`).

Requests whose prompts start alike (a shared system prompt, a conversation's opening turns)
are sent to one replica so that its engine's prefix cache serves them. The key is the first
``size`` characters of the prompt's text, read from the already-parsed body with a budget:
the walk stops once it has them, so its cost does not grow with the conversation. A prompt
shorter than ``size`` has no shared long prefix worth a replica: it gets no key.
"""

from __future__ import annotations

from typing import Any


def prefix_key(data: dict[str, Any], path: str, size: int) -> str | None:
    """The first ``size`` characters of the prompt of a chat, completions or responses body
    (roles marked), or None when the prompt is shorter or not text."""
    parts: list[str] = []
    if path == "v1/chat/completions":
        left = _messages(data.get("messages"), parts, size)
    elif path == "v1/completions":
        left = _add(data.get("prompt"), parts, size)
    else:  # v1/responses
        left = _add(data.get("instructions"), parts, size)
        given = data.get("input")
        left = _add(given, parts, left) if isinstance(given, str) else \
            _messages(given, parts, left)
    return "".join(parts) if left <= 0 else None


def _add(text: Any, parts: list[str], left: int) -> int:
    """Append what of ``text`` fits in ``left`` characters; the characters still wanted."""
    if left > 0 and isinstance(text, str):
        parts.append(text[:left])
        return left - len(text)
    return left


def _messages(messages: Any, parts: list[str], left: int) -> int:
    # A plain loop, not a generator: this runs on the fast lane for every chat request.
    if not isinstance(messages, list):
        return left
    for m in messages:
        if left <= 0 or not isinstance(m, dict):
            break
        left = _add(f"\x00{m.get('role')}\x00", parts, left)
        content = m.get("content")
        if isinstance(content, str):
            left = _add(content, parts, left)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict):
                    left = _add(part.get("text"), parts, left)
    return left
