"""The policy admin API over real HTTP: the configuration that enables it, and a small client."""

from __future__ import annotations

import secrets
from typing import Any
from urllib.parse import quote

import requests
from sqlalchemy import Engine, func, select

from sidecar.store.models import PolicyRow, PolicyVersionRow


def admin_credentials() -> dict[str, str]:
    """Two admin credentials, name -> token, generated per test."""
    return {"ops": secrets.token_urlsafe(32), "ci": secrets.token_urlsafe(32)}


def enable_admin(
    config: dict[str, Any], credentials: dict[str, str], listen: str | None = None
) -> dict[str, Any]:
    config["admin"] = {
        "credentials": [{"name": name, "token": token} for name, token in credentials.items()]
    }
    if listen is not None:
        config["admin"]["listen"] = listen
    # Longer than any test: only the admin API's own invalidation can make a change visible at
    # once, so a test that sees it proves the invalidation.
    config["policy_refresh_interval"] = 3600
    return config


def policy_path(name: str, suffix: str = "") -> str:
    """The policy's URL path; its name is percent-encoded, "/" included."""
    return f"/admin/policies/{quote(name, safe='')}{suffix}"


def table_state(engine: Engine) -> tuple[list[tuple[Any, ...]], int]:
    """Every policy row, and the number of history versions: equal before and after a refused
    write when nothing changed."""
    with engine.connect() as connection:
        rows = connection.execute(select(PolicyRow.__table__).order_by(PolicyRow.name)).all()
        versions = connection.scalar(select(func.count()).select_from(PolicyVersionRow))
    return [tuple(row) for row in rows], int(versions or 0)


class AdminClient:
    """Calls the admin API at ``base_url`` with a bearer token."""

    def __init__(self, base_url: str, token: str) -> None:
        self.base_url = base_url
        self.token = token

    def request(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        if_match: str | None = None,
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> requests.Response:
        sent = {"Authorization": f"Bearer {token or self.token}", **(headers or {})}
        if if_match is not None:
            sent["If-Match"] = if_match
        return requests.request(
            method, self.base_url + path, headers=sent, timeout=10, allow_redirects=False, **kwargs
        )

    def list(self) -> requests.Response:
        return self.request("GET", "/admin/policies")

    def get(self, name: str) -> requests.Response:
        return self.request("GET", policy_path(name))

    def create(self, document: Any, **kwargs: Any) -> requests.Response:
        return self.request("POST", "/admin/policies", json=document, **kwargs)

    def put(
        self, name: str, document: Any, if_match: str | None, **kwargs: Any
    ) -> requests.Response:
        return self.request("PUT", policy_path(name), json=document, if_match=if_match, **kwargs)

    def disable(self, name: str, if_match: str | None, **kwargs: Any) -> requests.Response:
        return self.request("POST", policy_path(name, "/disable"), if_match=if_match, **kwargs)

    def history(self, name: str) -> requests.Response:
        return self.request("GET", policy_path(name, "/history"))
