"""The policy admin API: the configuration that enables it, and a small client (over real HTTP
here; tests/unit/web/test_admin.py sends the same calls through Flask's test client)."""

from __future__ import annotations

import secrets
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import requests
from sqlalchemy import Engine, delete, func, insert, select

from sidecar.store.models import PolicyRow, PolicyVersionRow

Response = TypeVar("Response")


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


PolicyTables = dict[str, list[dict[str, Any]]]


def policy_tables(engine: Engine) -> PolicyTables:
    """The policy table and its history, every row: a snapshot for
    :func:`restore_policy_tables`."""
    with engine.connect() as connection:
        return {
            model.__tablename__: [
                dict(row._mapping) for row in connection.execute(select(model.__table__))
            ]
            for model in (PolicyRow, PolicyVersionRow)
        }


def restore_policy_tables(engine: Engine, snapshot: PolicyTables) -> None:
    """Put the policy table and its history back as ``snapshot`` has them, in one transaction.
    A running service's workers keep the policies they cached (a test that then needs /token
    to decide on the table needs a service started on it)."""
    with engine.begin() as connection:
        for model in (PolicyVersionRow, PolicyRow):
            connection.execute(delete(model))
            if rows := snapshot[model.__tablename__]:
                connection.execute(insert(model), rows)


class AdminCalls(Generic[Response]):
    """The admin API's calls with one bearer ``token``; a subclass sends them (``send``)."""

    token: str

    def send(self, method: str, path: str, headers: dict[str, str], **kwargs: Any) -> Response:
        raise NotImplementedError

    def request(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        if_match: str | None = None,
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> Response:
        sent = {"Authorization": f"Bearer {token or self.token}", **(headers or {})}
        if if_match is not None:
            sent["If-Match"] = if_match
        return self.send(method, path, sent, **kwargs)

    def list(self) -> Response:
        return self.request("GET", "/admin/policies")

    def get(self, name: str) -> Response:
        return self.request("GET", policy_path(name))

    def create(self, document: Any, **kwargs: Any) -> Response:
        return self.request("POST", "/admin/policies", json=document, **kwargs)

    def put(self, name: str, document: Any, if_match: str | None, **kwargs: Any) -> Response:
        return self.request("PUT", policy_path(name), json=document, if_match=if_match, **kwargs)

    def disable(self, name: str, if_match: str | None, **kwargs: Any) -> Response:
        return self.request("POST", policy_path(name, "/disable"), if_match=if_match, **kwargs)

    def history(self, name: str) -> Response:
        return self.request("GET", policy_path(name, "/history"))


class AdminClient(AdminCalls[requests.Response]):
    """Calls the admin API at ``base_url`` over HTTP; with a ``session``, over its kept-alive
    connection."""

    def __init__(self, base_url: str, token: str, session: requests.Session | None = None) -> None:
        self.base_url = base_url
        self.token = token
        self.session = session

    def send(
        self, method: str, path: str, headers: dict[str, str], **kwargs: Any
    ) -> requests.Response:
        send = self.session.request if self.session is not None else requests.request
        return send(
            method,
            self.base_url + path,
            headers=headers,
            timeout=10,
            allow_redirects=False,
            **kwargs,
        )
