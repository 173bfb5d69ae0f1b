"""The CLI's only HTTP client: the router's admin API, errors turned into one line."""

from __future__ import annotations

from typing import Any

import httpx


class CliError(Exception):
    """Printed as one line, exit code 1."""


class Client:
    """Talks to one router (``SVLLM_URL``) with the admin token (``SVLLM_ADMIN_TOKEN``)."""

    def __init__(self, url: str, token: str | None, timeout_s: float = 30.0) -> None:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)

    def close(self) -> None:
        self.http.close()

    def call(self, method: str, path: str, body: Any = None,
             params: dict[str, Any] | None = None) -> Any:
        try:
            r = self.http.request(method, path, json=body, params=params)
        except httpx.HTTPError as e:
            raise CliError(f"cannot reach the router at {self.url}: {e}") from None
        if r.status_code >= 400:
            raise CliError(_message(r))
        return r.json()

    def get(self, path: str, **params: Any) -> Any:
        return self.call("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, body: Any = None) -> Any:
        return self.call("POST", path, body)

    def delete(self, path: str) -> Any:
        return self.call("DELETE", path)

    def status(self) -> dict[str, Any]:
        return dict(self.get("/admin/status"))

    def model(self, alias: str) -> dict[str, Any]:
        for m in self.status()["models"]:
            if m["alias"] == alias:
                return dict(m)
        raise CliError(f"model '{alias}' is not registered")


def _message(r: httpx.Response) -> str:
    """The API's own message (OpenAI error shape), with the status for context."""
    try:
        err = r.json()["error"]
        return f"{err['message']} ({r.status_code} {err.get('code') or err.get('type')})"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {r.status_code}: {r.text[:200]}"
