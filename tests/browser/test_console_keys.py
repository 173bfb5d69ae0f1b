"""The console's API keys and usage pages, driven as an operator would: a key made, used by
an OpenAI-style client, edited, rotated and revoked from the page; usage read back per key,
model and tenant."""

from __future__ import annotations

import re
import time

import httpx
import pytest
from playwright.sync_api import Locator, Page, expect

from tests.browser.conftest import TOKEN, shot, signed_in
from tests.support import Cluster, Proc, register, snapshot, wait_serving

pytestmark = pytest.mark.xdist_group("browser")
ADMIN_H = {"authorization": f"Bearer {TOKEN}"}


def key_row(page: Page, name: str) -> Locator:
    return page.get_by_role("row").filter(has=page.get_by_role("cell", name=name, exact=True))


def chat_with(router: Proc, key: str, alias: str = "m") -> int:
    r = httpx.post(f"{router.url}/v1/chat/completions", timeout=30,
                   headers={"authorization": f"Bearer {key}"},
                   json={"model": alias, "max_tokens": 4,
                         "messages": [{"role": "user", "content": "hi"}]})
    return r.status_code


def shown_secret(page: Page, name: str) -> str:
    secret = page.get_by_label(f"Secret of key {name}")
    expect(secret).to_be_visible()
    value = secret.input_value()
    assert re.fullmatch(r"sk-svllm-[A-Za-z0-9_-]{43}", value), value
    return value


def confirm(page: Page, text: str) -> None:
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text(text)
    dialog.get_by_role("button", name="Confirm").click()


def test_create_use_edit_rotate_and_revoke_a_key(page: Page, router: Proc) -> None:
    assert register(router, "m", token=TOKEN, engine="sim").status_code == 201
    wait_serving(router, "m")
    signed_in(page, router)
    page.get_by_role("link", name="API keys").click()
    expect(page.get_by_text("No API keys yet")).to_be_visible()

    form = page.get_by_role("form", name="Create an API key")
    form.get_by_label("Name").fill("alice-app")
    form.get_by_label("Tenant").fill("acme")
    form.get_by_label("Models").fill("m, llama-*")
    form.get_by_label("Requests per minute").fill("600")
    form.get_by_label("Priority").select_option("high")
    form.get_by_role("button", name="Create key").click()
    first = shown_secret(page, "alice-app")
    row = key_row(page, "alice-app")
    expect(row).to_contain_text("acme")
    expect(row).to_contain_text("m, llama-*")
    expect(row).to_contain_text("600 req/min")
    expect(row).to_contain_text("high")
    expect(row).to_contain_text(f"…{first[-4:]}")
    shot(page, "keys")
    # The key works as an OpenAI api_key; the pool now refuses requests without one.
    assert chat_with(router, first) == 200
    assert httpx.post(f"{router.url}/v1/chat/completions", timeout=30, json={
        "model": "m", "messages": [{"role": "user", "content": "hi"}]}).status_code == 401
    page.get_by_role("button", name="Hide the secret").click()
    expect(page.get_by_label("Secret of key alice-app")).to_have_count(0)
    expect(page.locator(".secret")).to_be_hidden()  # the box too, not just its content
    expect(page.get_by_role("status").first).to_be_focused()

    # Edit: the rpm limit removed, a concurrency limit set.
    row.get_by_role("button", name="Edit key alice-app").click()
    edit = page.get_by_role("region", name="Edit key alice-app")
    expect(edit.get_by_label("Requests per minute")).to_have_value("600")
    edit.get_by_label("Requests per minute").fill("")
    edit.get_by_label("Requests at once").fill("2")
    edit.get_by_role("button", name="Save").click()
    expect(page.get_by_role("status").first).to_have_text("Key alice-app saved.")
    expect(page.get_by_role("status").first).to_be_focused()  # the form it was in is gone
    expect(row).to_contain_text("2 at once")
    expect(row).not_to_contain_text("req/min")
    stored = httpx.get(f"{router.url}/admin/keys", headers=ADMIN_H).json()["keys"][0]
    assert stored["rpm"] is None and stored["max_concurrent"] == 2, stored

    rotate_then_revoke(page, router, row, first)


