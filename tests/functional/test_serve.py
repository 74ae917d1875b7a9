"""``sidecar serve``: the real command, with its default server and settings, as a subprocess on a
loopback port (tests/launcher.py)."""

from __future__ import annotations

import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from sidecar.store import migrate
from sidecar.store.db import make_engine
from tests.conftest import (
    ACCESS_TOKEN_TYPE,
    CODE_SEARCH,
    GATEWAY_SECRET,
    TOKEN_EXCHANGE,
    ClientKeys,
    TestIdP,
    base_config,
)
from tests.functional.http.helpers import verify_as_upstream
from tests.launcher import SIDECAR, START_TIMEOUT, Served, free_port, start_serve
from tests.loopback import wait_for


def start_default(
    directory: Path, *extra: str, access_log: bool = False, wait: bool = True
) -> Served:
    """`sidecar serve --workers 2` on a SQLite database file that does not exist yet."""
    idp = TestIdP(directory)
    config: dict[str, Any] = base_config(
        idp, ClientKeys(), f"sqlite:///{directory / 'never-migrated.db'}"
    )
    env = {"SIDECAR_ACCESS_LOG": "-"} if access_log else {}
    server = start_serve(directory, config, *extra, env=env, wait=wait)
    server.extra["idp"] = idp
    return server


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    server = start_default(tmp_path_factory.mktemp("serve"))
    try:
        yield server
    finally:
        server.kill()


def exchange(
    server: Served,
    subject_token: str,
    url: str | None = None,
    *,
    audience: str = CODE_SEARCH,
    secret: str = GATEWAY_SECRET,
    headers: dict[str, str] | None = None,
) -> requests.Response:
    """POST /token as the gateway (with ``secret``), for ``audience``."""
    return requests.post(
        url or f"{server.url}/token",
        data={
            "grant_type": TOKEN_EXCHANGE,
            "subject_token": subject_token,
            "subject_token_type": ACCESS_TOKEN_TYPE,
            "audience": audience,
        },
        auth=("gateway", secret),
        headers=headers,
        timeout=10,
    )


def test_serve_migrates_a_new_sqlite_database_before_workers_start(served: Served) -> None:
    ready = requests.get(f"{served.url}/readyz", timeout=5)

    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": True, "signing_key": True, "serving": True}
    engine = make_engine(served.database_url)
    try:
        assert migrate.is_current(engine)
        with engine.connect() as connection:
            keys = connection.scalar(text("SELECT count(*) FROM signing_keys"))
            policies = connection.scalar(text("SELECT count(*) FROM policies"))
    finally:
        engine.dispose()
    assert keys == 1  # made once before the fork, not once per worker
    assert policies == 5  # bootstrapped from the config


def test_exchange_succeeds_under_the_default_server(served: Served) -> None:
    response = exchange(served, served.extra["idp"].token())

    assert response.status_code == 200, response.text
    assert response.headers["Cache-Control"] == "no-store"
    token = response.json()["access_token"]
    jwks = jwt.PyJWKClient(f"{served.url}/.well-known/jwks.json")
    claims = verify_as_upstream(jwks, token)
    assert claims["sub"] == "alice@example.com"
    assert claims["client_id"] == "gateway"
    assert "Starting granian" in served.log()


def test_every_worker_serves_the_same_jwks(served: Served) -> None:
    # Each request opens a new connection, so the kernel spreads them over both workers.
    bodies = {
        requests.get(f"{served.url}/.well-known/jwks.json", timeout=5).text for _ in range(20)
    }

    assert len(bodies) == 1
    [body] = bodies
    assert len(jwt.PyJWKSet.from_json(body).keys) == 1


def test_subject_token_never_reaches_the_server_log(served: Served) -> None:
    subject = served.extra["idp"].token()
    refused = served.extra["idp"].token(aud="https://someone-else.example")

    exchange(served, subject)
    exchange(served, refused)

    time.sleep(0.3)  # let the audit lines land
    log = served.log()
    assert subject not in log
    assert refused not in log
    assert subject.split(".")[2] not in log  # not even the signature


def test_metrics_are_served(served: Served) -> None:
    assert exchange(served, served.extra["idp"].token()).status_code == 200
    metrics = requests.get(f"{served.url}/metrics", timeout=5).text
    assert 'sidecar_token_requests_total{error="",outcome="granted"}' in metrics


