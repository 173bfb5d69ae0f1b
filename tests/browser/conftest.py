"""Browser tests: the console in real headless Chromium (Debian's package, driven by
Playwright with ``executable_path``) against a real pool."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.support import ROOT, Cluster, Proc

TOKEN = "console-secret"
SHOTS = ROOT / "docs" / "console"
FAKE_GPUS = [{"index": 0, "name": "Fake H100", "memory_total_mb": 81920,
              "memory_used_mb": 2048}]


def chromium_path() -> str:
    found = os.environ.get("CHROMIUM") or shutil.which("chromium")
    if not found:
        # A failure, not a skip: CI must not pass without having driven the console.
        pytest.fail("chromium is not installed: the browser tests need Debian's `chromium` "
                    "package (scripts/test.sh installs it; or set CHROMIUM=/path/to/chromium)")
    return found


# Module scope, not session: Playwright's sync API keeps an event loop running on the main
# thread while it is open, which made every later asyncio test of the session error.
@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    path = chromium_path()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, headless=True,
                              args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    # A fresh context per test: its own sessionStorage, so each test signs in.
    context = browser.new_context(viewport={"width": 1100, "height": 760})
    context.set_default_timeout(20_000)
    p = context.new_page()
    yield p
    context.close()


@pytest.fixture
def router(cluster: Cluster) -> Proc:
    cluster.extra_env.update(ADMIN_TOKEN=TOKEN)
    cluster.manager()
    cluster.worker("w1", GPU_BACKEND="fake", FAKE_GPUS=json.dumps(FAKE_GPUS))
    return cluster.router()


def sign_in(page: Page, router: Proc, token: str = TOKEN) -> None:
    page.goto(f"{router.url}/console")
    page.get_by_label("Admin token").fill(token)
    page.get_by_role("button", name="Sign in").click()


def signed_in(page: Page, router: Proc) -> None:
    sign_in(page, router)
    expect(page.get_by_role("heading", name="Models")).to_be_visible()


def shot(page: Page, name: str, **kw: Any) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), **kw)