def rotate_then_revoke(page: Page, router: Proc, row: Locator, first: str) -> None:
    """Rotate the key of ``row`` (secret ``first``), then revoke it, cancelling once."""
    # Rotate: a new secret, the old one refused at once.
    row.get_by_role("button", name="Rotate key alice-app").click()
    confirm(page, "Rotate key alice-app?")
    second = shown_secret(page, "alice-app")
    assert second != first
    assert chat_with(router, first) == 401
    assert chat_with(router, second) == 200

    # Revoke: cancelled first (nothing changes), then confirmed.
    row.get_by_role("button", name="Revoke key alice-app").click()
    page.get_by_role("dialog").get_by_role("button", name="Cancel").click()
    assert chat_with(router, second) == 200
    assert [k["name"] for k in httpx.get(f"{router.url}/admin/keys",
                                         headers=ADMIN_H).json()["keys"]] == ["alice-app"]
    expect(row).to_be_visible()
    row.get_by_role("button", name="Revoke key alice-app").click()
    confirm(page, "Revoke key alice-app")
    expect(page.get_by_text("No API keys yet")).to_be_visible()
    assert chat_with(router, second) == 401


def test_bad_key_and_tenant_input_shows_the_apis_message_and_changes_nothing(
        page: Page, router: Proc, cluster: Cluster) -> None:
    signed_in(page, router)
    page.get_by_role("link", name="API keys").click()
    before = snapshot(cluster.redis_url, cluster.prefix)
    form = page.get_by_role("form", name="Create an API key")
    form.get_by_label("Name").fill("--no such name")
    form.get_by_role("button", name="Create key").click()
    expect(page.get_by_role("alert").first).to_contain_text("Create: name: String should match")
    form.get_by_label("Name").fill("ok")
    form.get_by_label("Models").fill("two words")
    form.get_by_role("button", name="Create key").click()
    expect(page.get_by_role("alert").first).to_contain_text("Create: models.0")
    limits = page.get_by_role("form", name="Set a tenant's shared limits")
    limits.get_by_label("Tenant").fill("bad tenant")
    limits.get_by_role("button", name="Set limits").click()
    expect(page.get_by_role("alert").first).to_contain_text("Set limits: tenant:")
    assert snapshot(cluster.redis_url, cluster.prefix) == before
    expect(page.get_by_label("Secret of key ok")).to_have_count(0)

    limits.get_by_label("Tenant").fill("acme")
    limits.get_by_label("Shared requests per minute").fill("120")
    limits.get_by_role("button", name="Set limits").click()
    tenants = page.get_by_role("region", name="Tenants")
    acme = tenants.get_by_role("row").filter(has_text="acme")
    expect(acme).to_contain_text("120")
    # Edit limits fills in the current ones: setting tpm keeps rpm (the PUT sets both).
    limits.get_by_label("Tenant").fill("")
    acme.get_by_role("button", name="Edit the limits of tenant acme").click()
    expect(limits.get_by_label("Shared requests per minute")).to_have_value("120")
    limits.get_by_label("Shared tokens per minute").fill("5000")
    limits.get_by_role("button", name="Set limits").click()
    expect(acme).to_contain_text("5,000")
    expect(acme).to_contain_text("120")


