"""The admin API on its own listener (``admin.listen``): one app served on the gateway's port and
on the admin port; /admin answers only on the admin port and the admin port answers nothing
else, whatever the Host header says. Then ``sidecar serve`` under gunicorn binding both."""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from sidecar.services import Services
from sidecar.web.app import create_app
from tests.conftest import (
    CODE_SEARCH,
    GATEWAY_SECRET,
    ClientKeys,
    LiveServer,
    TestIdP,
    base_config,
    exchange_params,
)
from tests.functional.http.admin_support import (
    AdminClient,
    admin_credentials,
    enable_admin,
    policy_path,
)
from tests.launcher import free_port, start_serve

CODE_SEARCH_POLICY = f"gateway -> {CODE_SEARCH}"


def exchange_at(base_url: str, subject_token: str) -> requests.Response:
    """The gateway's exchange, sent to ``base_url``."""
    return requests.post(
        f"{base_url}/token",
        data=exchange_params(subject_token),
        auth=("gateway", GATEWAY_SECRET),
        timeout=10,
    )


@dataclass
class Listeners:
    main: LiveServer
    admin_port: int
    admin: AdminClient  # on the admin listener
    token: str


@pytest.fixture
def admin_port() -> int:
    return free_port()


@pytest.fixture
def config(config: dict[str, Any], credentials: dict[str, str], admin_port: int) -> dict[str, Any]:
    return enable_admin(config, credentials, listen=f"127.0.0.1:{admin_port}")


@pytest.fixture
def listeners(
    services: Services, admin_port: int, credentials: dict[str, str]
) -> Iterator[Listeners]:
    app = create_app(services.settings, services)  # one app, as one gunicorn worker runs it
    main = LiveServer(app)
    admin = LiveServer(app, admin_port)
    try:
        yield Listeners(
            main, admin_port, AdminClient(admin.url, credentials["ops"]), credentials["ops"]
        )
    finally:
        main.stop()
        admin.stop()


def test_admin_api_answers_on_the_admin_listener(listeners: Listeners) -> None:
    listed = listeners.admin.list()
    fetched = listeners.admin.get(CODE_SEARCH_POLICY)

    assert listed.status_code == 200
    assert CODE_SEARCH_POLICY in [p["name"] for p in listed.json()["policies"]]
    assert fetched.status_code == 200
    assert listeners.admin.request("GET", "/admin/openapi.json").status_code == 200


def test_admin_api_is_not_found_on_the_gateway_listener(listeners: Listeners) -> None:
    on_main = AdminClient(listeners.main.url, listeners.token)

    responses = {
        "list": on_main.list(),
        "get": on_main.get(CODE_SEARCH_POLICY),
        "history": on_main.history(CODE_SEARCH_POLICY),
        "disable": on_main.disable(CODE_SEARCH_POLICY, '"1"'),
        "openapi": on_main.request("GET", "/admin/openapi.json"),
    }

    assert {name: r.status_code for name, r in responses.items()} == dict.fromkeys(responses, 404)
    for response in responses.values():
        assert listeners.token not in response.text
    assert listeners.admin.get(CODE_SEARCH_POLICY).json()["enabled"] is True


def test_admin_listener_serves_nothing_but_the_admin_api(
    listeners: Listeners, idp: TestIdP
) -> None:
    admin_url = f"http://127.0.0.1:{listeners.admin_port}"

    assert exchange_at(admin_url, idp.token()).status_code == 404
    for path in ("/healthz", "/readyz", "/metrics", "/.well-known/jwks.json", "/admin"):
        assert requests.get(admin_url + path, timeout=10).status_code == 404, path
    assert listeners.main.exchange(idp.token()).status_code == 200
    assert requests.get(f"{listeners.main.url}/healthz", timeout=10).status_code == 200


def test_a_host_header_naming_the_admin_port_does_not_reach_the_admin_api(
    listeners: Listeners,
) -> None:
    # The listener is the socket the request arrived on, not what the client claims.
    admin_host = {"Host": f"127.0.0.1:{listeners.admin_port}"}
    on_main = AdminClient(listeners.main.url, listeners.token)

    assert on_main.request("GET", "/admin/policies", headers=admin_host).status_code == 404
    assert requests.get(
        f"{listeners.main.url}/healthz", headers=admin_host, timeout=10
    ).ok  # and the gateway's listener still serves the gateway
    main_port = listeners.main.url.rsplit(":", 1)[1]
    on_admin = requests.get(
        f"http://127.0.0.1:{listeners.admin_port}/healthz",
        headers={"Host": f"127.0.0.1:{main_port}"},
        timeout=10,
    )
    assert on_admin.status_code == 404


