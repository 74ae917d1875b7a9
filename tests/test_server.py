"""``sidecar serve``: the real app under real gunicorn, as a subprocess on a loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
import yaml
from sqlalchemy import text

from sidecar.store import migrate
from sidecar.store.db import make_engine
from tests.conftest import (
    ACCESS_TOKEN_TYPE,
    CODE_SEARCH,
    GATEWAY_SECRET,
    SIDECAR_ISSUER,
    TOKEN_EXCHANGE,
    ClientKeys,
    TestIdP,
    base_config,
)
from tests.loopback import kill_tree

_SCRIPT = Path(sys.executable).parent / "sidecar"
SIDECAR = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "sidecar"]
START_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Gunicorn:
    process: subprocess.Popen[bytes]
    url: str
    database_url: str
    idp: TestIdP
    output: Path

    def log(self) -> str:
        return self.output.read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM, as Kubernetes sends it; the exit status."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=15)

    def kill(self) -> None:
        if self.process.poll() is None:
            kill_tree(self.process)
            self.process.wait(timeout=10)


def wait_until_ready(server: Gunicorn) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"sidecar serve exited with {server.process.returncode}:\n{server.log()}")
        try:
            if requests.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                return
        # While the workers load the app the listener already completes connections, so a read
        # can time out before anything is refused.
        except requests.RequestException:
            pass
        time.sleep(0.1)
    pytest.fail(f"sidecar serve not ready after {START_TIMEOUT}s:\n{server.log()}")


def start_gunicorn(
    directory: Path, *extra: str, access_log: bool = True, wait: bool = True
) -> Gunicorn:
    """`sidecar serve --workers 2` on a SQLite database file that does not exist yet; ready to
    answer, unless ``wait`` is False."""
    idp = TestIdP(directory)
    database_url = f"sqlite:///{directory / 'never-migrated.db'}"
    config: dict[str, Any] = base_config(idp, ClientKeys(), database_url)
    config_file = directory / "sidecar.yaml"
    config_file.write_text(yaml.safe_dump(config))
    port = free_port()
    output = directory / "server.log"
    ignored = ("SIDECAR_CONFIG", "SIDECAR_ACCESS_LOG")
    environment = {k: v for k, v in os.environ.items() if k not in ignored}
    if access_log:
        environment["SIDECAR_ACCESS_LOG"] = "-"  # off by default; most tests here read it
    command = [*SIDECAR, "--config", str(config_file), "serve"]
    with output.open("wb") as sink:
        process = subprocess.Popen(
            [*command, "--bind", f"127.0.0.1:{port}", "--workers", "2", *extra],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=environment,
            cwd=directory,
            start_new_session=True,  # kill() takes the workers too (granian's outlive a master)
        )
    server = Gunicorn(process, f"http://127.0.0.1:{port}", database_url, idp, output)
    if not wait:
        return server
    try:
        wait_until_ready(server)
    except BaseException:
        server.kill()
        raise
    return server


@pytest.fixture(scope="module")
def gunicorn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gunicorn]:
    server = start_gunicorn(tmp_path_factory.mktemp("serve"))
    try:
        yield server
    finally:
        server.kill()


def exchange(server: Gunicorn, subject_token: str, url: str | None = None) -> requests.Response:
    return requests.post(
        url or f"{server.url}/token",
        data={
            "grant_type": TOKEN_EXCHANGE,
            "subject_token": subject_token,
            "subject_token_type": ACCESS_TOKEN_TYPE,
            "audience": CODE_SEARCH,
        },
        auth=("gateway", GATEWAY_SECRET),
        timeout=10,
    )


def test_serve_migrates_a_new_sqlite_database_before_workers_start(gunicorn: Gunicorn) -> None:
    ready = requests.get(f"{gunicorn.url}/readyz", timeout=5)

    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": True, "signing_key": True, "serving": True}
    engine = make_engine(gunicorn.database_url)
    try:
        assert migrate.is_current(engine)
        with engine.connect() as connection:
            keys = connection.scalar(text("SELECT count(*) FROM signing_keys"))
            policies = connection.scalar(text("SELECT count(*) FROM policies"))
    finally:
        engine.dispose()
    assert keys == 1  # made once before the fork, not once per worker
    assert policies == 5  # bootstrapped from the config


def test_exchange_succeeds_under_gunicorn(gunicorn: Gunicorn) -> None:
    response = exchange(gunicorn, gunicorn.idp.token())

    assert response.status_code == 200, response.text
    token = response.json()["access_token"]
    jwks = jwt.PyJWKClient(f"{gunicorn.url}/.well-known/jwks.json")
    claims = jwt.decode(
        token,
        jwks.get_signing_key_from_jwt(token),
        algorithms=["ES256"],
        audience=CODE_SEARCH,
        issuer=SIDECAR_ISSUER,
    )
    assert claims["sub"] == "alice@example.com"
    assert claims["client_id"] == "gateway"


def test_every_worker_serves_the_same_jwks(gunicorn: Gunicorn) -> None:
    # Each request opens a new connection, so the kernel spreads them over both workers.
    bodies = {
        requests.get(f"{gunicorn.url}/.well-known/jwks.json", timeout=5).text for _ in range(20)
    }

    assert len(bodies) == 1
    [body] = bodies
    assert len(jwt.PyJWKSet.from_json(body).keys) == 1


def test_access_log_never_contains_the_query_string(gunicorn: Gunicorn) -> None:
    secret = "SECRET" + "q" * 12

    response = exchange(gunicorn, gunicorn.idp.token(), url=f"{gunicorn.url}/token?x={secret}")

    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"
    deadline = time.monotonic() + 5
    while '"POST /token" 400' not in gunicorn.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    log = gunicorn.log()
    assert '"POST /token" 400' in log  # the request was logged, without its query
    assert secret not in log


def test_subject_token_never_reaches_the_server_log(gunicorn: Gunicorn) -> None:
    subject = gunicorn.idp.token()
    refused = gunicorn.idp.token(aud="https://someone-else.example")

    exchange(gunicorn, subject)
    exchange(gunicorn, refused)

    time.sleep(0.2)  # let the access log lines land
    log = gunicorn.log()
    assert subject not in log
    assert refused not in log
    assert subject.split(".")[2] not in log  # not even the signature


def test_sighup_reload_keeps_serving(tmp_path: Path) -> None:
    server = start_gunicorn(tmp_path)
    try:
        booted = server.log().count("Booting worker")

        server.process.send_signal(signal.SIGHUP)  # gunicorn's graceful reload: new workers

        deadline = time.monotonic() + START_TIMEOUT
        while server.log().count("Booting worker") < booted + 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)  # the old workers finish exiting
        assert server.process.poll() is None, server.log()
        wait_until_ready(server)
        assert requests.get(f"{server.url}/metrics", timeout=5).status_code == 200
        assert exchange(server, server.idp.token()).status_code == 200
    finally:
        server.kill()


def test_sigterm_stops_the_server_cleanly(tmp_path: Path) -> None:
    server = start_gunicorn(tmp_path)
    try:
        assert requests.get(f"{server.url}/healthz", timeout=5).status_code == 200

        started = time.monotonic()
        status = server.stop()

        assert status == 0, server.log()
        assert time.monotonic() - started < 10
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{server.url}/healthz", timeout=2)
    finally:
        server.kill()


def test_sigterm_while_the_workers_boot_stops_the_server(tmp_path: Path) -> None:
    # uvloop runs a signal handler only while its loop runs: a SIGTERM that arrives while a
    # worker still loads the app must not be lost (the orchestrator would wait to SIGKILL it).
    server = start_gunicorn(tmp_path, wait=False)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while server.log().count("Booting worker with pid") < 2:
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.01)
        started = time.monotonic()
        status = server.stop()

        assert status == 0, server.log()
        assert time.monotonic() - started < 10
        assert server.log().count("Worker exiting") == 2, server.log()
    finally:
        server.kill()


def test_no_access_log_by_default(tmp_path: Path) -> None:
    server = start_gunicorn(tmp_path, access_log=False)
    try:
        assert exchange(server, server.idp.token()).status_code == 200
        time.sleep(0.3)
    finally:
        server.kill()
    assert '"POST /token"' not in server.log()


def test_granian_serves_the_same_app(tmp_path: Path) -> None:
    server = start_gunicorn(tmp_path, "--server", "granian")
    try:
        response = exchange(server, server.idp.token())
        assert response.status_code == 200, response.text
        assert response.headers["Cache-Control"] == "no-store"
        refused = exchange(server, server.idp.token(aud="https://someone-else.example"))
        assert refused.status_code == 400
        assert refused.json()["error"] == "invalid_request"
        assert requests.get(f"{server.url}/.well-known/jwks.json", timeout=5).json()["keys"]
        metrics = requests.get(f"{server.url}/metrics", timeout=5).text
        assert 'sidecar_token_requests_total{error="",outcome="granted"}' in metrics
    finally:
        server.kill()


def test_granian_refuses_a_separate_admin_listener(tmp_path: Path) -> None:
    idp = TestIdP(tmp_path)
    config: dict[str, Any] = base_config(idp, ClientKeys(), f"sqlite:///{tmp_path / 's.db'}")
    config["admin"] = {
        "listen": f"127.0.0.1:{free_port()}",
        "credentials": [{"name": "ops", "token": "x" * 32}],
    }
    config_file = tmp_path / "sidecar.yaml"
    config_file.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [*SIDECAR, "--config", str(config_file), "serve", "--server", "granian"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "admin.listen (a separate admin listener) needs --server gunicorn" in result.stderr
