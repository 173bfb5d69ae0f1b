"""Pure parts of the limiter: headers, reservations, usage read from answers, key records."""

from __future__ import annotations

import time

from services.router.limiter import (
    _req_bucket,
    _tok_bucket,
    completion_cap,
    estimate,
    headers_of,
    usage_of_body,
    usage_of_stream,
)
from shared.apikeys import KeyRecord, hash_secret, new_secret
from shared.store import Decision


def test_headers_after_the_first_request_of_a_fresh_key() -> None:
    req = _req_bucket("p:{t:a}:rate:k1:req", 600)  # burst 10, 100 ms apart
    tok = _tok_bucket("p:{t:a}:rate:k1:tok", 60_000)  # 1000 a second outstanding
    tenant = _req_bucket("p:{t:a}:rate:tenant:req", 60)
    h = headers_of([req, tok, tenant], Decision(True, 0, [100_000, 300_000, 1_000_000]))
    assert h == {"x-ratelimit-limit-requests": "600", "x-ratelimit-remaining-requests": "9",
                 "x-ratelimit-reset-requests": "0.100s", "x-ratelimit-limit-tokens": "60000",
                 "x-ratelimit-remaining-tokens": "700", "x-ratelimit-reset-tokens": "0.300s"}


def test_reservation_from_body_and_max_tokens() -> None:
    assert estimate({"max_tokens": 50}, 400, "v1/chat/completions", 1024) == 101 + 50
    assert estimate({}, 400, "v1/completions", 1024) == 101 + 1024
    assert estimate({"max_completion_tokens": 7}, 40, "v1/chat/completions", 9) == 11 + 7
    assert estimate({"max_tokens": 50}, 400, "v1/embeddings", 1024) == 101
    assert estimate({"max_output_tokens": 30}, 40, "v1/responses", 1024) == 11 + 30
    # Absurd caps: bounded (a tenant's buckets are not pushed years ahead), and a JSON true
    # is not the number 1.
    assert estimate({"max_tokens": 10**15}, 40, "v1/completions", 9) == 11 + (1 << 24)
    assert estimate({"max_tokens": True}, 40, "v1/completions", 9) == 11 + 9
    # Every completion asked for is reserved: n, best_of (generated in full), and each
    # prompt of a /v1/completions list (a list of token ids is one prompt).
    assert estimate({"max_tokens": 10, "n": 3}, 40, "v1/chat/completions", 9) == 11 + 30
    assert estimate({"max_tokens": 10, "n": 2, "best_of": 5}, 40, "v1/completions", 9) == 61
    assert estimate({"max_tokens": 10, "prompt": ["a", "b"]}, 40, "v1/completions", 9) == 31
    assert estimate({"max_tokens": 10, "prompt": [1, 2, 3]}, 40, "v1/completions", 9) == 21
    assert estimate({"n": 10**9}, 40, "v1/chat/completions", 1) == 11 + 1024  # bounded
    # What does not generate reserves its prompt only; audio writes text without a cap.
    assert estimate({}, 40, "v1/score", 9) == 11
    assert estimate({}, 40, "v1/audio/transcriptions", 9) == 11 + 9
    # Only the fields the path's engine honours are a cap: another API's name is not (the
    # engine would ignore it and write up to the context), a null one is skipped, 0 is one.
    assert completion_cap({"max_output_tokens": 1}, "v1/chat/completions") is None
    assert completion_cap({"max_tokens": 1}, "v1/responses") is None
    assert completion_cap({"max_completion_tokens": None, "max_tokens": 50},
                          "v1/chat/completions") == 50
    assert completion_cap({"max_tokens": 0}, "v1/completions") == 0
    assert estimate({"max_output_tokens": 1}, 40, "v1/chat/completions", 9) == 11 + 9
    assert estimate({"max_tokens": 0}, 40, "v1/completions", 9) == 11


def test_usage_from_answers() -> None:
    assert usage_of_body(b'{"usage": {"prompt_tokens": 3, "completion_tokens": 4}}') == (3, 4)
    assert usage_of_body(b'{"choices": []}') is None
    stream = (b'data: {"choices":[{"delta":{}}],"usage":null}\n\n'
              b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2,'
              b'"total_tokens":7}}\n\ndata: [DONE]\n\n')
    assert usage_of_stream(stream) == (5, 2)
    assert usage_of_stream(b'data: {"choices":[],"usage":null}\n\ndata: [DONE]\n\n') is None
    assert usage_of_stream(b'ge":{"prompt_tokens":5}}\n\n') is None  # cut: no guess


def test_key_records_round_trip_and_match_globs() -> None:
    secret = new_secret()
    rec = KeyRecord("key_1", "n", "t", hash_secret(secret.encode()), ["llama-*", "qwen"],
                    rpm=5, expires_at=time.time() - 1)
    back = KeyRecord.from_json(rec.to_json())
    assert back == rec and back.expired()
    assert back.allows("llama-8b") and back.allows("qwen") and not back.allows("qwen2")
    assert "secret_hash" not in back.view()
    assert back.principal.tenant == "t" and back.principal.key_id == "key_1"
