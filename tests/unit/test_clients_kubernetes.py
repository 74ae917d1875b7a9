"""Kubernetes service-account tokens as client assertions (sidecar/clients.py
``ServiceAccountTokens``): tokens shaped exactly like a cluster's projected tokens (issuer,
``kubernetes.io`` claims, expiry, audience), signed with a key generated here and published as
the cluster's JWKS file; no database, no server."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from sidecar.clients import CLIENT_ASSERTION_TYPE, ClientAuthenticator
from sidecar.config import ConfigError, Settings, settings_from_mapping
from sidecar.errors import InvalidClientError
from sidecar.exchange.request import parse_form
from tests.unit.support import InMemoryJtis, never_fetch

CLUSTER = "https://kubernetes.default.svc.cluster.local"
AUDIENCE = "token-exchange-sidecar"
ACCOUNT = "system:serviceaccount:gateways:gateway"


class Cluster:
    """A cluster's service-account token issuer: its signing key and JWKS file."""

    def __init__(self, directory: Path) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = RSAAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        jwk.update(kid="cluster-1", alg="RS256", use="sig")
        self.jwks_file = directory / "cluster.jwks.json"
        self.jwks_file.write_text(json.dumps({"keys": [jwk]}))

    def token(
        self,
        *,
        namespace: str = "gateways",
        name: str = "gateway",
        lifetime: int = 3600,
        key: Any = None,
        **overrides: Any,
    ) -> str:
        """A projected service-account token as the kubelet receives it (k8s 1.30 shape)."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "aud": [AUDIENCE],
            "exp": now + lifetime,
            "iat": now,
            "nbf": now,
            "iss": CLUSTER,
            "jti": str(uuid.uuid4()),
            "kubernetes.io": {
                "namespace": namespace,
                "node": {"name": "node-1", "uid": str(uuid.uuid4())},
                "pod": {"name": f"{name}-7d9f8b6c5-abcde", "uid": str(uuid.uuid4())},
                "serviceaccount": {"name": name, "uid": str(uuid.uuid4())},
            },
            "sub": f"system:serviceaccount:{namespace}:{name}",
        }
        claims.update(overrides)
        return jwt.encode(claims, key or self.key, algorithm="RS256", headers={"kid": "cluster-1"})


@pytest.fixture
def cluster(tmp_path: Path) -> Cluster:
    return Cluster(tmp_path)


def with_cluster(config: dict[str, Any], cluster: Cluster) -> Settings:
    config = {
        **config,
        "kubernetes": {
            "issuer": CLUSTER,
            "jwks_file": str(cluster.jwks_file),
            "audiences": [AUDIENCE],
            "algorithms": ["RS256"],
        },
        "clients": [
            *config["clients"],
            {"client_id": "k8s-gateway", "kubernetes_service_account": ACCOUNT},
        ],
    }
    return settings_from_mapping(config, env={})


def authenticate(settings: Settings, assertion: str, **extra: str) -> str:
    authenticator = ClientAuthenticator(settings, InMemoryJtis(), time.time, never_fetch)
    form = parse_form(
        "&".join(
            f"{k}={v}"
            for k, v in {
                "client_assertion_type": CLIENT_ASSERTION_TYPE,
                "client_assertion": assertion,
                **extra,
            }.items()
        ).encode()
    )
    return authenticator.authenticate(form, None).client_id


def test_a_projected_service_account_token_authenticates_its_client(
    config: dict[str, Any], cluster: Cluster
) -> None:
    settings = with_cluster(config, cluster)

    assert authenticate(settings, cluster.token()) == "k8s-gateway"
    assert authenticate(settings, cluster.token(), client_id="k8s-gateway") == "k8s-gateway"


def test_the_same_token_authenticates_again_until_it_expires(
    config: dict[str, Any], cluster: Cluster
) -> None:
    # The kubelet hands one token to every call until it rotates it: no one-time jti.
    settings = with_cluster(config, cluster)
    token = cluster.token()

    assert [authenticate(settings, token) for _ in range(3)] == ["k8s-gateway"] * 3


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"aud": ["https://kubernetes.default.svc"]}, "audience"),
        # Another issuer's token is no service-account token here: it is tried (and fails) as
        # an ordinary private_key_jwt assertion of the client its sub names, which has no keys
        # of its own (it authenticates only with the cluster's tokens).
        ({"iss": "https://other-cluster.example"}, "client has no keys"),
        ({"exp": int(time.time()) - 120}, "expired"),
        ({"name": "intruder"}, "no client"),
        # The same account name in another namespace is another account.
        ({"namespace": "other"}, "no client"),
        (
            {"kubernetes.io": {"namespace": "other", "serviceaccount": {"name": "gateway"}}},
            "disagree",
        ),
        ({"iat": None}, "iat"),
    ],
)
def test_a_token_that_does_not_fit_is_refused(
    config: dict[str, Any], cluster: Cluster, overrides: dict[str, Any], reason: str
) -> None:
    settings = with_cluster(config, cluster)
    if overrides.get("iat", 0) is None:
        token = cluster.token()
        claims = jwt.decode(token, options={"verify_signature": False})  # to rebuild without iat
        claims.pop("iat")
        token = jwt.encode(claims, cluster.key, algorithm="RS256", headers={"kid": "cluster-1"})
    else:
        token = cluster.token(**overrides)

    with pytest.raises(InvalidClientError) as refused:
        authenticate(settings, token)

    assert reason in (refused.value.reason or "").lower()


def test_a_token_signed_by_another_key_is_refused(config: dict[str, Any], cluster: Cluster) -> None:
    settings = with_cluster(config, cluster)
    forged = cluster.token(key=rsa.generate_private_key(public_exponent=65537, key_size=2048))

    with pytest.raises(InvalidClientError):
        authenticate(settings, forged)


def test_a_long_lived_legacy_token_is_refused(config: dict[str, Any], cluster: Cluster) -> None:
    settings = with_cluster(config, cluster)

    with pytest.raises(InvalidClientError) as refused:
        authenticate(settings, cluster.token(lifetime=365 * 86400))

    assert refused.value.reason == "service account token lifetime too long"


def test_a_client_id_naming_another_client_is_refused(
    config: dict[str, Any], cluster: Cluster
) -> None:
    settings = with_cluster(config, cluster)

    with pytest.raises(InvalidClientError):
        authenticate(settings, cluster.token(), client_id="gateway")


def test_a_service_account_client_cannot_use_another_method(
    config: dict[str, Any], cluster: Cluster
) -> None:
    settings = with_cluster(config, cluster)
    authenticator = ClientAuthenticator(settings, InMemoryJtis(), time.time, never_fetch)
    form = parse_form(b"client_id=k8s-gateway&client_secret=guessed-secret-xxxxxxxxxxxxxxxxxx")

    with pytest.raises(InvalidClientError):
        authenticator.authenticate(form, None)


def test_service_account_clients_need_the_cluster_issuer(config: dict[str, Any]) -> None:
    config = {
        **config,
        "clients": [
            *config["clients"],
            {"client_id": "k8s-gateway", "kubernetes_service_account": ACCOUNT},
        ],
    }

    with pytest.raises(ConfigError, match="need a kubernetes: issuer"):
        settings_from_mapping(config, env={})


@pytest.mark.parametrize(
    "account", ["system:serviceaccount:gateways", "gateway", "system:serviceaccount:UPPER:x"]
)
def test_a_service_account_name_must_be_one(config: dict[str, Any], account: str) -> None:
    config = {
        **config,
        "clients": [{"client_id": "k8s", "kubernetes_service_account": account}],
        "policies": [],
    }
    with pytest.raises(ConfigError, match="kubernetes_service_account"):
        settings_from_mapping(config, env={})
