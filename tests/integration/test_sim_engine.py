"""The simulated engine, run as a real subprocess and spoken to over HTTP like ``vllm serve``."""

from __future__ import annotations

import math
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from shared.procs import spawn, stop, tail

# The tests share module-scoped engines: one pytest-xdist worker runs them all.
pytestmark = pytest.mark.xdist_group("sim_engine")

ROOT = Path(__file__).resolve().parents[2]
MODEL = "sim-model"
CHAT_OVERHEAD = 4  # prompt tokens the engine adds per chat message (its "template")


@dataclass
class Engine:
    proc: subprocess.Popen[bytes]
    base: str
    log: Path

    def client(self, api_key: str = "x") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base}/v1", api_key=api_key, max_retries=0)

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = httpx.get(f"{self.base}/sim/stats").json()
        return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(condition: Callable[[], bool], timeout_s: float, interval_s: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval_s)
    return condition()


def _healthy(engine: Engine) -> bool:
    if engine.proc.poll() is not None:
        raise AssertionError(f"engine exited {engine.proc.returncode}:\n{tail(engine.log)}")
    try:
        return httpx.get(f"{engine.base}/health", timeout=0.5).status_code == 200
    except httpx.TransportError:
        return False


def spawn_engine(log: Path, *extra: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    argv = [sys.executable, "-m", "services.sim_engine", "--model", MODEL, "--port", str(port)]
    return spawn([*argv, *extra], log_path=log, cwd=ROOT), port


def start_engine(log: Path, *extra: str) -> Engine:
    proc, port = spawn_engine(log, *extra)
    engine = Engine(proc, f"http://127.0.0.1:{port}", log)
    try:
        assert wait_until(lambda: _healthy(engine), 15.0), tail(log)
    except BaseException:
        stop(proc)
        raise
    return engine


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    log = tmp_path_factory.mktemp("sim") / "sim.log"
    fast_sleep = ("--sleep-delay", "0.01", "--wake-delay-l1", "0.02", "--wake-delay-l2", "0.05")
    eng = start_engine(log, "--enable-sleep-mode", "--max-model-len", "256", *fast_sleep)
    yield eng
    stop(eng.proc)


@pytest.fixture(scope="module")
def strict_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """Every completion fails, /v1 needs a key, and sleep mode is off."""
    log = tmp_path_factory.mktemp("sim") / "sim.log"
    eng = start_engine(log, "--fail-rate", "1.0", "--api-key", "secret")
    yield eng
    stop(eng.proc)


@pytest.fixture()
def slow_engine(tmp_path: Path) -> Iterator[Engine]:
    eng = start_engine(tmp_path / "sim.log", "--itl", "0.05", "--startup-delay", "0.1")
    yield eng
    stop(eng.proc)


def _error(response: httpx.Response, status: int, kind: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == kind and error["code"] == status and error["param"] is None
    message: str = error["message"]
    return message


def test_models(engine: Engine) -> None:
    body = httpx.get(f"{engine.base}/v1/models").json()
    assert body["object"] == "list"
    (card,) = body["data"]
    assert card["id"] == MODEL and card["root"] == MODEL and card["owned_by"] == "vllm"
    assert card["max_model_len"] == 256 and card["parent"] is None
    assert [m.id for m in engine.client().models.list()] == [MODEL]


def test_chat_plain_and_streamed_agree(engine: Engine) -> None:
    client = engine.client()
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "say hello to the pool"}
    ]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=7)
    content = plain.choices[0].message.content or ""
    assert len(content.split()) == 7 and content.endswith(" ")
    assert plain.choices[0].finish_reason == "length" and plain.id.startswith("chatcmpl-")
    assert plain.usage is not None
    assert plain.usage.prompt_tokens == 5 + CHAT_OVERHEAD and plain.usage.completion_tokens == 7
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=7, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1 and chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == content
    assert chunks[-2].choices[0].finish_reason == "length"
    assert not chunks[-1].choices and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 7
    other = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "something else"}], max_tokens=7
    )
    assert other.choices[0].message.content != content


