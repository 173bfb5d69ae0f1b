"""The per-engine path table and the multipart field reader the router uses."""

from __future__ import annotations

import pytest

from services.worker.proxy import ALLOWED
from shared.engine_api import FORM_PATHS, JSON_PATHS, SERVED_BY, not_served, serves
from shared.errors import BadRequest
from shared.multipart import boundary_of, form_field


def test_every_engine_serves_chat_and_only_vllm_like_ones_audio() -> None:
    for engine in ("vllm", "llamacpp", "sglang", "sim"):
        assert serves(engine, "v1/chat/completions")
    assert serves("vllm", "v1/audio/transcriptions") and serves("sim", "score")
    assert not serves("llamacpp", "v1/responses") and not serves("sglang", "pooling")
    assert not serves("vllm", "v1/unknown")
    assert set(JSON_PATHS) | set(FORM_PATHS) == set(SERVED_BY)
    assert not_served("m", "llamacpp", "v1/score") == \
        "the model 'm' runs on llama.cpp, which does not serve /v1/score"


def test_the_worker_proxies_exactly_the_client_paths() -> None:
    assert {p for p, m in ALLOWED.items() if m == "POST"} == set(SERVED_BY)
    assert "sleep" not in ALLOWED and "collective_rpc" not in ALLOWED


BODY = (b'--b1\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        b"Content-Type: audio/wav\r\n\r\nRIFF\r\n--b1-ish\x00\r\n"
        b'--b1\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper\r\n--b1--\r\n')


def test_form_field_skips_file_parts() -> None:
    assert boundary_of('multipart/form-data; boundary="b1"') == b"b1"
    assert form_field(BODY, b"b1", "model") == "whisper"
    assert form_field(BODY, b"b1", "language") is None


@pytest.mark.parametrize(("content_type", "body"), [
    ("application/json", BODY),
    ("multipart/form-data", BODY),
    ("multipart/form-data; boundary=b1", b"garbage"),
    ("multipart/form-data; boundary=b1", BODY[:60]),
    ("multipart/form-data; boundary=b1", BODY.replace(b"whisper", b"w" * 2000)),
])
def test_bad_forms_are_400(content_type: str, body: bytes) -> None:
    with pytest.raises(BadRequest):
        form_field(body, boundary_of(content_type), "model")
