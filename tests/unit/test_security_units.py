"""Pure pieces of the edge: full-string validation, 400s that say why, clipped echoes, the
exposure check, bearer comparison on bytes, the connection cap's bound."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from shared.edge import Limits
from shared.errors import clip, error_body
from shared.exposure import exposure, is_loopback, refusal
from shared.http import bearer_ok, invalid
from shared.models import RegisterModelRequest, is_valid_name
from shared.settings import CommonSettings


@pytest.mark.parametrize("name", ["demo\n", "demo\r", "demo ", "", "-x", "a:b", "a" * 129])
def test_names_match_whole(name: str) -> None:
    assert not is_valid_name(name)


def test_args_and_model_names_match_whole() -> None:
    for body in ({"alias": "a", "model_name": "o/a\n", "engine": "sim"},
                 {"alias": "a", "model_name": "o/a", "engine": "vllm",
                  "extra_args": ["--dtype", "float16\n"]}):
        with pytest.raises(ValidationError):
            RegisterModelRequest.model_validate(body).to_spec("sim")


def test_spec_error_names_field_and_reason() -> None:
    req = RegisterModelRequest.model_validate(
        {"alias": "a", "model_name": "o/a", "engine": "vllm", "min_replicas": 2})
    with pytest.raises(ValidationError) as e:
        req.to_spec("sim")
    err = invalid(e.value)
    assert "min_replicas must not exceed replicas" in err.message
    assert "pydantic.dev" not in err.message
    req = RegisterModelRequest.model_validate(
        {"alias": "a", "model_name": "o/a", "engine": "vllm", "tensor_parallel_size": 0})
    with pytest.raises(ValidationError) as e:
        req.to_spec("sim")
    err = invalid(e.value)
    assert err.param == "tensor_parallel_size" and "greater than or equal to 1" in err.message


def test_echoes_are_clipped() -> None:
    assert clip("x" * 10) == "x" * 10
    assert clip("x" * 10_000).startswith("x" * 64) and len(clip("x" * 10_000)) < 90
    body = error_body("m" * 10_000, "t", "c", "p" * 1000)
    assert len(body) < 1300


@pytest.mark.parametrize(("header", "ok"), [
    (b"Bearer s3cret", True), (b"bearer s3cret", True), (b"Bearer  s3cret ", True),
    (b"Bearer \xff", False), (b"Bearer s3cret\xff", False), (b"Basic s3cret", False),
    (b"s3cret", False), (b"", False)])
def test_bearer_compares_bytes(header: bytes, ok: bool) -> None:
    assert bearer_ok(header, b"s3cret") is ok


@pytest.mark.parametrize(("host", "loop"), [
    ("127.0.0.1", True), ("127.5.0.1", True), ("::1", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("10.0.0.5", False), ("box.example", False)])
def test_loopback(host: str, loop: bool) -> None:
    assert is_loopback(host) is loop


def test_exposure_needs_every_token_off_loopback() -> None:
    open_net = exposure("router", "0.0.0.0", 8000, {"ADMIN_TOKEN": "a", "API_TOKEN": None},
                        False)
    assert open_net.insecure and open_net.missing == ("API_TOKEN",)
    assert "API_TOKEN" in refusal(open_net) and "ALLOW_INSECURE=true" in refusal(open_net)
    assert not exposure("router", "127.0.0.1", 8000, {"ADMIN_TOKEN": None}, False).insecure
    assert not exposure("router", "0.0.0.0", 8000, {"ADMIN_TOKEN": "a"}, False).insecure


def test_connection_cap_stays_under_half_the_open_files() -> None:
    s = CommonSettings(max_connections=8192)
    assert Limits.of(s, 1024).connections == 512
    assert Limits.of(s, 1 << 20).connections == 8192