def test_completions_plain_and_streamed(engine: Engine) -> None:
    client = engine.client()
    plain = client.completions.create(model=MODEL, prompt="once upon a time", max_tokens=5)
    assert plain.object == "text_completion" and plain.usage is not None
    assert plain.usage.prompt_tokens == 4 and plain.usage.completion_tokens == 5
    text = plain.choices[0].text
    assert len(text.split()) == 5 and plain.choices[0].finish_reason == "length"
    stream = client.completions.create(
        model=MODEL, prompt="once upon a time", max_tokens=5, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_default_max_tokens_and_raw_stream_framing(engine: Engine) -> None:
    body = {"model": MODEL, "prompt": "x", "stream": True}
    with httpx.stream("POST", f"{engine.base}/v1/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-2] == "data: [DONE]" and events[-1] == ""
    assert len(events) == 16 + 3  # default 16 tokens, the finish chunk, [DONE], trailing ""


def test_embeddings(engine: Engine) -> None:
    result = engine.client().embeddings.create(model=MODEL, input=["alpha beta", "gamma"])
    first, second = (d.embedding for d in result.data)
    assert len(first) == 32 and len(second) == 32 and first != second
    assert math.isclose(math.sqrt(sum(v * v for v in first)), 1.0, rel_tol=1e-5)
    assert result.usage.prompt_tokens == 3
    raw = httpx.post(f"{engine.base}/v1/embeddings", json={"model": MODEL, "input": "gamma"})
    again = raw.json()["data"][0]["embedding"]
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(again, second, strict=True))


def test_request_errors(engine: Engine) -> None:
    url = f"{engine.base}/v1/chat/completions"
    hello = [{"role": "user", "content": "hi"}]
    unknown = httpx.post(url, json={"model": "nope", "messages": hello})
    assert _error(unknown, 404, "NotFoundError") == "The model `nope` does not exist."
    bad_json = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    _error(bad_json, 400, "BadRequestError")
    zero = httpx.post(url, json={"model": MODEL, "messages": hello, "max_tokens": 0})
    _error(zero, 400, "BadRequestError")
    _error(httpx.post(url, json={"model": MODEL, "messages": []}), 400, "BadRequestError")
    _error(httpx.post(url, json={"messages": hello, "n": 2}), 400, "BadRequestError")
    prompt = httpx.post(f"{engine.base}/v1/completions", json={"model": MODEL, "prompt": 3})
    _error(prompt, 400, "BadRequestError")
    with pytest.raises(openai.NotFoundError):
        engine.client().completions.create(model="other", prompt="x")


def test_sleep_wake_cycle(engine: Engine) -> None:
    base = engine.base
    before = engine.stats()
    assert httpx.post(f"{base}/sleep", params={"level": "3"}).status_code == 400
    assert httpx.post(f"{base}/sleep", params={"level": "2"}).status_code == 200
    try:
        assert httpx.get(f"{base}/is_sleeping").json() == {"is_sleeping": True}
        assert engine.stats()["sleep_level"] == 2
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        asleep = httpx.post(f"{base}/v1/chat/completions", json=chat)
        assert _error(asleep, 503, "ServiceUnavailableError") == "engine is sleeping"
        embed = httpx.post(f"{base}/v1/embeddings", json={"input": "x"})
        _error(embed, 503, "ServiceUnavailableError")
    finally:
        assert httpx.post(f"{base}/wake_up").status_code == 200
    assert httpx.get(f"{base}/is_sleeping").json() == {"is_sleeping": False}
    after = engine.stats()
    assert after["sleeps"] == before["sleeps"] + 1
    assert after["wakes"] == before["wakes"] + 1
    assert after["sleep_level"] is None
    assert engine.client().completions.create(model=MODEL, prompt="awake").choices


def test_metrics(engine: Engine) -> None:
    engine.client().completions.create(model=MODEL, prompt="count me", max_tokens=2)
    response = httpx.get(f"{engine.base}/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    label = f'{{model_name="{MODEL}"}}'
    for name in ("num_requests_running", "num_requests_waiting", "gpu_cache_usage_perc",
                 "prompt_tokens_total", "generation_tokens_total", "request_success_total"):
        assert f"vllm:{name}{label} " in response.text
        assert f"# TYPE vllm:{name} " in response.text


def test_collector_is_quiet_once_serving(engine: Engine) -> None:
    """The start-up heap is frozen and the young generation collected every 20,000
    allocations (as vLLM freezes its heap and the pool's services do both): with Python's
    defaults the engine's own collections showed as every proxy's TTFT tail."""
    gc = engine.stats()["gc"]
    assert gc["threshold"][0] == 20_000
    assert gc["frozen"] > 10_000  # the modules and the app
    assert "Freezing GC:" in engine.log.read_text()


def test_strict_engine_auth_failures_and_no_sleep_mode(strict_engine: Engine) -> None:
    base = strict_engine.base
    refused = httpx.post(f"{base}/sleep")
    assert "not enabled" in _error(refused, 400, "BadRequestError")
    assert httpx.post(f"{base}/wake_up").status_code == 400
    assert httpx.get(f"{base}/health").status_code == 200  # only /v1 is guarded
    _error(httpx.get(f"{base}/v1/models"), 401, "AuthenticationError")
    keyed = {"Authorization": "Bearer secret"}
    assert httpx.get(f"{base}/v1/models", headers=keyed).status_code == 200
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    failed = httpx.post(f"{base}/v1/chat/completions", json=chat, headers=keyed)
    assert _error(failed, 500, "InternalServerError") == "simulated engine failure"


def test_stream_disconnect_is_counted_as_aborted(slow_engine: Engine) -> None:
    body = {"model": MODEL, "prompt": "long story", "max_tokens": 200, "stream": True}
    url = f"{slow_engine.base}/v1/completions"
    # A client of its own, so leaving the stream closes the connection rather than pooling it.
    with httpx.Client() as client, client.stream("POST", url, json=body) as response:
        events = (line for line in response.iter_lines() if line.startswith("data: "))
        assert next(events) and next(events)
    assert wait_until(lambda: slow_engine.stats()["aborted"] == 1, 3.0), slow_engine.stats()
    # A non-streamed request whose client gives up is aborted as well.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{slow_engine.base}/v1/completions", json={**body, "stream": False},
                   timeout=0.2)
    assert wait_until(lambda: slow_engine.stats()["aborted"] == 2, 3.0), slow_engine.stats()
    stats = slow_engine.stats()
    assert stats["running"] == 0 and stats["completed"] == 0 and stats["requests"] == 2


def test_sigterm_with_open_stream_exits_fast(slow_engine: Engine) -> None:
    assert "loading model" in slow_engine.log.read_text()
    body = {"model": MODEL, "prompt": "endless", "max_tokens": 1000, "stream": True}
    with httpx.stream("POST", f"{slow_engine.base}/v1/completions", json=body) as response:
        assert next(response.iter_lines()).startswith("data: ")
        started = time.monotonic()
        stop(slow_engine.proc)
        assert time.monotonic() - started < 3.0


def test_fail_startup_exits_1_with_error_in_log(tmp_path: Path) -> None:
    log = tmp_path / "sim.log"
    proc, _ = spawn_engine(log, "--fail-startup")
    try:
        assert proc.wait(timeout=10) == 1
    finally:
        stop(proc)
    assert "RuntimeError: simulated start-up failure" in log.read_text()


def test_unknown_flag_exits_2(tmp_path: Path) -> None:
    log = tmp_path / "sim.log"
    proc, _ = spawn_engine(log, "--no-such-flag")
    try:
        assert proc.wait(timeout=10) == 2
    finally:
        stop(proc)
    assert "unrecognized arguments: --no-such-flag" in log.read_text()


def test_serves_on_a_unix_socket_as_vllm_uds_and_on_a_sim_port_beside_it() -> None:
    """--uds (vLLM's flag: host and port unused), and --sim-port, the loopback port the
    benchmarks' direct clients use beside the pool's socket; the socket file goes on SIGTERM."""
    folder = Path(tempfile.mkdtemp(dir="/tmp"))  # pytest's own can be too deep for a socket
    path, port = folder / "e.sock", free_port()
    try:
        proc = spawn([sys.executable, "-m", "services.sim_engine", "--model", MODEL, "--uds",
                      str(path), "--sim-port", str(port)], log_path=folder / "sim.log", cwd=ROOT)
        try:
            with httpx.Client(transport=httpx.HTTPTransport(uds=str(path)),
                              base_url="http://localhost") as client:
                def up() -> bool:
                    try:
                        return client.get("/health").is_success
                    except httpx.TransportError:  # not bound, or bound and not listening yet
                        return False

                assert wait_until(up, 15.0), tail(folder / "sim.log")
                r = client.post("/v1/completions", json={"model": MODEL, "prompt": "hi",
                                                         "max_tokens": 2})
                assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
            assert httpx.get(f"http://127.0.0.1:{port}/sim/stats").json()["requests"] == 1
            assert f"Uvicorn running on unix socket {path}" in tail(folder / "sim.log")
        finally:
            stop(proc)
        assert not path.exists()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