def test_a_change_on_the_admin_listener_takes_effect_on_the_gateway_listener(
    listeners: Listeners, idp: TestIdP
) -> None:
    subject = idp.token()
    assert listeners.main.exchange(subject).status_code == 200

    assert listeners.admin.disable(CODE_SEARCH_POLICY, '"1"').status_code == 200

    refused = listeners.main.exchange(subject)
    assert refused.status_code == 400
    assert refused.json()["error"] == "invalid_target"


# --- under gunicorn -----------------------------------------------------------------------------


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=10)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(self._path)


def get_over_unix_socket(path: str, url_path: str, headers: dict[str, str]) -> int:
    connection = UnixHTTPConnection(path)
    try:
        connection.request("GET", url_path, headers=headers)
        return connection.getresponse().status
    finally:
        connection.close()


def test_serve_binds_the_admin_listener_beside_the_gateway_listeners(tmp_path: Path) -> None:
    idp = TestIdP(tmp_path)
    credentials = admin_credentials()
    main_port, admin_port = free_port(), free_port()
    config = enable_admin(
        base_config(idp, ClientKeys(), f"sqlite:///{tmp_path / 'sidecar.db'}"),
        credentials,
        listen=f"127.0.0.1:{admin_port}",
    )
    # A Unix socket path must be short (about 100 bytes): not under pytest's tmp_path.
    socket_dir = tempfile.mkdtemp(prefix="sidecar-")
    unix_socket = os.path.join(socket_dir, "gw.sock")
    # The shipped gunicorn settings, with the gateway on a TCP port (the launcher's --bind) and
    # on a Unix socket: --bind replaces the file's bind, so the socket is added to gunicorn's
    # settings by its on_starting hook, which runs before gunicorn binds its listeners.
    gunicorn_config = tmp_path / "gunicorn.conf.py"
    gunicorn_config.write_text(
        "import runpy\n"
        "from sidecar.serving.gunicorn import DEFAULT_CONFIG\n"
        "globals().update({k: v for k, v in runpy.run_path(str(DEFAULT_CONFIG)).items()"
        " if not k.startswith('__')})\n"
        "def on_starting(server):\n"
        f"    server.cfg.set('bind', [*server.cfg.bind, 'unix:{unix_socket}'])\n"
    )
    server = start_serve(
        tmp_path,
        config,
        "--server",
        "gunicorn",
        "--gunicorn-config",
        str(gunicorn_config),
        workers=1,
        port=main_port,
    )
    try:
        admin = AdminClient(f"http://127.0.0.1:{admin_port}", credentials["ops"])
        on_main = AdminClient(server.url, credentials["ops"])
        admin_host = {"Host": f"127.0.0.1:{admin_port}"}
        bearer = {"Authorization": f"Bearer {credentials['ops']}"}

        assert admin.list().status_code == 200, server.log()
        assert admin.request("GET", "/admin/openapi.json").status_code == 200
        assert requests.get(f"{admin.base_url}/healthz", timeout=10).status_code == 404
        assert exchange_at(admin.base_url, idp.token()).status_code == 404
        assert on_main.list().status_code == 404
        assert on_main.request("GET", "/admin/policies", headers=admin_host).status_code == 404
        exchanged = exchange_at(server.url, idp.token())
        assert exchanged.status_code == 200, exchanged.text
        # On a Unix socket gunicorn takes SERVER_PORT from the Host header: still not admin.
        assert get_over_unix_socket(unix_socket, "/healthz", admin_host) == 200
        assert get_over_unix_socket(unix_socket, "/admin/policies", bearer | admin_host) == 404
        assert get_over_unix_socket(unix_socket, policy_path(CODE_SEARCH_POLICY), bearer) == 404
    finally:
        server.kill()
        shutil.rmtree(socket_dir, ignore_errors=True)
