"""What the worker's proxy passes to an engine: only the headers engines need, with the
request id made acceptable to engines that insist on UUIDs (llama-cpp-python's server)."""

from __future__ import annotations

from collections.abc import Callable

from services.worker.engines.llamacpp import LlamaCppDriver
from services.worker.proxy import engine_request_id, forward_headers
from shared.models import Assignment, ModelSpec


def _get(headers: dict[bytes, bytes]) -> Callable[[bytes], bytes | None]:
    return headers.get


def test_only_needed_headers_pass() -> None:
    got = forward_headers(_get({b"content-type": b"application/json", b"cookie": b"x",
                                b"authorization": b"Bearer t"}), b"abc")
    assert got == b"content-type: application/json\r\nx-request-id: abc\r\n"


def test_a_client_request_id_reaches_engines_that_take_any() -> None:
    assert engine_request_id(b"my-trace-7", False) == b"my-trace-7"


def test_an_invalid_or_missing_request_id_is_replaced() -> None:
    for bad in (None, b"", b"has space", b"x" * 129, b"\xff\xfe", b"a\r\nset-cookie: x"):
        rid = engine_request_id(bad, False)
        assert rid != bad and len(rid) == 32 and int(rid, 16) >= 0


def test_llamacpp_gets_a_uuid_request_id() -> None:
    # Only llama-cpp-python's server launch asks for UUIDs; llama-server takes any id.
    spec = ModelSpec.model_validate({"alias": "m", "model_name": "/m.gguf", "engine": "llamacpp"})
    placed = Assignment(alias="m", worker_id="w", source="scheduler", spec_version="1",
                        assigned_at=0.0)
    driver = LlamaCppDriver()
    driver.binary, driver.module = None, True  # llama-cpp-python's server
    assert driver.launch(spec, 9000, placed).uuid_request_ids
    driver.binary = "/usr/bin/llama-server"
    assert not driver.launch(spec, 9000, placed).uuid_request_ids
    rid = engine_request_id(b"my-trace-7", True)
    assert len(rid) == 32 and int(rid, 16) >= 0
    uuid_id = b"0f8fad5b-d9cb-469f-a165-70867728950e"
    assert engine_request_id(uuid_id, True) == uuid_id
