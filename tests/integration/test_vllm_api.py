"""The rest of vLLM's API through the router, end to end with the official openai client:
models.retrieve, responses, embeddings, audio; rerank, score, tokenize, pooling and classify
over httpx; a path the model's engine does not serve; bad uploads. Real router, manager,
worker and Redis, the simulated engine as the engine."""

from __future__ import annotations

import io
import math
import warnings
import wave
from typing import Any

import httpx
import openai
import pytest

from services.sim_engine import textgen
from tests.support import Cluster, Proc, model_status, register, wait_serving

BODY_LIMIT = 256 * 1024
AUDIO_LIMIT = 1024 * 1024


@pytest.fixture
def pool(cluster: Cluster) -> Proc:
    cluster.manager()
    cluster.worker("w1")
    router = cluster.router(MODEL_ROOTS="/models", MAX_BODY_BYTES=str(BODY_LIMIT),
                            MAX_AUDIO_BYTES=str(AUDIO_LIMIT))
    assert register(router, "api", engine="sim").status_code == 201
    # Cold, scaled to zero: bad requests for it must not start it.
    assert register(router, "cold", engine="sim", min_replicas=0).status_code == 201
    assert register(router, "gguf", engine="llamacpp", model_name="/models/m.gguf",
                    min_replicas=0).status_code == 201
    wait_serving(router, "api")
    return router


def client(router: Proc) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0,
                         timeout=30)


def wav(seconds: float, rate: int = 16000, channels: int = 1) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"\x00\x01" * int(seconds * rate) * channels)
    return out.getvalue()


