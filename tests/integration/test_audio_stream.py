"""Audio uploads relayed as they arrive (router -> worker -> engine), not read whole: the
engine sees an upload's first bytes before the client sent its last; MAX_AUDIO_BYTES, not
MAX_BODY_BYTES, bounds them, while they stream. Real router, manager, worker and Redis, the
simulated engine (which counts the upload bytes it received, in /sim/stats)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import openai
import pytest

from tests.integration.test_vllm_api import form, instances, wav
from tests.support import (
    Cluster,
    Proc,
    engine_call,
    engines,
    register,
    sim_stats,
    wait_serving,
    wait_until,
)

BODY_LIMIT = 64 * 1024
AUDIO_LIMIT = 2 * 1024 * 1024
BOUNDARY = "b0undary"


@pytest.fixture
def pool(cluster: Cluster) -> Proc:
    cluster.manager()
    cluster.worker("w1", MAX_BODY_BYTES=str(BODY_LIMIT), MAX_AUDIO_BYTES=str(AUDIO_LIMIT))
    router = cluster.router(MAX_BODY_BYTES=str(BODY_LIMIT), MAX_AUDIO_BYTES=str(AUDIO_LIMIT))
    assert register(router, "asr", engine="sim").status_code == 201
    assert register(router, "cold", engine="sim", min_replicas=0).status_code == 201
    wait_serving(router, "asr")
    return router


def client(router: Proc) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0,
                         timeout=30)


def test_openai_client_uploads_past_the_body_limit_within_the_audio_limit(pool: Proc) -> None:
    audio = wav(40.0)  # 1.28 MB: twenty times MAX_BODY_BYTES
    assert BODY_LIMIT < len(audio) < AUDIO_LIMIT
    t = client(pool).audio.transcriptions.create(model="asr", file=("a.wav", audio, "audio/wav"))
    assert "40.00 seconds" in t.text and "16000 Hz" in t.text
    received = (t.model_extra or {})["bytes_received"]
    assert len(audio) < received < len(audio) + 1024  # the whole file, plus the form around it
    # A small one still works, and so does the order curl users write (file, then model).
    small = form({"file": wav(0.5), "model": b"asr"}, BOUNDARY)
    r = httpx.post(f"{pool.url}/v1/audio/transcriptions", content=small, timeout=30,
                   headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"})
    assert r.status_code == 200, r.text
    assert "0.50 seconds" in r.json()["text"] and r.json()["bytes_received"] == len(small)


def _chunked(body: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(body), size):
        yield body[i:i + size]


def test_over_the_audio_limit_is_a_413_declared_or_while_streaming(pool: Proc) -> None:
    headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
    big = form({"model": b"cold", "file": b"\0" * AUDIO_LIMIT}, BOUNDARY)
    r = httpx.post(f"{pool.url}/v1/audio/transcriptions", content=big, headers=headers,
                   timeout=30)
    assert r.status_code == 413, r.text
    assert r.json()["error"]["message"] == f"request body is larger than {AUDIO_LIMIT} bytes"
    assert instances(pool, "cold") == []  # refused before anything started
    # No declared length (chunked): counted as it arrives, the upload to the engine aborted.
    port = next(iter(engines(pool, "asr").values()))
    before = sim_stats(port)["uploads"]
    over = form({"model": b"asr", "file": b"\0" * AUDIO_LIMIT}, BOUNDARY)
    try:
        r = httpx.post(f"{pool.url}/v1/audio/transcriptions", content=_chunked(over, 1 << 16),
                       headers=headers, timeout=30)
    except httpx.TransportError:  # the router may close before the client sent it all
        pass
    else:
        assert r.status_code == 413, r.text
        assert "larger than" in r.json()["error"]["message"]
    stats = sim_stats(port)
    assert stats["uploads"] == before  # the engine never got it whole
    assert stats["upload_bytes"] <= AUDIO_LIMIT  # never the over-limit body whole


def test_engine_receives_the_upload_while_the_client_still_sends_it(pool: Proc) -> None:
    """Streaming, not buffering: the client sends the first half, then waits until the
    engine has counted bytes of it before sending the second half. A hop that buffered the
    body would leave the engine at zero, and this test waiting, until it timed out."""
    port = next(iter(engines(pool, "asr").values()))
    start = sim_stats(port)["upload_bytes"]
    body = form({"model": b"asr", "response_format": b"json", "file": wav(20.0)}, BOUNDARY)
    half = len(body) // 2
    url = urlsplit(pool.url)
    with socket.create_connection((url.hostname, url.port), timeout=30) as s:
        s.sendall(b"POST /v1/audio/transcriptions HTTP/1.1\r\nhost: x\r\n"
                  b"content-type: multipart/form-data; boundary=" + BOUNDARY.encode() +
                  b"\r\ncontent-length: %d\r\n\r\n" % len(body) + body[:half])
        wait_until(lambda: sim_stats(port)["upload_bytes"] > start, 15, interval=0.05,
                   what="the engine receiving the first half")
        seen = sim_stats(port)["upload_bytes"] - start
        assert 0 < seen <= half  # it cannot have more than was sent
        s.sendall(body[half:])
        answer = _read_response(s)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    assert b'"bytes_received":%d' % len(body) in answer
    assert b"20.00 seconds" in answer
    assert sim_stats(port)["upload_bytes"] - start == len(body)


def _read_response(s: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(rest) < length:
        rest += s.recv(65536)
    return head + b"\r\n\r\n" + rest


def test_an_upload_moves_to_another_replica_when_one_fails_before_answering(
        cluster: Cluster) -> None:
    """A replica whose engine fails answers 500 at once: what it was sent of the upload is
    still at hand (a small upload arrives in the router's first read; the pieces sent after
    it are kept within MAX_BODY_BYTES, tests/unit/test_upload_stream.py), so the router
    sends it all again to the other."""
    cluster.manager()
    for w in ("w1", "w2"):
        cluster.worker(w)
    router = cluster.router(MAX_BODY_BYTES=str(BODY_LIMIT))
    assert register(router, "asr", engine="sim", replicas=2).status_code == 201
    wait_until(lambda: len(engines(router, "asr")) == 2, 30, what="two replicas")
    wait_serving(router, "asr")
    dead, alive = sorted(engines(router, "asr").values())
    assert engine_call(dead, "POST", "/sim/faults", json={"fail_rate": 1.0}).status_code \
        == 200
    audio = wav(1.0)  # 32 KB: within MAX_BODY_BYTES, kept whole for a retry
    served = 0
    for _ in range(20):
        t = client(router).audio.transcriptions.create(model="asr", file=("a.wav", audio))
        assert "1.00 seconds" in t.text
        served += 1
        if sim_stats(dead)["requests"] > 0:
            break
    assert sim_stats(dead)["requests"] > 0, "the dead replica was never tried"
    assert sim_stats(alive)["uploads"] >= served
    assert sim_stats(dead)["uploads"] == 0