def samples(metrics_text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples of one metric in Prometheus text, by their sorted labels."""
    found = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def test_metrics_after_a_mix_of_exchanges_on_two_workers_add_up(tmp_path: Path) -> None:
    """Every answer of either worker is counted once, in the counters and in the histogram,
    whichever worker the scrape lands on."""
    served = start_default(tmp_path)  # two workers
    idp = served.extra["idp"]
    mix = [("granted", CODE_SEARCH, GATEWAY_SECRET)] * 24
    mix += [("invalid_target", "https://nowhere.internal/mcp", GATEWAY_SECRET)] * 10
    mix += [("invalid_client", CODE_SEARCH, "wrong-" + GATEWAY_SECRET)] * 6

    def send(case: tuple[str, str, str]) -> int:
        _, audience, secret = case
        subject = idp.token(sub=f"user-{uuid.uuid4().hex[:8]}")
        # A connection each: the kernel spreads them over the workers.
        answer = exchange(
            served, subject, audience=audience, secret=secret, headers={"Connection": "close"}
        )
        return answer.status_code

    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            statuses = list(pool.map(send, mix))
        scrapes = [requests.get(f"{served.url}/metrics", timeout=5).text for _ in range(4)]
    finally:
        served.stop(timeout=10)

    assert statuses == [200] * 24 + [400] * 10 + [401] * 6
    for scraped in scrapes:  # each scrape, from either worker, sums both
        answers = samples(scraped, "sidecar_token_requests_total")
        assert answers == {
            (("error", ""), ("outcome", "granted")): 24.0,
            (("error", "invalid_target"), ("outcome", "denied")): 10.0,
            (("error", "invalid_client"), ("outcome", "denied")): 6.0,
        }
        assert samples(scraped, "sidecar_token_request_seconds_count") == {(): 40.0}
        pids = {dict(k)["pid"] for k in samples(scraped, "sidecar_state_age_seconds")}
        assert len(pids) == 2  # both workers report


@pytest.mark.parametrize("server", ["granian", "gunicorn"])
def test_sighup_replaces_the_workers_and_keeps_serving(tmp_path: Path, server: str) -> None:
    served = start_default(tmp_path, "--server", server)
    try:
        served.signal(signal.SIGHUP)
        assert wait_for(lambda: "configuration validated" in served.log(), 20), served.log()
        time.sleep(1.0)  # the old workers finish exiting
        assert served.process.poll() is None, served.log()
        served.wait_ready()
        assert exchange(served, served.extra["idp"].token()).status_code == 200
    finally:
        served.kill()


def test_a_second_serve_on_a_port_in_use_exits_and_the_first_keeps_serving(
    served: Served, tmp_path: Path
) -> None:
    """granian binds with SO_REUSEPORT: without the check, both would listen and the kernel
    would share the connections between two services."""
    idp = TestIdP(tmp_path)
    config = base_config(idp, ClientKeys(), f"sqlite:///{tmp_path / 's.db'}")
    second = start_serve(tmp_path, config, port=served.port, wait=False)
    try:
        assert second.process.wait(timeout=START_TIMEOUT) != 0
    finally:
        second.kill()
    assert f"127.0.0.1:{served.port} is already in use" in second.log()
    assert exchange(served, served.extra["idp"].token()).status_code == 200


def test_policies_deleted_by_the_cli_stay_deleted_after_a_restart(tmp_path: Path) -> None:
    """serve fills only a policy table that never held a policy from the config file: after
    ``policy delete`` of every policy, a restart denies the exchange the config once allowed."""
    served = start_default(tmp_path)
    try:
        assert exchange(served, served.extra["idp"].token()).status_code == 200
    finally:
        served.stop(timeout=10)
    cli = [*SIDECAR, "--config", str(served.config_file)]
    listed = subprocess.run(
        [*cli, "policy", "export"], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    names = [p["name"] for p in yaml.safe_load(listed.stdout)["policies"]]
    assert names
    for name in names:
        subprocess.run(
            [*cli, "policy", "delete", name, "--yes"], capture_output=True, check=True, cwd=tmp_path
        )

    again = start_serve(tmp_path, served.config)
    try:
        refused = exchange(again, served.extra["idp"].token())
        assert (refused.status_code, refused.json()["error"]) == (400, "invalid_target")
    finally:
        again.kill()


@pytest.mark.parametrize("server", ["granian", "gunicorn"])
def test_sigterm_stops_the_server_cleanly(tmp_path: Path, server: str) -> None:
    served = start_default(tmp_path, "--server", server)
    try:
        assert exchange(served, served.extra["idp"].token()).status_code == 200

        started = time.monotonic()
        status = served.stop()

        assert status == 0, served.log()
        assert time.monotonic() - started < 15
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{served.url}/healthz", timeout=2)
        # The audit queue was written before the workers exited.
        engine = make_engine(served.database_url)
        try:
            with engine.connect() as connection:
                rows = connection.scalar(
                    text(
                        "SELECT count(*) FROM audit_events WHERE decision IN ('granted', 'denied')"
                    )
                )
        finally:
            engine.dispose()
        assert rows == 1
    finally:
        served.kill()


def test_sigterm_while_the_workers_boot_stops_the_server(tmp_path: Path) -> None:
    # granian 2.8 can miss a SIGTERM that reaches a worker while it boots: the worker is then
    # killed after server.graceful_timeout, and the server still stops and exits 0.
    idp = TestIdP(tmp_path)
    config: dict[str, Any] = base_config(idp, ClientKeys(), f"sqlite:///{tmp_path / 's.db'}")
    config["server"] = {"graceful_timeout": "4s"}
    served = start_serve(tmp_path, config, wait=False)
    try:
        assert wait_for(lambda: "Spawning worker" in served.log(), START_TIMEOUT), served.log()
        started = time.monotonic()
        status = served.stop()

        assert status == 0, served.log()
        assert time.monotonic() - started < 4 + 6
    finally:
        served.kill()


def test_gunicorn_access_log_never_contains_the_query_string(tmp_path: Path) -> None:
    served = start_default(tmp_path, "--server", "gunicorn", access_log=True)
    secret = "SECRET" + "q" * 12
    try:
        response = exchange(
            served, served.extra["idp"].token(), url=f"{served.url}/token?x={secret}"
        )

        assert response.status_code == 400
        assert response.json()["error"] == "invalid_request"
        # The access line (a JSON log record, quotes escaped) names the path without its query.
        assert wait_for(lambda: 'POST /token\\" 400' in served.log(), 5), served.log()
        assert secret not in served.log()
    finally:
        served.kill()


def test_no_access_log_by_default(served: Served) -> None:
    assert exchange(served, served.extra["idp"].token()).status_code == 200
    time.sleep(0.3)
    assert '"POST /token"' not in served.log()
    assert "/token" not in served.log()


@pytest.mark.parametrize("server", ["granian", "gunicorn"])
def test_a_management_listener_serves_what_upstreams_and_probes_fetch(
    tmp_path: Path, server: str
) -> None:
    idp = TestIdP(tmp_path)
    config: dict[str, Any] = base_config(idp, ClientKeys(), f"sqlite:///{tmp_path / 's.db'}")
    management = f"127.0.0.1:{free_port()}"
    config["management"] = {"listen": management}
    served = start_serve(tmp_path, config, "--server", server)
    try:
        on_management = f"http://{management}"
        for path in (
            "/.well-known/jwks.json",
            "/.well-known/oauth-authorization-server",
            "/healthz",
            "/readyz",
            "/metrics",
        ):
            assert requests.get(on_management + path, timeout=5).status_code == 200, path
        # Never a token there, nor anything else.
        refused = requests.post(
            f"{on_management}/token",
            data={"grant_type": TOKEN_EXCHANGE, "subject_token": idp.token()},
            auth=("gateway", GATEWAY_SECRET),
            timeout=5,
        )
        assert refused.status_code == 404
        assert requests.get(f"{on_management}/admin/policies", timeout=5).status_code == 404
        # The gateway's listener exchanges, and the JWKS it signs with is the management one's.
        response = exchange(served, idp.token())
        assert response.status_code == 200, response.text
        token = response.json()["access_token"]
        jwks = jwt.PyJWKClient(f"{on_management}/.well-known/jwks.json")
        claims = verify_as_upstream(jwks, token)
        assert claims["client_id"] == "gateway"
    finally:
        served.kill()


def test_rate_limits_are_shared_by_every_worker_through_redis(
    tmp_path: Path, redis_url: str
) -> None:
    idp = TestIdP(tmp_path)
    config: dict[str, Any] = base_config(idp, ClientKeys(), f"sqlite:///{tmp_path / 's.db'}")
    config["rate_limit"] = {"per_second": 0.2, "burst": 4}
    config["redis"] = {"url": redis_url, "key_prefix": f"sidecar-test:{tmp_path.name}:"}
    served = start_serve(tmp_path, config)
    try:
        # A new connection per request: the kernel spreads them over both workers, which would
        # each allow a burst of 4 on their own.
        statuses = [exchange(served, idp.token()).status_code for _ in range(8)]
    finally:
        served.kill()
    assert statuses[:4] == [200] * 4
    assert statuses[4:] == [429] * 4


def test_rate_limits_are_shared_by_two_instances_through_redis(
    tmp_path: Path, redis_url: str
) -> None:
    """Two replicas (two ``sidecar serve``, two workers each) spend one budget per client."""
    prefix = f"sidecar-test:{uuid.uuid4().hex}:"
    instances = []
    try:
        for name in ("a", "b"):
            directory = tmp_path / name
            directory.mkdir()
            idp = TestIdP(directory)
            config: dict[str, Any] = base_config(
                idp, ClientKeys(), f"sqlite:///{directory / 's.db'}"
            )
            config["rate_limit"] = {"per_second": 0.2, "burst": 4}
            config["redis"] = {"url": redis_url, "key_prefix": prefix}
            served = start_serve(directory, config)
            served.extra["idp"] = idp
            instances.append(served)
        statuses = [
            exchange(server, server.extra["idp"].token()).status_code
            for _ in range(4)
            for server in instances  # alternating: each alone would allow 4
        ]
    finally:
        for served in instances:
            served.kill()
    assert statuses[:4] == [200] * 4
    assert statuses[4:] == [429] * 4


@pytest.mark.parametrize("on_failure", ["local", "open", "closed"])
def test_with_redis_down_rate_limits_do_as_configured(tmp_path: Path, on_failure: str) -> None:
    """Redis unreachable (a port nothing listens on): ``local`` falls back to each worker's own
    buckets, ``open`` stops limiting, ``closed`` refuses with 503."""
    idp = TestIdP(tmp_path)
    config: dict[str, Any] = base_config(idp, ClientKeys(), f"sqlite:///{tmp_path / 's.db'}")
    config["rate_limit"] = {"per_second": 0.2, "burst": 2}
    config["redis"] = {
        "url": f"redis://127.0.0.1:{free_port()}/0",
        "timeout": "100ms",
        "on_failure": on_failure,
    }
    served = start_serve(tmp_path, config)
    try:
        answers = [exchange(served, idp.token()) for _ in range(8)]
    finally:
        served.kill()
    statuses = [answer.status_code for answer in answers]
    if on_failure == "open":
        assert statuses == [200] * 8
    elif on_failure == "closed":
        assert statuses == [503] * 8
        assert {a.json()["error"] for a in answers} == {"temporarily_unavailable"}
        assert all(a.headers.get("Retry-After") for a in answers)
    else:  # two workers, a burst of 2 each: 2 to 4 granted, whichever way connections fall
        granted = statuses.count(200)
        assert 2 <= granted <= 4
        assert statuses.count(429) == 8 - granted


def test_a_gateway_authenticates_with_its_kubernetes_service_account_token(
    tmp_path: Path,
) -> None:
    """Tokens shaped as a cluster's (issuer, ``kubernetes.io`` claims, expiry, audience), from a
    key generated here: the gateway's own account is accepted; the wrong audience, an expired
    token, another issuer and the same account name in another namespace are 401s."""
    import json as json_module

    from cryptography.hazmat.primitives.asymmetric import rsa
    from jwt.algorithms import RSAAlgorithm

    cluster = "https://kubernetes.default.svc.cluster.local"
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    jwk.update(kid="cluster-1", alg="RS256", use="sig")
    (tmp_path / "cluster.jwks.json").write_text(json_module.dumps({"keys": [jwk]}))
    idp = TestIdP(tmp_path)
    config: dict[str, Any] = base_config(idp, ClientKeys(), f"sqlite:///{tmp_path / 's.db'}")
    config["kubernetes"] = {
        "issuer": cluster,
        "jwks_file": "cluster.jwks.json",
        "audiences": ["token-exchange-sidecar"],
    }
    config["clients"].append(
        {"client_id": "k8s-gateway", "kubernetes_service_account": "system:serviceaccount:gw:gw"}
    )
    config["policies"].append(
        {
            "name": "k8s-code-search",
            "client_id": "k8s-gateway",
            "audience": CODE_SEARCH,
            "scopes": ["code.read"],
            "default_scopes": ["code.read"],
        }
    )

    def service_account_token(
        *, namespace: str = "gw", audience: str = "token-exchange-sidecar", **overrides: Any
    ) -> str:
        now = int(time.time())
        claims = {
            "aud": [audience],
            "exp": now + 3600,
            "iat": now,
            "nbf": now,
            "iss": cluster,
            "jti": str(uuid.uuid4()),
            "kubernetes.io": {
                "namespace": namespace,
                "serviceaccount": {"name": "gw", "uid": str(uuid.uuid4())},
            },
            "sub": f"system:serviceaccount:{namespace}:gw",
            **overrides,
        }
        return jwt.encode(claims, key, algorithm="RS256", headers={"kid": "cluster-1"})

    def exchange_as(assertion: str) -> requests.Response:
        return requests.post(
            served.token_url,
            data={
                "grant_type": TOKEN_EXCHANGE,
                "subject_token": idp.token(),
                "subject_token_type": ACCESS_TOKEN_TYPE,
                "audience": CODE_SEARCH,
                "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                "client_assertion": assertion,
            },
            timeout=10,
        )

    refused = {
        "wrong audience": service_account_token(audience="https://kubernetes.default.svc"),
        "expired": service_account_token(exp=int(time.time()) - 120, iat=int(time.time()) - 4000),
        "another issuer": service_account_token(iss="https://other-cluster.example"),
        "another namespace": service_account_token(namespace="other"),
    }
    served = start_serve(tmp_path, config)
    try:
        response = exchange_as(service_account_token())
        assert response.status_code == 200, response.text
        token = response.json()["access_token"]
        jwks = jwt.PyJWKClient(f"{served.url}/.well-known/jwks.json")
        claims = verify_as_upstream(jwks, token)
        answers = {case: exchange_as(assertion) for case, assertion in refused.items()}
    finally:
        served.kill()
    assert claims["client_id"] == "k8s-gateway"
    for case, answer in answers.items():
        assert (case, answer.status_code, answer.json()["error"]) == (case, 401, "invalid_client")


@pytest.mark.parametrize("server", ["granian", "gunicorn"])
def test_json_logs_carry_every_record_and_the_request_id(tmp_path: Path, server: str) -> None:
    import json as json_module

    idp = TestIdP(tmp_path)
    config: dict[str, Any] = base_config(idp, ClientKeys(), f"sqlite:///{tmp_path / 's.db'}")
    config["log"] = {"format": "json"}
    served = start_serve(tmp_path, config, "--server", server)
    subject = idp.token()
    try:
        response = exchange(served, subject, headers={"X-Request-ID": "gw-req-0001"})
        denied = exchange(
            served,
            subject,
            audience="https://nowhere.internal/mcp",
            headers={"X-Request-ID": "gw-req-0002"},
        )
        wrong_secret = "wrong-" + GATEWAY_SECRET
        unauthenticated = exchange(
            served, subject, secret=wrong_secret, headers={"X-Request-ID": "gw-req-0003"}
        )
        generated = requests.get(f"{served.url}/healthz", timeout=5).headers["X-Request-ID"]
        assert wait_for(lambda: '"gw-req-0003"' in served.log(), 5)
    finally:
        # Not a test of shutdown (gunicorn drains for up to graceful_timeout): the records
        # asserted below are written by now.
        served.kill()
    assert response.status_code == 200
    assert response.headers["X-Request-ID"] == "gw-req-0001"
    assert len(generated) == 32
    lines = [line for line in served.log().splitlines() if line.strip()]
    records = [json_module.loads(line) for line in lines]  # every line is one JSON object
    assert {"granian" if server == "granian" else "gunicorn.error"} & {
        r["logger"].lstrip("_") for r in records
    }
    for record in records:
        assert record["time"].endswith("Z")
        assert {"level", "logger", "message"} <= record.keys()
    exchanges = {r["request_id"]: r for r in records if r.get("message") == "exchange"}
    assert (denied.status_code, unauthenticated.status_code) == (400, 401)
    granted = exchanges["gw-req-0001"]
    minted = jwt.decode(response.json()["access_token"], options={"verify_signature": False})
    assert granted["decision"] == "granted"
    assert granted["client_id"] == "gateway"
    assert granted["audiences"] == [CODE_SEARCH]
    assert granted["jti"] == minted["jti"]  # the minted token is named by its jti, never shown
    assert granted["latency_ms"] > 0
    assert granted["policies"].endswith("@1")
    refused = exchanges["gw-req-0002"]
    assert (refused["decision"], refused["error"]) == ("denied", "invalid_target")
    assert refused["audiences"] == ["https://nowhere.internal/mcp"]
    assert refused["reason"]
    assert refused["client_id"] == "gateway"
    assert refused["latency_ms"] > 0
    assert exchanges["gw-req-0003"]["error"] == "invalid_client"
    log = served.log()
    for secret in (subject, response.json()["access_token"], GATEWAY_SECRET, wrong_secret):
        assert secret not in log
