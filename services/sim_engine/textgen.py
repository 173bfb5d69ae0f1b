"""Deterministic stand-ins for a model's output: pseudo-words and embeddings from a prompt hash.

Everything here is a pure function of its input, so a test can predict a response exactly and
the same prompt yields the same text whether it is streamed or not.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from hashlib import blake2b
from typing import Any

# 16 syllables, two per word: 256 distinct four-letter words, one per hash byte.
_SYLLABLES: tuple[str, ...] = ("ka", "lo", "mi", "nu", "pe", "ra", "si", "to")
_SYLLABLES += ("vu", "ze", "ba", "di", "fo", "gu", "ha", "jo")
VOCAB: tuple[str, ...] = tuple(a + b + " " for a in _SYLLABLES for b in _SYLLABLES)

# A chat template wraps every message in role markers; vLLM counts those as prompt tokens.
CHAT_MESSAGE_OVERHEAD = 4

_DIGEST = 64


def count_words(text: str) -> int:
    """Prompt tokens of ``text``: its whitespace-separated words."""
    return len(text.split())


def _hash_stream(text: str, size: int) -> bytes:
    """``size`` bytes deterministically derived from ``text`` (a hash chain)."""
    digest = blake2b(text.encode("utf-8", "replace"), digest_size=_DIGEST).digest()
    parts = [digest]
    total = len(digest)
    while total < size:
        digest = blake2b(digest, digest_size=_DIGEST).digest()
        parts.append(digest)
        total += len(digest)
    return b"".join(parts)[:size]


def generate_tokens(prompt: str, count: int) -> tuple[str, ...]:
    """Exactly ``count`` tokens for ``prompt``; each is a short word followed by a space."""
    return tuple(VOCAB[b] for b in _hash_stream(prompt, count))


def generate_text(prompt: str, count: int) -> str:
    return "".join(generate_tokens(prompt, count))


def embed(text: str, dim: int) -> tuple[float, ...]:
    """A unit-length (L2) vector of ``dim`` floats derived from ``text``."""
    raw = struct.unpack(f"<{dim}H", _hash_stream(text, 2 * dim))
    # Centre on zero so vectors point in all directions, not just the positive orthant.
    values = [v / 32767.5 - 1.0 for v in raw]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return tuple(v / norm for v in values)


def message_text(content: Any) -> str | None:
    """The text of a chat message's ``content``; None when its shape is invalid.

    Content is a string, null (an assistant turn with tool calls only) or a list of parts,
    of which only ``{"type": "text", "text": ...}`` parts carry text.
    """
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return None
    texts: list[str] = []
    for part in content:
        if not isinstance(part, Mapping) or not isinstance(part.get("type"), str):
            return None
        if part["type"] == "text":
            text = part.get("text")
            if not isinstance(text, str):
                return None
            texts.append(text)
    return " ".join(texts)


def chat_prompt(messages: Sequence[Any]) -> tuple[str, int] | None:
    """(hash seed, prompt tokens) of a chat conversation; None when a message is invalid."""
    lines: list[str] = []
    tokens = 0
    for message in messages:
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            return None
        text = message_text(message.get("content"))
        if text is None:
            return None
        lines.append(f"{message['role']}: {text}")
        tokens += count_words(text) + CHAT_MESSAGE_OVERHEAD
    return "\n".join(lines), tokens


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _token_ids(ids: list[Any]) -> tuple[str, int] | None:
    if not ids or not all(is_int(i) for i in ids):
        return None
    return " ".join(map(str, ids)), len(ids)


def completion_prompts(prompt: Any) -> list[tuple[str, int]] | None:
    """(hash seed, prompt tokens) per prompt of a completions request; None when invalid.

    Like vLLM: a string, a list of strings (a batch), a list of token ids, or a list of
    token-id lists (a batch).
    """
    if isinstance(prompt, str):
        return [(prompt, count_words(prompt))]
    if not isinstance(prompt, list) or not prompt:
        return None
    if all(isinstance(p, str) for p in prompt):
        return [(p, count_words(p)) for p in prompt]
    if all(is_int(p) for p in prompt):
        single = _token_ids(prompt)
        return None if single is None else [single]
    batch = [_token_ids(p) if isinstance(p, list) else None for p in prompt]
    if any(p is None for p in batch):
        return None
    return [p for p in batch if p is not None]
