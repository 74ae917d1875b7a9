"""The application factory (sidecar/web/app.py, ``create_app``) through Flask's test client: the
well-known documents, the probes, the metrics, the token endpoint's refusal of other methods,
and which listener answers what when the admin API has a listener of its own."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from werkzeug.http import parse_options_header

from sidecar.config import settings_from_mapping
from sidecar.services import Services
from sidecar.web.app import create_app
from tests.conftest import (
    GATEWAY_SECRET,
    SIDECAR_ISSUER,
    TOKEN_EXCHANGE,
    audit_rows,
    make_services,
)
from tests.functional.http.admin_support import enable_admin

ADMIN_PORT = 9901
GATEWAY_PORT = 8080


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def token_requests(client: FlaskClient) -> dict[tuple[str, str], float]:
    """sidecar_token_requests_total by (outcome, error), as /metrics reports it."""
    counts = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "sidecar_token_requests_total":
                counts[sample.labels["outcome"], sample.labels["error"]] = sample.value
    return counts


# --- RFC 8414 metadata ------------------------------------------------------------------------


def test_metadata_names_the_issuer_and_its_endpoints(client: FlaskClient) -> None:
    document = client.get("/.well-known/oauth-authorization-server").json

    assert document["issuer"] == SIDECAR_ISSUER
    assert document["token_endpoint"] == f"{SIDECAR_ISSUER}/token"
    assert document["jwks_uri"] == f"{SIDECAR_ISSUER}/.well-known/jwks.json"


def test_metadata_advertises_token_exchange_only(client: FlaskClient) -> None:
    document = client.get("/.well-known/oauth-authorization-server").json

    assert document["grant_types_supported"] == [TOKEN_EXCHANGE]
    assert document["response_types_supported"] == []
    assert "authorization_endpoint" not in document


def test_metadata_lists_the_client_authentication_methods_and_algorithms(
    client: FlaskClient,
) -> None:
    document = client.get("/.well-known/oauth-authorization-server").json

    assert document["token_endpoint_auth_methods_supported"] == [
        "client_secret_basic",
        "client_secret_post",
        "private_key_jwt",
    ]
    assert document["token_endpoint_auth_signing_alg_values_supported"] == [
        "RS256",
        "PS256",
        "ES256",
        "EdDSA",
    ]


def test_metadata_may_be_cached_for_an_hour(client: FlaskClient) -> None:
    response = client.get("/.well-known/oauth-authorization-server")

    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "public, max-age=3600"
    assert response.mimetype == "application/json"


# --- JWKS -------------------------------------------------------------------------------------


def test_jwks_may_be_cached_no_longer_than_jwks_max_age(
    client: FlaskClient, services: Services
) -> None:
    response = client.get("/.well-known/jwks.json")

    assert response.status_code == 200
    max_age = services.settings.jwks_max_age
    assert 0 < max_age <= 300
    assert response.headers["Cache-Control"] == f"public, max-age={max_age}"


def test_jwks_publishes_the_signing_key_without_its_private_part(
    client: FlaskClient, services: Services
) -> None:
    keys = client.get("/.well-known/jwks.json").json["keys"]

    assert [key["kid"] for key in keys] == [services.signing_key().kid]
    assert not {"d", "p", "q", "dp", "dq", "qi"} & set(keys[0])


# --- probes -----------------------------------------------------------------------------------


def test_healthz_answers_ok(client: FlaskClient) -> None:
    response = client.get("/healthz")

    assert response.status_code == 200
    assert response.json == {"status": "ok"}


def test_readyz_is_ready_with_the_database_a_signing_key_and_no_drain(
    client: FlaskClient,
) -> None:
    response = client.get("/readyz")

    assert response.status_code == 200
    assert response.json == {
        "status": "ready",
        "checks": {"database": True, "signing_key": True, "serving": True},
    }


def test_readyz_is_503_while_draining(client: FlaskClient, services: Services) -> None:
    services.draining.set()

    response = client.get("/readyz")

    assert response.status_code == 503
    assert response.json == {
        "status": "not ready",
        "checks": {"database": True, "signing_key": True, "serving": False},
    }


def test_readyz_is_503_when_the_database_cannot_be_read(
    client: FlaskClient, services: Services, tmp_path: Path
) -> None:
    services.engine.dispose()
    (tmp_path / "sidecar.db").write_bytes(b"not a database any more" * 100)

    response = client.get("/readyz")

    assert response.status_code == 503
    assert response.json["checks"]["database"] is False
    assert response.json["checks"]["signing_key"] is True  # the keyring in hand still signs


def test_healthz_does_not_depend_on_the_database(
    client: FlaskClient, services: Services, tmp_path: Path
) -> None:
    services.engine.dispose()
    (tmp_path / "sidecar.db").write_bytes(b"not a database any more" * 100)

    assert client.get("/healthz").status_code == 200


# --- /metrics ---------------------------------------------------------------------------------


def test_metrics_are_in_the_prometheus_text_format(client: FlaskClient) -> None:
    response = client.get("/metrics")

    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    _, latest = parse_options_header(CONTENT_TYPE_LATEST)
    assert response.mimetype_params["version"] == latest["version"]
    names = {family.name for family in text_string_to_metric_families(response.text)}
    assert {"sidecar_token_requests", "sidecar_signing_keys_published"} <= names


def test_metrics_content_type_is_prometheus_clients_exactly(client: FlaskClient) -> None:
    content_type = client.get("/metrics").headers["Content-Type"]

    assert content_type == CONTENT_TYPE_LATEST
    assert content_type.count("charset=") == 1  # a repeated parameter is not a media type


# --- /token with another method ---------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_another_method_on_token_is_405_with_an_oauth_error_body(
    client: FlaskClient, method: str
) -> None:
    response = client.open("/token", method=method)

    assert response.status_code == 405
    allowed = {m.strip() for m in response.headers["Allow"].split(",")}
    assert "POST" in allowed
    assert not {"GET", "HEAD", "PUT", "DELETE"} & allowed
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["Pragma"] == "no-cache"
    assert response.json == {
        "error": "invalid_request",
        "error_description": "Method Not Allowed.",
    }


def test_get_on_token_is_audited_and_counted_as_a_denial(
    client: FlaskClient, services: Services
) -> None:
    client.get("/token?subject_token=eyJhbGciOi.should.never-be-stored")

    [row] = audit_rows(services)
    assert (row.decision, row.error, row.reason) == (
        "denied",
        "invalid_request",
        "Method Not Allowed",
    )
    assert token_requests(client)[("denied", "invalid_request")] == 1
    assert "should.never-be-stored" not in str(vars(row))


def test_another_unknown_path_is_404_and_not_audited(
    client: FlaskClient, services: Services
) -> None:
    response = client.get("/tokens")

    assert response.status_code == 404
    assert response.json["error"] == "invalid_request"
    assert audit_rows(services) == []


# --- listeners --------------------------------------------------------------------------------


@pytest.fixture
def app_for(
    config: dict[str, Any], credentials: dict[str, str], services: Services
) -> Callable[..., FlaskClient]:
    """A test client of the app for one listener, the admin API on a listener of its own (or
    beside the rest with ``listen=None``), over the test's database."""

    def build(listener: str, listen: str | None = f"127.0.0.1:{ADMIN_PORT}") -> FlaskClient:
        settings = settings_from_mapping(enable_admin(config, credentials, listen), env={})
        return create_app(settings, services, listener=listener).test_client()

    return build


