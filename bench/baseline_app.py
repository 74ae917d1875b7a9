"""The benchmark's baseline: a bare Flask app doing only the work no token-exchange service can
skip, served by gunicorn with 2 sync workers (see bench/run.py).

Per request: parse the form, verify one RS256 subject token with PyJWT against a fixed public
key, sign one ES256 token with a fixed key, answer JSON. No client authentication, policy,
database or audit: it is the floor the real service is measured against, not a service.

Configured by environment variables (set by bench/run.py):
``BENCH_IDP_PUBLIC_KEY`` and ``BENCH_SIGNING_KEY`` (PEM files), ``BENCH_IDP_ISSUER`` and
``BENCH_IDP_AUDIENCE`` (what the subject token must carry), ``BENCH_ISSUER`` (the minted `iss`).

    gunicorn --workers 2 --worker-class sync 'bench.baseline_app:create_app()'
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_pem_public_key
from flask import Flask, jsonify, request

TOKEN_TTL = 120


def create_app() -> Flask:
    # Keys are parsed once per worker, not per request: the baseline is meant to be fast.
    idp_public_key = load_pem_public_key(Path(os.environ["BENCH_IDP_PUBLIC_KEY"]).read_bytes())
    signing_key = load_pem_private_key(
        Path(os.environ["BENCH_SIGNING_KEY"]).read_bytes(), password=None
    )
    idp_issuer = os.environ["BENCH_IDP_ISSUER"]
    idp_audience = os.environ["BENCH_IDP_AUDIENCE"]
    issuer = os.environ.get("BENCH_ISSUER", "https://baseline.bench.invalid")

    app = Flask(__name__)

    @app.get("/healthz")
    def healthz() -> Any:
        return {"status": "ok"}

    @app.post("/token")
    def token() -> Any:
        subject_token = request.form.get("subject_token")
        audience = request.form.get("audience")
        if not subject_token or not audience:
            return jsonify(error="invalid_request"), 400
        try:
            claims = jwt.decode(
                subject_token,
                idp_public_key,  # type: ignore[arg-type]
                algorithms=["RS256"],
                audience=idp_audience,
                issuer=idp_issuer,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.InvalidTokenError:
            return jsonify(error="invalid_request"), 400
        now = int(time.time())
        access_token = jwt.encode(
            {
                "iss": issuer,
                "sub": claims["sub"],
                "aud": audience,
                "scope": claims.get("scope", ""),
                "iat": now,
                "exp": now + TOKEN_TTL,
                "jti": secrets.token_urlsafe(16),
            },
            signing_key,  # type: ignore[arg-type]
            algorithm="ES256",
            headers={"typ": "at+jwt", "kid": "baseline-1"},
        )
        response = jsonify(
            access_token=access_token,
            issued_token_type="urn:ietf:params:oauth:token-type:access_token",
            token_type="Bearer",
            expires_in=TOKEN_TTL,
        )
        response.headers["Cache-Control"] = "no-store"
        return response

    return app