def post(router: Proc, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{router.url}/{path}", json=body, timeout=30)


def instances(router: Proc, alias: str) -> list[Any]:
    m = model_status(router, alias)
    assert m is not None
    return list(m["instances"])


def test_openai_client_models_responses_embeddings_audio(pool: Proc) -> None:
    c = client(pool)
    card = c.models.retrieve("api")
    assert (card.id, card.object) == ("api", "model")
    with pytest.raises(openai.NotFoundError, match="nope"):
        c.models.retrieve("nope")

    answer = c.responses.create(model="api", input="tell me a story", max_output_tokens=6)
    assert answer.output_text == textgen.generate_text("tell me a story", 6)
    assert answer.usage is not None and answer.usage.output_tokens == 6
    events = list(c.responses.create(model="api", input="tell me a story", max_output_tokens=6,
                                     stream=True))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == answer.output_text and len(deltas) == 6
    assert (events[0].type, events[-1].type) == ("response.created", "response.completed")

    emb = c.embeddings.create(model="api", input=["one", "two"])
    assert [len(d.embedding) for d in emb.data] == [32, 32]
    assert emb.data[0].embedding == pytest.approx(textgen.embed("one", 32))

    t = c.audio.transcriptions.create(model="api", file=("a.wav", wav(1.5), "audio/wav"))
    assert "1.50 seconds" in t.text and "16000 Hz" in t.text
    with warnings.catch_warnings():  # some openai releases mark translations deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        tr = c.audio.translations.create(model="api", file=("b.wav", wav(0.25, 8000, 2)))
    assert tr.text.startswith("translation of 0.25 seconds") and "8000 Hz, 2 channels" in tr.text


def test_rerank_score_tokenize_pooling_classify(pool: Proc) -> None:
    docs = ["the cat sat", "stock prices fell", "a kitten slept"]
    for path in ("v1/rerank", "rerank"):
        r = post(pool, path, {"model": "api", "query": "cats", "documents": docs, "top_n": 2})
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert len(results) == 2
        scores = [x["relevance_score"] for x in results]
        assert scores == sorted(scores, reverse=True)
        assert {x["document"]["text"] for x in results} <= set(docs)

    for path in ("v1/score", "score"):
        r = post(pool, path, {"model": "api", "text_1": "cats", "text_2": docs})
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        assert [d["index"] for d in data] == [0, 1, 2]
        assert all(0.0 <= d["score"] <= 1.0 for d in data)

    text = "héllo wörld"
    r = post(pool, "tokenize", {"model": "api", "prompt": text})
    assert r.status_code == 200, r.text
    tokens = r.json()["tokens"]
    assert r.json()["count"] == len(tokens) > 0
    r = post(pool, "detokenize", {"model": "api", "tokens": tokens})
    assert r.json()["prompt"] == text

    r = post(pool, "pooling", {"model": "api", "input": ["a", "b"]})
    assert r.status_code == 200, r.text
    vectors = [d["data"] for d in r.json()["data"]]
    assert len(vectors) == 2 and all(math.isclose(sum(v * v for v in x), 1.0) for x in vectors)

    r = post(pool, "classify", {"model": "api", "input": "great stuff"})
    assert r.status_code == 200, r.text
    item = r.json()["data"][0]
    assert item["label"] in ("positive", "negative") and sum(item["probs"]) == pytest.approx(1)


def test_path_the_engine_does_not_serve_is_a_404_naming_it(pool: Proc) -> None:
    r = post(pool, "v1/score", {"model": "gguf", "text_1": "a", "text_2": "b"})
    assert r.status_code == 404, r.text
    error = r.json()["error"]
    assert error["message"] == "the model 'gguf' runs on llama.cpp, which does not serve /v1/score"
    assert error["code"] == "path_not_served"
    with pytest.raises(openai.NotFoundError, match=r"llama\.cpp, .* serve /v1/responses"):
        client(pool).responses.create(model="gguf", input="hi")
    assert instances(pool, "gguf") == []


def upload(router: Proc, content_type: str, body: bytes) -> httpx.Response:
    return httpx.post(f"{router.url}/v1/audio/transcriptions", content=body,
                      headers={"content-type": content_type}, timeout=30)


def form(fields: dict[str, bytes], boundary: str = "XyZ") -> bytes:
    parts = [f'--{boundary}\r\ncontent-disposition: form-data; name="{k}"\r\n\r\n'.encode()
             + v + b"\r\n" for k, v in fields.items()]
    return b"".join(parts) + f"--{boundary}--\r\n".encode()


MULTIPART = "multipart/form-data; boundary=XyZ"


@pytest.mark.parametrize(("content_type", "body", "status", "words"), [
    (MULTIPART, form({"file": wav(0.1)}), 400, "model"),
    (MULTIPART, b"--XyZ\r\ncontent-disposition: form-data; name=\"model\"\r\n\r\ncold", 400,
     "malformed"),
    (MULTIPART, b"not multipart at all", 400, "malformed"),
    ("multipart/form-data", form({"model": b"cold"}), 400, "boundary"),
    ("application/json", b'{"model": "cold"}', 400, "multipart/form-data"),
    (MULTIPART, form({"model": b"nope", "file": wav(0.1)}), 404, "nope"),
    (MULTIPART, form({"model": b"cold", "file": b"\x00" * AUDIO_LIMIT}), 413, "larger"),
    # Past the JSON limit, `model` behind the file: it cannot be read before the file is.
    (MULTIPART, form({"file": b"\x00" * BODY_LIMIT, "model": b"cold"}), 400, "before the file"),
])
def test_bad_uploads_get_a_4xx_and_spawn_nothing(
    pool: Proc, content_type: str, body: bytes, status: int, words: str,
) -> None:
    r = upload(pool, content_type, body)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]
    assert instances(pool, "cold") == []


def test_bad_json_on_new_paths_spawns_nothing_a_good_request_is_held(pool: Proc) -> None:
    assert post(pool, "v1/rerank", {"query": "q"}).status_code == 400  # no model
    r = httpx.post(f"{pool.url}/tokenize", content=b"{not json", timeout=10)
    assert r.status_code == 400
    r = httpx.post(f"{pool.url}/pooling", content=b"x" * (BODY_LIMIT + 1), timeout=10)
    assert r.status_code == 413
    assert instances(pool, "cold") == []
    # A good one is held while the model starts, then answered, like chat.
    r = post(pool, "tokenize", {"model": "cold", "prompt": "abc"})
    assert (r.status_code, r.json()["tokens"]) == (200, [97, 98, 99])