def test_usage_per_key_model_and_tenant(page: Page, router: Proc) -> None:
    for alias in ("m", "n"):
        # Two on the one fake GPU: each takes 40% of its memory.
        assert register(router, alias, token=TOKEN, engine="sim",
                        gpu_memory_utilization=0.4).status_code == 201
        wait_serving(router, alias)
    made, ids = {}, {}
    for name, tenant in (("svc-a", "acme"), ("svc-b", "acme"), ("svc-c", "globex")):
        r = httpx.post(f"{router.url}/admin/keys", headers=ADMIN_H, timeout=10,
                       json={"name": name, "tenant": tenant})
        assert r.status_code == 201, r.text
        made[name], ids[name] = r.json()["key"], r.json()["key_id"]
    sent = {("svc-a", "m"): 3, ("svc-a", "n"): 1, ("svc-b", "m"): 2, ("svc-c", "n"): 4}
    for (name, alias), times in sent.items():
        for _ in range(times):
            assert chat_with(router, made[name], alias) == 200
    signed_in(page, router)
    page.get_by_role("link", name="Usage").click()
    expect(page.get_by_role("heading", name="Usage")).to_be_visible()
    # The routers flush their counters every LIMITS_FLUSH_S (0.1 s); the page re-reads every
    # 10 s, so a change of the period re-reads at once.
    expect(page.get_by_text("Requests: 10")).to_be_visible(timeout=15_000)
    usage = page.get_by_role("table")
    # Tenant, Key, Model, Requests, ...: one row per key and model, the most requests first.
    assert rows(usage) == [
        ["globex", f"svc-c ({ids['svc-c']})", "n", "4"],
        ["acme", f"svc-a ({ids['svc-a']})", "m", "3"],
        ["acme", f"svc-b ({ids['svc-b']})", "m", "2"],
        ["acme", f"svc-a ({ids['svc-a']})", "n", "1"]]
    shot(page, "usage")

    page.get_by_label("Per", exact=True).select_option("tenant")
    expect(usage.locator("tbody tr")).to_have_count(2)
    assert rows(usage) == [["acme", "6"], ["globex", "4"]]
    page.get_by_label("Per", exact=True).select_option("model")
    expect(usage.locator("thead")).to_contain_text("Model")
    assert rows(usage) == [["acme", "m", "5"], ["globex", "n", "4"], ["acme", "n", "1"]]
    page.get_by_label("Tenant", exact=True).select_option("globex")
    expect(page.get_by_text("Requests: 4")).to_be_visible()
    expect(usage.locator("tbody tr")).to_have_count(1)
    assert rows(usage) == [["globex", "n", "4"]]


def rows(table: Locator) -> list[list[str]]:
    """The table's body rows, each cut to its columns up to Requests (the first number)."""
    out = []
    for tr in table.locator("tbody tr").all():
        cells = [c.strip() for c in tr.locator("td").all_inner_texts()]
        first_number = next(i for i, c in enumerate(cells) if c.replace(",", "").isdigit())
        out.append(cells[:first_number + 1])
    return out


def test_an_edit_keeps_what_its_form_does_not_change(page: Page, router: Proc) -> None:
    """The form shows a date for the expiry and nothing of the per-model limits: saving a
    rename must leave the exact expiry (not move it to the day's end) and those limits."""
    expires_at = time.time() + 3 * 86400 + 1234.5
    r = httpx.post(f"{router.url}/admin/keys", headers=ADMIN_H, timeout=10, json={
        "name": "timed", "tenant": "acme", "expires_at": expires_at,
        "model_limits": {"m*": {"rpm": 30}}})
    assert r.status_code == 201, r.text
    signed_in(page, router)
    page.get_by_role("link", name="API keys").click()
    key_row(page, "timed").get_by_role("button", name="Edit key timed").click()
    edit = page.get_by_role("region", name="Edit key timed")
    edit.get_by_label("Name").fill("renamed")
    edit.get_by_role("button", name="Save").click()
    expect(key_row(page, "renamed")).to_be_visible()
    (stored,) = httpx.get(f"{router.url}/admin/keys", headers=ADMIN_H).json()["keys"]
    assert stored["name"] == "renamed" and stored["expires_at"] == expires_at
    assert stored["model_limits"] == {"m*": {"rpm": 30}}

    # A new date does change it: the end of that day, UTC.
    key_row(page, "renamed").get_by_role("button", name="Edit key renamed").click()
    edit = page.get_by_role("region", name="Edit key renamed")
    edit.get_by_label("Expires after (UTC date)").fill("2099-01-31")
    edit.get_by_role("button", name="Save").click()
    expect(key_row(page, "renamed")).to_contain_text("2099-01-31")
    (stored,) = httpx.get(f"{router.url}/admin/keys", headers=ADMIN_H).json()["keys"]
    assert stored["expires_at"] == 4073587199  # 2099-01-31T23:59:59Z
