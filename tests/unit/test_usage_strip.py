"""The usage event the router asks for is taken out of a relayed stream, wherever the
engine's reads split it, and nothing else is changed (shared/usage_strip.py)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from shared.usage_strip import UsageStrip, ask_for_usage


def event(chunk: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


HEAD = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
TOKENS = [event(HEAD | {"choices": [{"index": 0, "delta": {"content": w}}]})
          for w in ("a", ' "usage" ', "c")]  # a token whose text names the field
USAGE = event(HEAD | {"choices": [],
                      "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}})
DONE = b"data: [DONE]\n\n"


def relayed(reads: list[bytes]) -> bytes:
    strip = UsageStrip()
    return b"".join(strip.feed(r) for r in reads) + strip.flush()


def test_the_usage_event_is_taken_out_wherever_the_reads_split_the_stream() -> None:
    stream = b"".join(TOKENS) + USAGE + DONE
    want = b"".join(TOKENS) + DONE
    assert relayed([stream]) == want
    for cut in range(1, len(stream)):
        assert relayed([stream[:cut], stream[cut:]]) == want, cut
    assert relayed([bytes([b]) for b in stream]) == want


def test_vllms_usage_chunk_with_a_field_after_usage_is_taken_out_in_a_read_of_its_own(
        ) -> None:
    # vLLM writes system_fingerprint after usage (and sends [DONE] in a write of its own).
    usage = event(HEAD | {"choices": [], "usage": {"prompt_tokens": 5, "total_tokens": 8,
                                                   "completion_tokens": 3},
                          "system_fingerprint": "fp_vllm"})
    strip = UsageStrip()
    assert [strip.feed(r) for r in (TOKENS[0], usage, DONE)] == [TOKENS[0], b"", DONE]


def test_whole_events_pass_at_once_and_a_partial_one_waits_for_its_end() -> None:
    strip = UsageStrip()
    assert strip.feed(TOKENS[0] + TOKENS[1][:7]) == TOKENS[0]
    assert strip.feed(TOKENS[1][7:]) == TOKENS[1]
    assert strip.feed(b": keepalive\n\n") == b": keepalive\n\n"
    assert strip.feed(b"data: {unterminated") == b""
    assert strip.flush() == b"data: {unterminated"  # an engine's last bytes are not lost


@pytest.mark.parametrize("kept", [
    # A usage field on a chunk with choices (continuous usage, or an engine's own way).
    event(HEAD | {"choices": [{"index": 0, "delta": {}}], "usage": {"total_tokens": 1}}),
    event(HEAD | {"choices": [], "usage": None}),
    b'data: {"choices": [], "usage": {"total_tokens": 1}',  # not an event's end: flushed as is
    b"data: not json with \"usage\"\n\n",
])
def test_other_events_that_mention_usage_are_passed_on(kept: bytes) -> None:
    assert relayed([kept]) == kept


def test_a_stream_whose_events_end_with_crlf_is_passed_on_not_held() -> None:
    # Not an engine this filter knows: it stops filtering rather than hold the stream back.
    crlf = b"data: {}\r\n\r\n"
    strip = UsageStrip()
    assert strip.feed(crlf) == crlf
    assert strip.feed(USAGE) == USAGE


def test_a_huge_event_is_passed_on_as_it_comes_and_filtering_goes_on() -> None:
    huge = event(HEAD | {"choices": [{"index": 0, "logprobs": {"x": "y" * 100_000}}]})
    strip = UsageStrip()
    first, rest = huge[:70_000], huge[70_000:]
    assert strip.feed(first) == first  # not held past 64 KiB
    assert strip.feed(rest + USAGE + DONE) == rest + DONE


def test_usage_is_asked_for_only_on_streams_that_did_not() -> None:
    data: dict[str, Any] = {"model": "m", "stream": True}
    assert ask_for_usage(data, "v1/chat/completions")
    assert data["stream_options"] == {"include_usage": True, "continuous_usage_stats": False}
    data = {"stream": True, "stream_options": {"continuous_usage_stats": True}}
    assert ask_for_usage(data, "v1/completions")
    assert data["stream_options"] == {"include_usage": True, "continuous_usage_stats": False}
    for untouched, path in (
            ({"stream": True, "stream_options": {"include_usage": True}}, "v1/completions"),
            ({"stream": False}, "v1/chat/completions"),
            ({"stream": "yes"}, "v1/chat/completions"),  # the engine's 400, as sent
            ({"stream": True, "stream_options": "x"}, "v1/chat/completions"),
            ({"stream": True}, "v1/responses"),  # its usage is in response.completed
    ):
        before = orjson.dumps(untouched)
        assert not ask_for_usage(untouched, path)
        assert orjson.dumps(untouched) == before
