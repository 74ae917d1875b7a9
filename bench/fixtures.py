"""What the benchmark runs against: an identity provider's RS256 key and JWKS, distinct subject
tokens, the baseline's keys, and a realistic configuration of the real service, in two files that
differ only in ``caches:`` (the defaults, both caches on; and both off).

Everything is generated under one temporary directory per run; no key leaves it.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jwt
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import RSAAlgorithm

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
IDP_ISSUER = "https://idp.bench.invalid"
IDP_KID = "bench-rsa-1"
# The gateway's own identifier: every subject token is addressed to it.
GATEWAY_AUDIENCE = "https://gateway.bench.invalid"
SERVICE_ISSUER = "https://sidecar.bench.invalid"
SUBJECT_TOKEN_LIFETIME = 3600
FORM = "application/x-www-form-urlencoded"
# The uncached path's `caches:`: every subject token verified and every token minted afresh.
NO_CACHES = {"subject_tokens": {"enabled": False}, "minted_tokens": {"enabled": False}}


@dataclass(frozen=True)
class Sizes:
    tokens: int = 1500
    clients: int = 50
    policies_per_client: int = 10
    threads: int | None = None  # server.threads of the service; None: the product's default


@dataclass(frozen=True)
class Fixtures:
    directory: Path
    bodies: Path  # one url-encoded token-exchange form per line, every subject token distinct
    service_config: Path  # the caches as configured by default (both enabled)
    uncached_config: Path  # the same, with both caches disabled (the same database)
    auth_header: str  # the Basic credentials of the client whose policies allow the audience
    client_id: str
    audience: str
    baseline_env: dict[str, str]


def upstream(index: int) -> str:
    return f"https://upstream-{index:02d}.bench.invalid/mcp"


def client_name(index: int) -> str:
    return f"gateway-{index:02d}"


def _pem_private(key: Any) -> bytes:
    return bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _pem_public(key: Any) -> bytes:
    return bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def subject_tokens(idp_key: rsa.RSAPrivateKey, count: int) -> list[str]:
    """``count`` distinct RS256 access tokens of the IdP, valid for an hour."""
    now = int(time.time())
    return [
        jwt.encode(
            {
                "iss": IDP_ISSUER,
                "sub": f"user-{index:05d}@bench.example",
                "aud": GATEWAY_AUDIENCE,
                "iat": now,
                "exp": now + SUBJECT_TOKEN_LIFETIME,
                "scope": "openid profile",
                "jti": secrets.token_urlsafe(12),
            },
            idp_key,
            algorithm="RS256",
            headers={"kid": IDP_KID, "typ": "at+jwt"},
        )
        for index in range(count)
    ]


def service_config(
    directory: Path, jwks_file: Path, sizes: Sizes
) -> tuple[dict[str, Any], dict[str, str]]:
    """The service's configuration (SQLite file, the clients, the policies) and the secrets."""
    secrets_by_client = {client_name(c): secrets.token_urlsafe(24) for c in range(sizes.clients)}
    policies = [
        {
            "client_id": client_name(c),
            "audience": upstream(u),
            "scopes": [f"svc{u:02d}.read", f"svc{u:02d}.write"],
            "default_scopes": [f"svc{u:02d}.read"],
            "ttl": 120,
        }
        for c in range(sizes.clients)
        for u in range(sizes.policies_per_client)
    ]
    config = {
        "issuer": SERVICE_ISSUER,
        "database_url": f"sqlite:///{directory / 'sidecar.db'}",
        "tokens": {"algorithm": "ES256", "max_ttl": 300, "leeway": 30},
        "trusted_issuers": [
            {
                "issuer": IDP_ISSUER,
                "jwks_file": str(jwks_file),
                "audiences": [GATEWAY_AUDIENCE],
                "algorithms": ["RS256"],
            }
        ],
        "clients": [
            {"client_id": client_id, "client_secret": secret}
            for client_id, secret in secrets_by_client.items()
        ],
        "policies": policies,
    }
    return config, secrets_by_client


def generate(directory: Path, sizes: Sizes) -> Fixtures:
    idp_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = RSAAlgorithm.to_jwk(idp_key.public_key(), as_dict=True)
    jwk.update(kid=IDP_KID, alg="RS256", use="sig")
    jwks_file = directory / "idp.jwks.json"
    jwks_file.write_text(json.dumps({"keys": [jwk]}))
    (directory / "idp-public.pem").write_bytes(_pem_public(idp_key))
    (directory / "baseline-signing.pem").write_bytes(
        _pem_private(ec.generate_private_key(ec.SECP256R1()))
    )

    config, secrets_by_client = service_config(directory, jwks_file, sizes)
    if sizes.threads is not None:
        config["server"] = {"threads": sizes.threads}
    config_file = directory / "sidecar.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    uncached_file = directory / "sidecar-uncached.yaml"
    uncached_file.write_text(yaml.safe_dump({**config, "caches": NO_CACHES}, sort_keys=False))

    # A client and an audience from the middle of the tables, which its policies allow.
    client_id = client_name(sizes.clients // 2)
    audience = upstream(sizes.policies_per_client // 2)
    credentials = f"{client_id}:{secrets_by_client[client_id]}".encode()
    auth_header = "Basic " + base64.b64encode(credentials).decode()

    bodies = directory / "bodies.txt"
    bodies.write_text(
        "".join(
            urlencode(
                {
                    "grant_type": TOKEN_EXCHANGE,
                    "subject_token": token,
                    "subject_token_type": ACCESS_TOKEN_TYPE,
                    "audience": audience,
                }
            )
            + "\n"
            for token in subject_tokens(idp_key, sizes.tokens)
        )
    )
    baseline_env = {
        "BENCH_IDP_PUBLIC_KEY": str(directory / "idp-public.pem"),
        "BENCH_SIGNING_KEY": str(directory / "baseline-signing.pem"),
        "BENCH_IDP_ISSUER": IDP_ISSUER,
        "BENCH_IDP_AUDIENCE": GATEWAY_AUDIENCE,
    }
    return Fixtures(
        directory=directory,
        bodies=bodies,
        service_config=config_file,
        uncached_config=uncached_file,
        auth_header=auth_header,
        client_id=client_id,
        audience=audience,
        baseline_env=baseline_env,
    )