def bearer(credentials: dict[str, str]) -> dict[str, str]:
    return {"Authorization": f"Bearer {credentials['ops']}"}


def on_port(port: int) -> dict[str, Any]:
    """Test-client arguments for a request that arrived on ``port`` (the Host header says
    nothing: it names the gateway)."""
    return {"environ_overrides": {"SERVER_PORT": str(port)}, "headers": {"Host": "sidecar"}}


def token_post(client: FlaskClient, **kwargs: Any) -> Any:
    return client.post(
        "/token",
        data={"grant_type": TOKEN_EXCHANGE},
        auth=("gateway", GATEWAY_SECRET),
        **kwargs,
    )


def test_the_gateway_listener_serves_everything_but_the_admin_api(
    app_for: Callable[..., FlaskClient], credentials: dict[str, str]
) -> None:
    client = app_for("gateway")

    assert client.get("/admin/policies", headers=bearer(credentials)).status_code == 404
    assert client.get("/admin/openapi.json").status_code == 404
    assert client.get("/healthz").status_code == 200
    assert client.get("/.well-known/jwks.json").status_code == 200
    assert token_post(client).status_code == 400  # reached the token endpoint


def test_the_admin_listener_serves_the_admin_api_only(
    app_for: Callable[..., FlaskClient], credentials: dict[str, str]
) -> None:
    client = app_for("admin")

    assert client.get("/admin/policies", headers=bearer(credentials)).status_code == 200
    assert client.get("/admin/openapi.json").status_code == 200
    for path in ("/healthz", "/readyz", "/metrics", "/.well-known/jwks.json"):
        assert client.get(path).status_code == 404, path
    refused = token_post(client)
    assert refused.status_code == 404
    assert refused.json == {"error": "not_found", "error_description": "Not found."}


