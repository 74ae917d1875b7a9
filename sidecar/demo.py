"""The demo identity provider behind ``make run``: a generated key under ``keys/`` (git-ignored)
whose public JWKS the demo configuration trusts, and subject tokens signed with it."""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import Any

import jwt

from sidecar.keys.material import (
    generate_private_key,
    private_key_from_pem,
    private_key_to_pem,
    public_jwk,
)

DEMO_ALGORITHM = "ES256"
# The claims demo_token sets itself: `extra` may not replace them (sub and scope are arguments).
SET_BY_DEMO_TOKEN = frozenset({"iss", "sub", "aud", "scope", "iat", "exp", "jti"})


class DemoKeyConflict(Exception):
    """The JWKS file exists without the demo key that would have made it."""


def init_demo_idp(private_path: Path, jwks_path: Path) -> bool:
    """Create the demo IdP key pair if absent; True if created. Never writes over a JWKS file
    it did not create: pointed at a real configuration, it would replace the trusted issuer's
    keys with a key lying on local disk."""
    if private_path.exists() and jwks_path.exists():
        return False
    if private_path.exists():  # the JWKS alone is missing: publish the key that exists
        key = private_key_from_pem(private_path.read_bytes())
        jwks_path.parent.mkdir(parents=True, exist_ok=True)
        jwks_path.write_text(
            json.dumps({"keys": [public_jwk(key, DEMO_ALGORITHM)]}, indent=2) + "\n"
        )
        return True
    if jwks_path.exists():
        raise DemoKeyConflict(
            f"{jwks_path} exists but the demo key {private_path} does not: demo-init writes "
            "only a JWKS it creates (remove the file, or point jwks_file elsewhere)"
        )
    key = generate_private_key(DEMO_ALGORITHM)
    private_path.parent.mkdir(parents=True, exist_ok=True)
    private_path.write_bytes(private_key_to_pem(key))
    private_path.chmod(0o600)
    _write_jwks(jwks_path, key)
    return True


def _write_jwks(jwks_path: Path, key: Any) -> None:
    jwks_path.parent.mkdir(parents=True, exist_ok=True)
    jwks_path.write_text(json.dumps({"keys": [public_jwk(key, DEMO_ALGORITHM)]}, indent=2) + "\n")


def demo_token(
    private_path: Path,
    *,
    issuer: str,
    audience: str,
    subject: str,
    scope: str,
    ttl: int,
    extra: dict[str, Any] | None = None,
) -> str:
    """A subject token of the demo IdP; ``extra`` adds claims (``groups``, ``tenant``...) for
    policies with subject conditions, but may not replace the ones that make it a token of the
    demo IdP for the gateway (ValueError)."""
    if replaced := sorted(SET_BY_DEMO_TOKEN.intersection(extra or {})):
        raise ValueError(f"demo_token sets {', '.join(replaced)} itself")
    key = private_key_from_pem(private_path.read_bytes())
    now = int(time.time())
    claims = {
        "iss": issuer,
        "sub": subject,
        "aud": audience,
        "scope": scope,
        "iat": now,
        "exp": now + ttl,
        "jti": secrets.token_urlsafe(12),
        **(extra or {}),
    }
    kid = public_jwk(key, DEMO_ALGORITHM)["kid"]
    return jwt.encode(claims, key, algorithm=DEMO_ALGORITHM, headers={"kid": kid, "typ": "at+jwt"})
