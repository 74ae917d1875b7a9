"""The endpoints beside /token, over real HTTP (docs/design.md §3): the JWKS, RFC 8414 metadata, the
health and readiness probes, and Prometheus metrics."""

from __future__ import annotations

import re
from typing import Any

import jwt
import pytest
import requests
from authlib.oauth2.rfc8414 import AuthorizationServerMetadata
from jwt import PyJWK
from prometheus_client.parser import text_string_to_metric_families

from sidecar.services import Services
from tests.conftest import SIDECAR_ISSUER, TOKEN_EXCHANGE, LiveServer, TestIdP

PRIVATE_JWK_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}


def get(server: LiveServer, path: str) -> requests.Response:
    return requests.get(f"{server.url}{path}", timeout=10)


# --- /.well-known/jwks.json --------------------------------------------------------------------


def test_jwks_publishes_public_signing_keys_only(server: LiveServer) -> None:
    response = get(server, "/.well-known/jwks.json")

    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    keys = response.json()["keys"]
    assert keys
    for jwk in keys:
        assert isinstance(jwk["kid"], str)
        assert jwk["kid"]
        assert jwk["alg"] == "ES256"
        assert jwk["use"] == "sig"
        assert not PRIVATE_JWK_MEMBERS & set(jwk), jwk
        assert PyJWK(jwk).algorithm_name == "ES256"  # a usable public key


def test_jwks_may_be_cached_for_a_bounded_time(server: LiveServer, services: Services) -> None:
    response = get(server, "/.well-known/jwks.json")
    match = re.search(r"(?:^|[ ,])max-age=(\d+)(?:$|[ ,])", response.headers["Cache-Control"])
    assert match, response.headers["Cache-Control"]
    # Cached no longer than a new key is published before it signs, so verifiers see it in time.
    assert 0 < int(match.group(1)) <= services.settings.keys.publish_ahead
    assert "no-store" not in response.headers["Cache-Control"]


def test_jwks_holds_the_key_that_signs_minted_tokens(server: LiveServer, idp: TestIdP) -> None:
    token = server.exchange(idp.token()).json()["access_token"]
    kids = {jwk["kid"] for jwk in get(server, "/.well-known/jwks.json").json()["keys"]}
    assert jwt.get_unverified_header(token)["kid"] in kids


def test_jwks_publishes_the_next_key_before_it_signs(
    server: LiveServer, services: Services
) -> None:
    before = {jwk["kid"] for jwk in get(server, "/.well-known/jwks.json").json()["keys"]}
    upcoming = services.keys.rotate()
    services.keyring.invalidate()

    after = {jwk["kid"] for jwk in get(server, "/.well-known/jwks.json").json()["keys"]}

    assert after == before | {upcoming.kid}
    assert services.signing_key().kid in before  # the old key still signs until activation


# --- /.well-known/oauth-authorization-server ---------------------------------------------------


@pytest.fixture
def metadata(server: LiveServer) -> dict[str, Any]:
    response = get(server, "/.well-known/oauth-authorization-server")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    document: dict[str, Any] = response.json()
    return document


def test_metadata_names_this_server_and_its_endpoints(metadata: dict[str, Any]) -> None:
    # RFC 8414 §3.3: the issuer in the document is identical to the issuer the client expects.
    assert metadata["issuer"] == SIDECAR_ISSUER
    assert metadata["token_endpoint"] == SIDECAR_ISSUER + "/token"
    assert metadata["jwks_uri"] == SIDECAR_ISSUER + "/.well-known/jwks.json"
    assert "authorization_endpoint" not in metadata


def test_metadata_advertises_token_exchange_and_the_auth_methods(metadata: dict[str, Any]) -> None:
    assert TOKEN_EXCHANGE in metadata["grant_types_supported"]
    assert "authorization_code" not in metadata["grant_types_supported"]
    assert set(metadata["token_endpoint_auth_methods_supported"]) == {
        "client_secret_basic",
        "client_secret_post",
        "private_key_jwt",
    }
    assert "none" not in metadata["token_endpoint_auth_signing_alg_values_supported"]


def test_metadata_passes_authlibs_rfc8414_checks(metadata: dict[str, Any]) -> None:
    document = AuthorizationServerMetadata(metadata)
    document.validate_issuer()
    document.validate_token_endpoint()
    document.validate_jwks_uri()
    document.validate_grant_types_supported()
    document.validate_token_endpoint_auth_methods_supported()
    document.validate_token_endpoint_auth_signing_alg_values_supported()
    document.validate_authorization_endpoint()  # not required: no grant uses it


# --- probes ------------------------------------------------------------------------------------


def test_healthz_answers_while_the_process_lives(server: LiveServer) -> None:
    response = get(server, "/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_is_200_with_the_database_and_a_signing_key(server: LiveServer) -> None:
    response = get(server, "/readyz")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ready",
        "checks": {"database": True, "signing_key": True, "serving": True},
    }


# --- /metrics ----------------------------------------------------------------------------------


def token_request_counts(server: LiveServer) -> dict[tuple[str, str], float]:
    response = get(server, "/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    counts = {}
    for family in text_string_to_metric_families(response.text):
        if family.name == "sidecar_token_requests":
            assert family.type == "counter"
            for sample in family.samples:
                if sample.name == "sidecar_token_requests_total":
                    key = (sample.labels["outcome"], sample.labels["error"])
                    counts[key] = sample.value
    return counts


def test_metrics_count_token_requests_by_outcome_and_error(
    server: LiveServer, idp: TestIdP
) -> None:
    subject = idp.token()
    assert server.exchange(subject).status_code == 200
    assert server.exchange(subject).status_code == 200
    assert server.exchange(subject, audience="https://payments.internal/mcp").status_code == 400
    assert server.exchange(subject, auth=None).status_code == 401

    counts = token_request_counts(server)

    assert counts[("granted", "")] == 2
    assert counts[("denied", "invalid_target")] == 1
    assert counts[("denied", "invalid_client")] == 1


def test_metrics_hold_no_token_or_client_input(server: LiveServer, idp: TestIdP) -> None:
    subject = idp.token()
    server.exchange(subject, audience="https://payments.internal/mcp")
    text = get(server, "/metrics").text
    assert subject not in text
    assert "payments.internal" not in text  # labels are bounded: outcome and error code only