def test_a_server_binding_both_tells_the_listeners_apart_by_the_local_port(
    app_for: Callable[..., FlaskClient], credentials: dict[str, str]
) -> None:
    client = app_for("any")
    admin, gateway = on_port(ADMIN_PORT), on_port(GATEWAY_PORT)
    admin_headers = {**admin["headers"], **bearer(credentials)}
    gateway_headers = {**gateway["headers"], **bearer(credentials)}

    on_admin = client.get(
        "/admin/policies", environ_overrides=admin["environ_overrides"], headers=admin_headers
    )
    on_gateway = client.get(
        "/admin/policies", environ_overrides=gateway["environ_overrides"], headers=gateway_headers
    )

    assert on_admin.status_code == 200
    assert on_gateway.status_code == 404
    assert client.get("/healthz", **admin).status_code == 404
    assert client.get("/healthz", **gateway).status_code == 200
    assert token_post(client, **admin).status_code == 404
    assert token_post(client, **gateway).status_code == 400


def test_a_host_header_naming_the_admin_port_does_not_reach_the_admin_api(
    app_for: Callable[..., FlaskClient], credentials: dict[str, str]
) -> None:
    client = app_for("any")

    response = client.get(
        "/admin/policies",
        environ_overrides={"SERVER_PORT": str(GATEWAY_PORT)},
        headers={"Host": f"127.0.0.1:{ADMIN_PORT}", **bearer(credentials)},
    )

    assert response.status_code == 404


@pytest.mark.parametrize("listener", ["gateway", "any"])
def test_without_admin_listen_the_admin_api_is_served_beside_the_rest(
    app_for: Callable[..., FlaskClient], credentials: dict[str, str], listener: str
) -> None:
    client = app_for(listener, listen=None)

    assert client.get("/admin/policies", headers=bearer(credentials)).status_code == 200
    assert client.get("/healthz").status_code == 200
    assert token_post(client).status_code == 400


def test_without_admin_configuration_the_admin_api_does_not_exist(
    client: FlaskClient,
) -> None:
    assert client.get("/admin/openapi.json").status_code == 404
    assert client.get("/admin/policies").status_code == 404


def test_an_app_made_without_services_builds_its_own(settings: Any, services: Services) -> None:
    app = create_app(settings)  # as a worker does; ``services`` prepared the database
    built = app.extensions["sidecar"]
    try:
        assert built is not services
        assert app.test_client().get("/readyz").status_code == 200
    finally:
        built.close()


def test_each_app_counts_its_own_requests(settings: Any, services: Services) -> None:
    other_services = make_services(settings)
    try:
        first = create_app(settings, services).test_client()
        second = create_app(settings, other_services).test_client()
        first.get("/token")

        assert token_requests(first)[("denied", "invalid_request")] == 1
        assert ("denied", "invalid_request") not in token_requests(second)
    finally:
        other_services.close()
