"""Property-based fuzzing of the router's admin API and OpenAI endpoints (hypothesis) against
a real router process and redis-server: generated bodies, aliases, model names and headers.

For every request: no 5xx but the documented 503s, every error in the OpenAI shape, and a
rejected request (any 4xx/5xx) leaves the stored state exactly as it was. Bounded: a few
hundred requests per test, well under a minute in all on a loaded machine.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.models import NAME_PATTERN, is_valid_name
from tests.support import Cluster, Proc, RedisServer, register, snapshot

# The tests share the module-scoped target: one pytest-xdist worker runs them all.
pytestmark = pytest.mark.xdist_group("security_fuzz")

ADMIN = "fuzz-admin"
API = "fuzz-api"
HELD = "held"  # registered and stopped: /v1 for it is a 503 model_stopped at once
# 503s the README documents for a request that cannot be served now.
DOCUMENTED_503 = {"model_stopped", "no_replica", "replica_not_ready"}
EXAMPLES = 200
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# Hop-by-hop and framing headers are the client library's to set; everything else is fuzzed.
_RESERVED = {"content-length", "transfer-encoding", "host", "connection", "expect", "upgrade",
             "te", "trailer", "authorization"}


class Target:
    def __init__(self, cluster: Cluster, router: Proc, client: httpx.Client) -> None:
        self.cluster, self.router, self.client = cluster, router, client

    def __repr__(self) -> str:  # hypothesis prints it with every failing example
        return f"Target({self.router.url})"

    def state(self) -> dict[str, Any]:
        # Demand hints expire on their own (TTL 10 s): not state a request changed.
        return {k: v for k, v in snapshot(self.cluster.redis_url, self.cluster.prefix).items()
                if not k.endswith(":demand")}


@pytest.fixture(scope="module")
def target(redis_server: RedisServer,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    c = Cluster(redis_server.url, f"f{uuid.uuid4().hex[:10]}", tmp)
    c.extra_env.update(ADMIN_TOKEN=ADMIN, API_TOKEN=API, MAX_BODY_BYTES="65536")
    try:
        router = c.router()
        assert register(router, HELD, token=ADMIN, engine="sim").status_code == 201
        r = httpx.post(f"{router.url}/admin/models/{HELD}/stop", headers=auth(ADMIN))
        assert r.status_code == 202
        with httpx.Client(base_url=router.url, timeout=10) as client:
            yield Target(c, router, client)
    finally:
        c.stop_all()


def auth(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


# -- strategies ------------------------------------------------------------------------------

_text = st.text(max_size=40)
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                      _text)
json_value = st.recursive(
    json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                       st.dictionaries(_text, inner, max_size=4)),
    max_leaves=12)
# Admin aliases never collide with the held model or the /v1 fuzz's unregistered names.
alias = st.one_of(
    st.from_regex(NAME_PATTERN, fullmatch=True),
    st.sampled_from(["demo\n", "--flag", "../etc", "a" * 200, "a:b", "a/b", " a", "é", ""]),
    st.text(max_size=300),
).filter(lambda a: a != HELD and not a.startswith("zz"))
spec_field = st.sampled_from([
    "alias", "model_name", "engine", "gpu_memory_utilization", "gpu_memory_mb",
    "max_model_len", "tensor_parallel_size", "replicas", "max_replicas", "target_inflight",
    "worker_id", "extra_args", "min_replicas", "idle_sleep_s", "sleep_level", "idle_stop_s",
    "cold_start_timeout_s", "weights_mb", "shell"])
spec_value = st.one_of(
    json_value, alias, st.sampled_from(["sim", "vllm", "llamacpp", "sglang", "bash"]),
    st.lists(st.sampled_from(["--dtype", "float16", "float16\n", "--trust-remote-code",
                              "--port", "1", "--max-num-seqs", "8", "x; rm -rf /"]),
             max_size=4),
    st.integers(min_value=-5, max_value=100), st.floats(allow_nan=False))
register_body = st.one_of(
    json_value,
    st.builds(lambda base, extra: base | extra,
              st.fixed_dictionaries({"alias": alias, "model_name": st.one_of(_text, alias)},
                                    optional={"engine": spec_value}),
              st.dictionaries(spec_field, spec_value, max_size=5)),
)
# Model names for /v1: the held model, unregistered valid names, and anything else that no
# admin alias above can be (so a request never waits for a cold start).
model_name = st.one_of(
    st.just(HELD),
    st.from_regex(r"zz[a-z0-9]{0,20}", fullmatch=True),
    st.text(max_size=300).filter(lambda m: not is_valid_name(m)),
    json_value,
)
openai_body = st.one_of(
    json_value,
    st.fixed_dictionaries({"model": model_name}, optional={
        "messages": json_value, "prompt": json_value, "input": json_value,
        "stream": json_value, "max_tokens": json_value, "user": json_value}),
)
header_name = st.from_regex(r"[a-z][a-z0-9-]{0,19}", fullmatch=True).filter(
    lambda h: h not in _RESERVED)
header_value = st.binary(max_size=100).map(
    lambda b: bytes(c for c in b if c >= 0x20 and c != 0x7f).strip())
headers = st.dictionaries(header_name, header_value, max_size=5)
bearer_of = st.one_of(st.none(), st.sampled_from([b"Bearer \xff", b"Bearer wrong", b"x"]),
                      st.binary(max_size=40).map(
                          lambda b: (b"Bearer " + bytes(c for c in b if c >= 0x20)).strip()))


def as_body(body: Any) -> bytes:
    # The standard library: big integers and Infinity as a client may send them.
    return body if isinstance(body, bytes) else json.dumps(body).encode()


# -- the checks ------------------------------------------------------------------------------

def check(t: Target, method: str, path: str, body: bytes | None, hdrs: dict[str, Any],
          token: str, bad_token: bytes | None, use_bad: bool) -> None:
    sent: dict[str, Any] = dict(hdrs)
    sent["authorization"] = bad_token if use_bad and bad_token is not None else \
        f"Bearer {token}"
    if body is not None:
        sent["content-type"] = "application/json"
    before = t.state()
    r = t.client.request(method, path, content=body, headers=sent)
    what = f"{method} {path[:120]} {(body or b'')[:200]!r} -> {r.status_code} {r.text[:300]}"
    if r.status_code >= 500:
        assert r.status_code == 503, what
    if r.status_code >= 400:
        assert r.headers.get("content-type") == "application/json", what
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}, what
        assert isinstance(err["message"], str) and err["message"], what
        assert len(r.content) < 2000, what  # echoed input is clipped
        if r.status_code == 503:
            assert err["code"] in DOCUMENTED_503, what
        assert t.state() == before, f"state changed by a rejected request: {what}"
    if r.status_code == 400:
        # Every 400 names what was wrong: a field and a reason, never a bare link.
        assert "errors.pydantic.dev" not in err["message"], what


@FUZZ
@given(op=st.sampled_from(["register", "delete", "wake", "sleep", "stop"]),
       name=alias, body=register_body, hdrs=headers, bad=bearer_of, use_bad=st.booleans())
def test_admin_api_fuzz(target: Target, op: str, name: str, body: Any,
                        hdrs: dict[str, bytes], bad: bytes | None, use_bad: bool) -> None:
    if op == "register":
        check(target, "POST", "/admin/models/register", as_body(body), hdrs, ADMIN, bad,
              use_bad)
    else:
        method = "DELETE" if op == "delete" else "POST"
        path = f"/admin/models/{quote(name, safe='')}" + ("" if op == "delete" else f"/{op}")
        check(target, method, path, None, hdrs, ADMIN, bad, use_bad)


@FUZZ
@given(path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                             "/v1/models", "/admin/models", "/admin/status"]),
       body=st.one_of(openai_body, st.binary(max_size=200)), hdrs=headers, bad=bearer_of,
       use_bad=st.booleans())
def test_openai_api_fuzz(target: Target, path: str, body: Any, hdrs: dict[str, bytes],
                         bad: bytes | None, use_bad: bool) -> None:
    token = ADMIN if path.startswith("/admin") else API
    if path.endswith(("models", "status")):
        check(target, "GET", path, None, hdrs, token, bad, use_bad)
    else:
        check(target, "POST", path, as_body(body), hdrs, token, bad, use_bad)
