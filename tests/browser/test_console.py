"""The operators' console driven as a user would: by roles, labels and visible text."""

from __future__ import annotations

import re
import threading

import httpx
import pytest
from playwright.sync_api import Page, expect

from tests.browser.conftest import TOKEN, shot, sign_in, signed_in
from tests.support import Cluster, Proc, chat, register, snapshot, wait_serving

# The tests share the module-scoped browser: one pytest-xdist worker runs them all.
pytestmark = pytest.mark.xdist_group("browser")


def row(page: Page, alias: str):
    return page.get_by_role("row").filter(
        has=page.get_by_role("link", name=alias, exact=True))


def test_sign_in_and_watch_a_model_go_from_cold_to_running(page: Page, router: Proc) -> None:
    r = register(router, "cold", token=TOKEN, engine="sim", min_replicas=0,
                 extra_args=["--startup-delay", "1"])
    assert r.status_code == 201, r.text
    sign_in(page, router, token="wrong")
    expect(page.get_by_role("alert")).to_contain_text(
        "Sign-in failed: missing or invalid bearer token")
    signed_in(page, router)
    expect(row(page, "cold")).to_contain_text("COLD")
    expect(page.get_by_text("Workers alive: 1/1")).to_be_visible()
    expect(page.get_by_role("meter", name="w1 GPU 0 memory")).to_be_visible()

    # A request wakes it: it is held, the model starts, the console shows it serving.
    replies: list[httpx.Response] = []
    t = threading.Thread(target=lambda: replies.append(chat(router, "cold")))
    t.start()
    expect(row(page, "cold")).to_contain_text("RUNNING")
    expect(row(page, "cold")).to_contain_text("1/1")
    t.join(30)
    assert replies and replies[0].status_code == 200
    shot(page, "overview")
    page.set_viewport_size({"width": 390, "height": 760})
    expect(row(page, "cold")).to_be_visible()
    shot(page, "overview-phone")


def test_stop_and_wake_from_the_model_page(page: Page, router: Proc) -> None:
    assert register(router, "m", token=TOKEN, engine="sim").status_code == 201
    wait_serving(router, "m")
    signed_in(page, router)
    page.get_by_role("link", name="m", exact=True).click()
    expect(page.get_by_role("heading", name="Model m")).to_be_visible()
    state = page.get_by_text(re.compile(r"^State: "))
    expect(state).to_contain_text("RUNNING")
    expect(page.get_by_role("log", name="Engine log tail")).to_contain_text("model loaded")

    page.get_by_role("button", name="Stop").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text("Stop every instance of m?")
    dialog.get_by_role("button", name="Cancel").click()
    expect(dialog).to_be_hidden()
    expect(state).to_contain_text("RUNNING")

    page.get_by_role("button", name="Stop").click()
    dialog.get_by_role("button", name="Confirm").click()
    expect(state).to_contain_text("STOPPED")
    assert chat(router, "m").status_code == 503

    page.get_by_role("button", name="Wake").click()
    dialog.get_by_role("button", name="Confirm").click()
    expect(state).to_contain_text("RUNNING")
    # The start at registration and the one after the stop.
    timings = page.get_by_role("region", name="Cold-start and wake timings")
    expect(timings).to_contain_text(re.compile(r"Cold starts\s*2"))
    expect(timings).not_to_contain_text("object")
    shot(page, "model")
    wait_serving(router, "m")


def test_register_shows_the_apis_validation_message(page: Page, router: Proc,
                                                     cluster: Cluster) -> None:
    signed_in(page, router)
    page.get_by_role("link", name="Register a model").click()
    before = snapshot(cluster.redis_url, cluster.prefix)
    page.get_by_label("Alias").fill("fresh")
    page.get_by_label("Model name").fill("sim/fresh")
    page.get_by_label("Engine").select_option("sim")
    page.get_by_label("Other fields (JSON object)").fill('{"colour": "red"}')
    page.get_by_role("button", name="Register").click()
    expect(page.get_by_role("alert")).to_have_text("colour: Extra inputs are not permitted")
    shot(page, "register-error")
    assert snapshot(cluster.redis_url, cluster.prefix) == before

    page.get_by_label("Other fields (JSON object)").fill('{"idle_sleep_s": 300}')
    page.get_by_role("button", name="Register").click()
    expect(page.get_by_role("heading", name="Model fresh")).to_be_visible()
    expect(page.get_by_text(re.compile(r"^State: "))).to_contain_text("RUNNING")


def test_playground_streams_tokens(page: Page, router: Proc) -> None:
    # A slow inter-token latency: the answer must visibly grow before it is complete.
    assert register(router, "chatty", token=TOKEN, engine="sim",
                    extra_args=["--itl", "0.08", "--max-tokens-default", "30"]).status_code == 201
    wait_serving(router, "chatty")
    signed_in(page, router)
    page.get_by_role("link", name="Playground").click()
    page.get_by_label("Model").select_option("chatty")
    page.get_by_label("Message").fill("Tell me a story")
    page.get_by_role("button", name="Send").click()
    status = page.get_by_role("status")
    answer = page.get_by_role("log", name="Answer")
    expect(status).to_contain_text("Streaming…")
    partial = answer.inner_text()
    expect(status).to_contain_text("Done:", timeout=30_000)
    final = answer.inner_text()
    assert partial and len(final) > len(partial), (partial, final)
    shot(page, "playground")
