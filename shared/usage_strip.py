"""Taking the usage event the router asked for out of an event stream it relays.

A key's streamed chat or completion is sent to the engine with
``stream_options.include_usage`` even when its client did not ask for it: without the final
usage event the router could neither correct the key's token reservation nor count its
usage. That event is a chunk with no choices (``"choices": []``) that clients which did not
ask for it may not expect (``chunk.choices[0]`` raises on it), so it is taken out here, the
rest of the stream passed on byte for byte.

Only whole events are passed on while the stream is filtered: the bytes after the last
event's end wait for the next read (a client cannot use half an event anyway).
"""

from __future__ import annotations

from typing import Any

import orjson

_END = b"\n\n"
_CRLF_END = b"\r\n\r\n"
# What only a usage event holds, as vLLM, SGLang and the simulated engine write it (compact
# JSON): the cheap test every read passes; a match is then parsed to be sure.
_MARK = b'"choices":[]'
# An event this long without its end yet (long logprobs) is passed on as it comes rather
# than held back; filtering goes on from the next event's end.
_HOLD_MAX = 1 << 16

# Paths whose streams take stream_options.include_usage (vLLM's and OpenAI's).
USAGE_OPTION_PATHS = frozenset(("v1/chat/completions", "v1/completions"))
# Engines that send the usage event only when asked, as a chunk of its own. llama.cpp puts
# the usage (and its timings) on its last chunk unasked: its streams are left alone.
USAGE_OPTION_ENGINES = frozenset(("vllm", "sglang", "sim"))


def ask_for_usage(data: dict[str, Any], path: str) -> bool:
    """Set ``include_usage`` on a streamed request that did not ask for it (``data`` is
    changed); True when it was set, so the answer's usage event is to be taken out."""
    if path not in USAGE_OPTION_PATHS or data.get("stream") is not True:
        return False
    options = data.get("stream_options")
    if options is None:
        options = {}
    elif not isinstance(options, dict):
        return False  # the engine refuses it with its own message
    if options.get("include_usage") is True:
        return False
    # continuous_usage_stats only applies with include_usage: off, as the client had it.
    data["stream_options"] = options | {"include_usage": True, "continuous_usage_stats": False}
    return True


def _is_usage_event(event: bytes) -> bool:
    """An event that only carries the final usage: ``data: {... "choices": [], "usage"}``."""
    body = event.strip()
    if not body.startswith(b"data:"):
        return False
    try:
        chunk = orjson.loads(body[5:])
    except orjson.JSONDecodeError:
        return False
    return isinstance(chunk, dict) and chunk.get("choices") == [] \
        and isinstance(chunk.get("usage"), dict)


def _without_usage(block: bytes) -> bytes:
    """``block`` (whole events) without its usage events."""
    events = block.split(_END)
    kept = [e for e in events if _MARK not in e or not _is_usage_event(e)]
    return block if len(kept) == len(events) else _END.join(kept)


class UsageStrip:
    """One stream's filter: :meth:`feed` each read, :meth:`flush` at its end."""

    __slots__ = ("_off", "_rest")

    def __init__(self) -> None:
        self._rest = b""
        self._off = False

    def feed(self, data: bytes) -> bytes:
        """The whole events ``data`` completes, its usage event taken out."""
        if self._off:
            return data
        if self._rest:
            data, self._rest = self._rest + data, b""
        if data.endswith(_END):  # the usual read: whole events
            # Every read is searched: where the usage event sits in its chunk differs
            # (vLLM now writes system_fingerprint after it), so its end tells nothing.
            return _without_usage(data) if _MARK in data else data
        end = data.rfind(_END)
        if end < 0:
            if _CRLF_END in data:
                self._off = True  # events that end with CRLF: not this filter's to read
                return data
            if len(data) > _HOLD_MAX:
                return data
            self._rest = data
            return b""
        end += len(_END)
        self._rest = data[end:]
        out = data[:end]
        return _without_usage(out) if _MARK in out else out

    def pass_on(self, data: bytes, last: bool) -> bytes:
        """What of ``data`` goes on now; ``last``: the stream ends with it."""
        return self.feed(data) + self.flush() if last else self.feed(data)

    def flush(self) -> bytes:
        """What is left at the stream's end (an unterminated last event, passed on)."""
        rest, self._rest = self._rest, b""
        return _without_usage(rest) if _MARK in rest else rest
