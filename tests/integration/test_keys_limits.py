"""Limits of API keys held across several real routers, token reservations corrected to
the real usage, usage totals, and what an OpenAI client sees (docs/keys.md)."""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any

import httpx
import openai
import pytest
import redis

from tests.integration.keys_support import (
    ADMIN,
    admin,
    chat,
    create_key,
    known,
    pool,
    serving,
)
from tests.support import Cluster, Proc, register, wait_until


def burst(routers: list[Proc], key: str, n: int, **extra: Any) -> list[httpx.Response]:
    """``n`` requests at once, spread over the routers."""
    with concurrent.futures.ThreadPoolExecutor(16) as ex:
        return list(ex.map(lambda i: chat(routers[i % len(routers)], "m1", key, **extra),
                           range(n)))


def test_rpm_holds_across_routers_and_the_openai_client_sees_429(cluster: Cluster) -> None:
    routers = pool(cluster, 3)
    serving(routers, "m1")
    # 120 per minute: a burst of 2, then one every 0.5 s, whichever router is asked.
    key = create_key(routers[0], rpm=120)["key"]
    known(routers, key)
    began = time.monotonic()
    got = burst(routers, key, 30)
    elapsed = time.monotonic() - began
    ok = [r for r in got if r.status_code == 200]
    limited = [r for r in got if r.status_code == 429]
    assert len(ok) + len(limited) == 30
    assert 2 <= len(ok) <= 2 + int(elapsed / 0.5) + 1, (len(ok), elapsed)
    r429 = limited[0]
    assert r429.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(r429.headers["retry-after"]) >= 1
    assert r429.headers["x-ratelimit-limit-requests"] == "120"
    assert r429.headers["x-ratelimit-remaining-requests"] == "0"
    assert float(r429.headers["x-ratelimit-reset-requests"].rstrip("s")) > 0
    assert ok[0].headers["x-ratelimit-limit-requests"] == "120"

    client = openai.OpenAI(base_url=f"{routers[1].url}/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.RateLimitError) as caught:
        for _ in range(3):
            client.chat.completions.create(model="m1", max_tokens=3,
                                           messages=[{"role": "user", "content": "hi"}])
    headers = caught.value.response.headers
    assert headers["x-ratelimit-limit-requests"] == "120" and "retry-after" in headers
    bad = openai.OpenAI(base_url=f"{routers[1].url}/v1", api_key="sk-svllm-x", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    zz_key = create_key(routers[0], models=["zz*"])["key"]
    limited_models = openai.OpenAI(base_url=f"{routers[2].url}/v1", api_key=zz_key,
                                   max_retries=0)
    known(routers, zz_key)
    with pytest.raises(openai.NotFoundError):
        limited_models.chat.completions.create(model="m1", messages=[])


def test_tenant_limit_is_shared_by_its_keys(cluster: Cluster) -> None:
    routers = pool(cluster, 2)
    serving(routers, "m1")
    assert admin(routers[0], "PUT", "/tenants/acme/limits", json={"rpm": 60}).status_code == 200
    a, b = create_key(routers[0])["key"], create_key(routers[1])["key"]
    create_key(routers[0], tenant="globex")
    known(routers, a, b)
    assert chat(routers[0], "m1", a).status_code == 200
    # One per second for the whole tenant: the other key, on the other router, waits.
    assert chat(routers[1], "m1", b).status_code == 429
    # GET /admin/tenants (the console's keys page) lists each tenant's limits and keys.
    r = admin(routers[1], "GET", "/tenants")
    assert r.status_code == 200, r.text
    assert r.json() == {"tenants": [{"tenant": "acme", "rpm": 60, "tpm": None, "keys": 2},
                                    {"tenant": "globex", "rpm": None, "tpm": None, "keys": 1}]}
    assert httpx.get(f"{routers[1].url}/admin/tenants", timeout=10).status_code == 401


def test_model_limits_of_a_key_hold_across_routers(cluster: Cluster) -> None:
    routers = pool(cluster, 2)
    serving(routers, "m1")
    made = create_key(routers[0], model_limits={"m*": {"rpm": 60}, "other": {"tpm": 9}})
    assert made["model_limits"] == {"m*": {"rpm": 60}, "other": {"tpm": 9}}
    known(routers, made["key"])
    first = chat(routers[0], "m1", made["key"])
    assert first.status_code == 200 and first.headers["x-ratelimit-limit-requests"] == "60"
    # One a second for m1 under this key, whichever router is asked.
    limited = chat(routers[1], "m1", made["key"])
    assert limited.status_code == 429
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    # Without model limits the key is unlimited again (the ring reloads on the change).
    r = admin(routers[0], "PATCH", f"/keys/{made['key_id']}", json={"model_limits": None})
    assert r.status_code == 200 and r.json()["model_limits"] == {}
    wait_until(lambda: all(chat(x, "m1", made["key"]).status_code == 200 for x in routers), 5,
               interval=0.1, what="model limit removed on every router")


def test_vllm_paths_are_limited_and_allowlisted_like_chat(cluster: Cluster) -> None:
    """/v1/rerank, /tokenize and the other vLLM paths go through the same key check and
    limits as chat, on any router."""
    routers = pool(cluster, 2)
    serving(routers, "m1")
    key = create_key(routers[0], rpm=60)["key"]  # one a second, whichever router is asked
    zz_key = create_key(routers[0], models=["zz*"])["key"]
    known(routers, key, zz_key)

    def post(router: Proc, path: str, body: dict[str, Any], k: str) -> httpx.Response:
        return httpx.post(f"{router.url}{path}", json={"model": "m1", **body},
                          headers={"authorization": f"Bearer {k}"}, timeout=10)

    rerank = {"query": "q", "documents": ["a", "b"]}
    first = post(routers[0], "/v1/rerank", rerank, key)
    assert first.status_code == 200, first.text
    assert first.headers["x-ratelimit-limit-requests"] == "60"
    limited = post(routers[1], "/tokenize", {"prompt": "hi"}, key)
    assert limited.status_code == 429
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    hidden = post(routers[1], "/v1/score", {"text_1": "a", "text_2": "b"}, zz_key)
    assert hidden.status_code == 404 and hidden.json()["error"]["code"] == "model_not_found"
    assert post(routers[1], "/v1/rerank", rerank, "sk-svllm-wrong").status_code == 401


def rate_tat(r: redis.Redis, cluster: Cluster, key_id: str) -> float:
    raw = r.get(f"{cluster.prefix}:{{t:acme}}:rate:{key_id}:tok")
    return float(raw) if raw else 0.0


def assert_corrected(r: redis.Redis, cluster: Cluster, key_id: str, charged: float,
                     refund_us: float, still_ahead: bool = False) -> None:
    """The correction landed (by the next flush, not on the request's path): the bucket's
    TAT moved back by exactly the refund, or, where that put it behind Redis's clock, the
    bucket is idle (no key), which admits the same."""
    wait_until(lambda: rate_tat(r, cluster, key_id) < charged, 3, what="correction")
    corrected = rate_tat(r, cluster, key_id)
    assert corrected or not still_ahead, "the bucket was to stay ahead of the clock"
    if corrected:
        assert charged - corrected == pytest.approx(refund_us, abs=1)
    else:
        seconds, micros = r.time()
        assert charged - refund_us <= seconds * 1e6 + micros


@pytest.mark.parametrize("stream", [False, True])
def test_token_reservation_is_corrected_to_real_usage(cluster: Cluster, stream: bool) -> None:
    # Flushes far apart, so that the charge can be read before its correction lands.
    routers = pool(cluster, 2, LIMITS_FLUSH_S="1.5")
    serving(routers, "m1")
    # 10 ms a token: the reservation (~260 tokens, 2.6 s) is still ahead of Redis's clock
    # when the correction (~0.6 s back: the simulated engine writes all 200) lands.
    made = create_key(routers[0], tpm=6_000)
    known(routers, made["key"])
    r = redis.Redis.from_url(cluster.redis_url, decode_responses=True)
    extra: dict[str, Any] = {"max_tokens": 200}
    if stream:
        extra |= {"stream": True, "stream_options": {"include_usage": True}}
    body_len = len(httpx.Request("POST", "/", json={
        "model": "m1", "messages": [{"role": "user", "content": "hello there"}]} | extra
    ).content)
    reserved = body_len // 4 + 1 + 200
    t0 = time.time() * 1e6
    resp = chat(routers[1], "m1", made["key"], **extra)
    assert resp.status_code == 200
    charged = rate_tat(r, cluster, made["key_id"])
    # Charged at admission: Redis's clock at that moment (some time after t0) + reservation.
    assert reserved * 10_000 - 1000 <= charged - t0 <= reserved * 10_000 + 3_000_000
    if stream:
        usage = [line for line in resp.text.splitlines() if '"usage"' in line][-1]
        real = int(usage.split('"total_tokens":')[1].split(",")[0].split("}")[0])
    else:
        real = resp.json()["usage"]["total_tokens"]
    assert real < reserved
    assert_corrected(r, cluster, made["key_id"], charged, (reserved - real) * 10_000,
                     still_ahead=True)


def test_held_streamed_request_is_corrected_to_its_usage(cluster: Cluster) -> None:
    # A streamed request of a cold model is held (ASGI path) until the cold start: its
    # reservation is corrected from the final usage chunk, as on the fast lane.
    routers = pool(cluster, 2, LIMITS_FLUSH_S="0.2")
    r = register(routers[0], "cold", token=ADMIN, engine="sim", min_replicas=0,
                 extra_args=["--startup-delay", "1.5"], cold_start_timeout_s=60)
    assert r.status_code == 201, r.text
    made = create_key(routers[0], tpm=6_000_000)  # 10 µs a token
    known(routers, made["key"])
    rd = redis.Redis.from_url(cluster.redis_url, decode_responses=True)
    extra: dict[str, Any] = {"max_tokens": 200, "stream": True,
                             "stream_options": {"include_usage": True}}
    body_len = len(httpx.Request("POST", "/", json={
        "model": "cold", "messages": [{"role": "user", "content": "hello there"}]} | extra
    ).content)
    reserved = body_len // 4 + 1 + 200
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        sent = ex.submit(chat, routers[1], "cold", made["key"], **extra)
        # Charged at admission, before the hold: read while the request waits.
        wait_until(lambda: rate_tat(rd, cluster, made["key_id"]) > 0, 10, interval=0.01,
                   what="the reservation charged")
        charged = rate_tat(rd, cluster, made["key_id"])
        assert not sent.done()  # held: the model is still starting
        resp = sent.result()
    assert resp.status_code == 200
    usage = [line for line in resp.text.splitlines() if '"usage"' in line][-1]
    real = int(usage.split('"total_tokens":')[1].split(",")[0].split("}")[0])
    assert real < reserved
    assert_corrected(rd, cluster, made["key_id"], charged, (reserved - real) * 10)


def test_usage_totals_match_the_requests_sent(cluster: Cluster) -> None:
    routers = pool(cluster, 2)
    serving(routers, "m1")
    made = create_key(routers[0], rpm=60)  # burst 1, then one a second
    other = create_key(routers[0], name="other")
    known(routers, made["key"], other["key"])
    got = burst(routers, made["key"], 12)
    ok = [g for g in got if g.status_code == 200]
    limited = [g for g in got if g.status_code == 429]
    assert ok and limited
    for _ in range(3):
        assert chat(routers[1], "m1", other["key"]).status_code == 200
    prompt = sum(g.json()["usage"]["prompt_tokens"] for g in ok)
    completion = sum(g.json()["usage"]["completion_tokens"] for g in ok)

    def totals() -> dict[str, int] | None:
        t = admin(routers[1], "GET", "/usage", params={"key": made["key_id"]}).json()["total"]
        return t if t["requests"] == len(ok) and t["rate_limited"] == len(limited) else None

    total = wait_until(totals, 10, what="usage flushed")
    assert total == {"requests": len(ok), "prompt_tokens": prompt,
                     "completion_tokens": completion, "errors": 0,
                     "rate_limited": len(limited)}

    def everyone() -> int | None:
        # The other key's requests may be in a later flush of router 1 than this key's.
        got = admin(routers[0], "GET", "/usage", params={"tenant": "acme", "model": "m1"})
        n = int(got.json()["total"]["requests"])
        return n if n >= len(ok) + 3 else None

    assert wait_until(everyone, 10, what="the tenant's usage flushed") == len(ok) + 3
    for far in ("yesterday", "inf", "-1e15", "nan"):  # -1e15: no list of 10**11 hours made
        bad = admin(routers[0], "GET", "/usage", params={"from": far})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "from", (far, bad.text)


def test_max_concurrent_per_key(cluster: Cluster) -> None:
    routers = pool(cluster, 1)
    assert register(routers[0], "slow", token=ADMIN, engine="sim",
                    extra_args=["--ttft", "0.6"]).status_code == 201
    serving(routers, "slow")
    key = create_key(routers[0], max_concurrent=2)["key"]
    known(routers, key)
    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        codes = sorted(ex.map(lambda _: chat(routers[0], "slow", key).status_code, range(4)))
    assert codes == [200, 200, 429, 429]
    assert chat(routers[0], "slow", key).status_code == 200  # the slots came back


def test_a_request_its_client_abandons_is_charged_not_refunded(cluster: Cluster) -> None:
    """A client that hangs up while its answer is made leaves the engine's work done: the
    reservation stands and the request is no error (a refund let a key burn GPU time free)."""
    routers = pool(cluster, 1)
    r = routers[0]
    assert register(r, "slow", token=ADMIN, engine="sim",
                    extra_args=["--ttft", "1.5"]).status_code == 201
    serving(routers, "slow")
    key = create_key(r, tpm=1200)  # tokens: 20 a second, a second's burst
    known(routers, key["key"])
    body = {"model": "slow", "max_tokens": 1000,
            "messages": [{"role": "user", "content": "hello there"}]}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{r.url}/v1/chat/completions", json=body, timeout=httpx.Timeout(10, read=0.3),
                   headers={"authorization": f"Bearer {key['key']}"})

    def counted() -> dict[str, int] | None:
        t = admin(r, "GET", "/usage", params={"key": key["key_id"]}).json()["total"]
        return t if t["requests"] == 1 else None

    assert wait_until(counted, 10, what="the abandoned request counted")["errors"] == 0
    # Its ~1,000 tokens stay charged: the next request is refused on tokens.
    again = chat(r, "slow", key["key"], max_tokens=1000)
    assert again.status_code == 429 and "tokens" in again.json()["error"]["message"], again.text


@pytest.mark.parametrize("stream", [False, True])
def test_a_token_limited_key_gets_what_it_reserved(cluster: Cluster, stream: bool) -> None:
    """Without max_tokens the engine would write up to the model's context, past the
    reservation, and a stream without its usage chunk is never corrected: a key limited in
    tokens gets LIMITS_DEFAULT_MAX_TOKENS as its cap. A key without a token limit, and a
    request that sets its own cap, are sent as they are."""
    routers = pool(cluster, 1, LIMITS_DEFAULT_MAX_TOKENS="7")
    r = routers[0]
    serving(routers, "m1")
    capped, free = create_key(r, tpm=100_000), create_key(r, name="free", rpm=600)
    known(routers, capped["key"], free["key"])
    extra: dict[str, Any] = {"max_tokens": None}  # absent: chat() sends 5 otherwise

    def tokens(key: str, **more: Any) -> int:
        body: dict[str, Any] = {"model": "m1",
                                "messages": [{"role": "user", "content": "hello there"}]}
        body |= {k: v for k, v in (extra | more).items() if v is not None}
        if stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        resp = httpx.post(f"{r.url}/v1/chat/completions", json=body, timeout=30,
                          headers={"authorization": f"Bearer {key}"})
        assert resp.status_code == 200, resp.text
        if not stream:
            return int(resp.json()["usage"]["completion_tokens"])
        usage = [line for line in resp.text.splitlines() if '"usage":{' in line][-1]
        return int(usage.split('"completion_tokens":')[1].split(",")[0].split("}")[0])

    assert tokens(capped["key"]) == 7  # the default cap, sent by the router
    assert tokens(free["key"]) == 16  # the simulated engine's own default: untouched
    assert tokens(capped["key"], max_tokens=3) == 3  # its own cap, kept


def test_a_lora_adapter_is_limited_and_booked_under_its_own_name(cluster: Cluster) -> None:
    """A request for a LoRA adapter is charged to the model limits that match the adapter's
    name or its base's (the base's GPUs serve it), and its usage is booked under the name
    the client asked for."""
    routers = pool(cluster, 1, LIMITS_FLUSH_S="0.2")
    router = routers[0]
    assert register(router, "lbase", token=ADMIN, engine="sim", extra_args=[
        "--enable-lora", "--max-loras", "2"]).status_code == 201
    for alias in ("ad1", "ad2"):
        r = admin(router, "POST", "/adapters",
                  json={"alias": alias, "base": "lbase", "adapter": f"org/{alias}-lora"})
        assert r.status_code == 201, r.text
    # Loaded before the keys exist (the pool is open until then): a first request that
    # waits for its adapter's load must not let the second one pass the one-a-second limit.
    serving(routers, "lbase")
    serving(routers, "ad1")
    serving(routers, "ad2")
    by_adapter = create_key(router, model_limits={"ad1": {"rpm": 60}})
    by_base = create_key(router, model_limits={"lbase": {"rpm": 60}})
    known(routers, by_adapter["key"], by_base["key"])

    first = chat(router, "ad1", by_adapter["key"])
    assert first.status_code == 200 and first.json()["model"] == "ad1"
    assert first.headers["x-ratelimit-limit-requests"] == "60"
    assert chat(router, "ad1", by_adapter["key"]).status_code == 429  # one a second
    assert chat(router, "ad2", by_adapter["key"]).status_code == 200  # no limit matches
    # The base's limit covers its adapters: one bucket, whichever of them is asked.
    assert chat(router, "ad2", by_base["key"]).status_code == 200
    assert chat(router, "lbase", by_base["key"]).status_code == 429

    def booked() -> dict[str, int] | None:
        rows = admin(router, "GET", "/usage", params={"key": by_adapter["key_id"]}).json()
        got = {r["model"]: r["requests"] for r in rows["rows"]}
        return got if sum(got.values()) == 2 else None

    assert wait_until(booked, 10, what="usage flushed") == {"ad1": 1, "ad2": 1}


def test_a_stream_without_include_usage_is_counted_and_its_client_sees_no_usage(
        cluster: Cluster) -> None:
    """A key's stream that did not ask for usage is sent with include_usage (its usage is
    what corrects the reservation and is counted), and the usage event is taken out of the
    answer, on the fast lane and on a held request's path alike."""
    routers = pool(cluster, 1, LIMITS_FLUSH_S="0.2")
    router = routers[0]
    assert register(router, "cold", token=ADMIN, engine="sim", min_replicas=0,
                    extra_args=["--startup-delay", "1.0"],
                    cold_start_timeout_s=60).status_code == 201
    serving(routers, "m1")
    streamed = create_key(router, tpm=6_000_000)
    plain = create_key(router, name="plain")
    known(routers, streamed["key"], plain["key"])
    client = openai.OpenAI(base_url=f"{router.url}/v1", api_key=streamed["key"],
                           max_retries=0)
    messages: Any = [{"role": "user", "content": "hello there"}]
    for model in ("m1", "cold"):  # the fast lane, then held for a cold start (ASGI path)
        chunks = list(client.chat.completions.create(model=model, max_tokens=6, stream=True,
                                                     messages=messages))
        # What a client that did not ask for usage expects: every chunk has a choice.
        assert chunks and all(c.choices and c.usage is None for c in chunks), chunks
        assert "".join(c.choices[0].delta.content or "" for c in chunks)
    raw = httpx.post(f"{router.url}/v1/completions", timeout=30,
                     headers={"authorization": f"Bearer {streamed['key']}"},
                     json={"model": "m1", "prompt": "hello", "max_tokens": 3, "stream": True})
    assert '"choices":[]' not in raw.text and raw.text.endswith("data: [DONE]\n\n"), raw.text
    # What the same requests cost, asked without streaming under another key.
    chat_usage = chat(router, "m1", plain["key"], max_tokens=6).json()["usage"]
    text_usage = httpx.post(f"{router.url}/v1/completions", timeout=30,
                            headers={"authorization": f"Bearer {plain['key']}"},
                            json={"model": "m1", "prompt": "hello", "max_tokens": 3}
                            ).json()["usage"]

    def counted() -> dict[str, int] | None:
        t = admin(router, "GET", "/usage", params={"key": streamed["key_id"]}).json()["total"]
        return t if t["requests"] == 3 else None

    total = wait_until(counted, 10, what="usage flushed")
    assert total["prompt_tokens"] == 2 * chat_usage["prompt_tokens"] + \
        text_usage["prompt_tokens"]
    assert total["completion_tokens"] == 2 * 6 + 3
