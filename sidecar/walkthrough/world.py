"""The demo's loopback topology, outside the apps: the names and users, the sidecar's
configuration, ``sidecar serve`` started and stopped, and the threads serving the apps."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from wsgiref.types import WSGIApplication

import requests
from werkzeug.serving import WSGIRequestHandler, make_server

IDP_ISSUER = "https://idp.demo.local"
GATEWAY = "https://gateway.demo.local"  # the audience of user tokens: the gateway's own name
CODE_SEARCH = "https://code-search.internal/mcp"
VENDOR = "https://api.vendor.example/tickets"
API_KEY_TYPE = "urn:token-exchange-sidecar:token-type:api-key"
USERS = {  # user -> (scope, email_verified) of the token the demo IdP signs
    "alice": ("code.read tickets.read", True),
    "mallory": ("code.read", False),
}
# The gateway's routes: path -> (upstream, audience, the scope the call needs, upstream path).
ROUTES = {
    "/code-search/search": ("code-search", CODE_SEARCH, "code.read", "/search"),
    "/code-search/reindex": ("code-search", CODE_SEARCH, "code.admin", "/reindex"),
    "/vendor/tickets": ("vendor", VENDOR, "tickets.read", "/tickets"),
}
READY_TIMEOUT = 45.0


class DemoFailed(Exception):
    """The demo could not run (the sidecar did not start); the message says why."""


@dataclass(frozen=True)
class RecordedRequest:
    """One request exactly as an upstream received it, before the upstream looked at it."""

    step: str
    method: str
    path: str  # with the query string
    headers: list[tuple[str, str]]
    body: bytes

    def text(self) -> str:
        """Everything the request carried, for searching."""
        lines = [self.method, self.path, *(f"{k}: {v}" for k, v in self.headers)]
        return "\n".join([*lines, self.body.decode("latin-1")])


def sidecar_config(directory: Path, issuer: str, idp_jwks_uri: str) -> dict[str, Any]:
    """The sidecar's configuration (JSON is YAML); the two secrets come from the environment.
    It trusts the demo IdP, whose keys it fetches from the IdP's JWKS on loopback."""
    trusted = {"issuer": IDP_ISSUER, "jwks_uri": idp_jwks_uri, "audiences": [GATEWAY]}
    vendor = {"type": "bearer", "token": "${VENDOR_API_KEY}"}
    return {
        "issuer": issuer,
        "database_url": f"sqlite:///{directory / 'sidecar.db'}",
        "trusted_issuers": [{**trusted, "algorithms": ["ES256"]}],
        "clients": [{"client_id": "gateway", "client_secret": "${GATEWAY_CLIENT_SECRET}"}],
        "upstreams": [{"name": "vendor", "credentials": vendor}],
        "policies": [
            {"client_id": "gateway", "audience": CODE_SEARCH, "scopes": ["code.read"], "ttl": 120},
            {
                "client_id": "gateway",
                "audience": VENDOR,
                "scopes": ["tickets.read"],
                "require_subject_scopes": True,
                "subject": {"email_verified": {"equals": True}},  # who may have the key
                "credential": "static",
                "upstream": "vendor",
            },
        ],
    }


@contextlib.contextmanager
def sidecar_serving(config_file: Path, port: int, env: dict[str, str]) -> Iterator[int]:
    """``sidecar serve`` in a process group of its own, so that stopping it stops its workers
    too; stopped on the way out, whatever happened (an error, Ctrl-C). Yields its pid."""
    environment = {k: v for k, v in os.environ.items() if k != "SIDECAR_CONFIG"} | env
    log_file = config_file.with_name("sidecar.log")
    command = [sys.executable, "-m", "sidecar", "--config", str(config_file), "serve"]
    with log_file.open("wb") as log:
        process = subprocess.Popen(
            [*command, "--bind", f"127.0.0.1:{port}", "--workers", "1"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=environment,
            cwd=config_file.parent,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while not _ready(f"http://127.0.0.1:{port}/readyz"):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log_file.read_text(errors="replace").strip().splitlines()[-5:]
                raise DemoFailed("sidecar serve did not start:\n" + "\n".join(tail))
            time.sleep(0.1)
        yield process.pid
    finally:
        _stop(process)


def _ready(url: str) -> bool:
    try:
        with direct() as http:
            return http.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def direct() -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # no HTTP(S)_PROXY from the environment: all of it is loopback
    return session


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server (it stops its workers), then SIGKILL to whatever is left of its
    process group; returns once the group is gone (or after 10 s of trying)."""
    process.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=15)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            break
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=0.1)
    process.wait()


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # the story says what happened: no access log in the middle of it


def serve_app(stack: contextlib.ExitStack, app: WSGIApplication) -> str:
    """Serve ``app`` on a free loopback port, in a thread, until ``stack`` closes."""
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=_QuietHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    stack.callback(server.server_close)
    stack.callback(server.shutdown)
    return f"http://127.0.0.1:{server.server_port}"
