"""The apps of the demo: the two upstreams (*code-search*, verifying the sidecar's tokens, and
*vendor*, knowing only its own API key), the recorder in front of each, and the gateway."""

from __future__ import annotations

import hmac
import io
import json
import time
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

import jwt
import requests
from flask import Flask, Response, g, jsonify, request
from werkzeug.wrappers import Request

from sidecar.client import ExchangeError, TokenExchangeClient
from sidecar.verify import TokenVerifier, VerificationError, VerifiedToken, bearer_token

from .narration import Story, fingerprint, masked
from .world import API_KEY_TYPE, ROUTES, RecordedRequest


class Recorder:
    """WSGI middleware: records every request an upstream receives, then passes it on."""

    def __init__(self, app: WSGIApplication, into: list[RecordedRequest], story: Story) -> None:
        self.app, self.into, self.story = app, into, story

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        received = Request(environ)
        body = received.get_data()
        environ["wsgi.input"] = io.BytesIO(body)  # read here; the app reads it again
        path, headers = environ.get("REQUEST_URI") or received.full_path, received.headers
        self.into.append(
            RecordedRequest(self.story.step.name, received.method, path, list(headers), body)
        )
        return self.app(environ, start_response)


class ExplainingVerifier(TokenVerifier):
    """code-search's verifier, remembering why it last refused (a real upstream logs it)."""

    refusal = ""

    def verify(self, token: str, *, scopes: Iterable[str] = ()) -> VerifiedToken:
        try:
            return super().verify(token, scopes=scopes)
        except VerificationError as exc:
            self.refusal = str(exc)
            raise


def idp_app(story: Story, jwks: bytes, sign: Callable[[str], str | None]) -> Flask:
    """The demo identity provider: its JWKS (which the sidecar fetches), and a login that hands
    a known user a token for the gateway (``sign``: the token of a user, None for a stranger).
    No password: a demo, on loopback only."""
    app = Flask("demo-idp")

    @app.get("/.well-known/jwks.json")
    def keys() -> Response:
        return Response(jwks, content_type="application/json")

    @app.post("/login")
    def login() -> Any:
        user = request.form.get("username", "")
        token = sign(user)
        if token is None:
            return {"error": "unknown user"}, 401
        story.say(f"POST /login {user}: token {fingerprint(token)}", "demo IdP -> user")
        return {"access_token": token, "token_type": "Bearer"}

    return app


def code_search_app(story: Story, verifier: ExplainingVerifier) -> Flask:
    app = Flask("demo-code-search")

    @app.get("/search")
    @verifier.require("code.read")
    def search() -> Any:
        token: VerifiedToken = g.token
        scope, actors = " ".join(sorted(token.scopes)), " > ".join(token.actors)
        story.verdict("code-search", f"accepted (sub={token.subject}, scope={scope}, act={actors})")
        story.more("checked with the sidecar's JWKS: signature, typ, iss, aud, exp, scope")
        return {"results": ["sidecar/client.py", "sidecar/verify/"]}

    @app.after_request
    def explain_refusal(response: Response) -> Response:
        if response.status_code >= 400:
            error = (response.get_json(silent=True) or {}).get("error")
            reason = f"refused {response.status_code} {error} ({verifier.refusal})"
            story.verdict("code-search", reason)
        return response

    return app


def vendor_app(story: Story, api_key: str) -> Flask:
    app = Flask("demo-vendor")
    expected = f"Bearer {api_key}".encode()

    @app.get("/tickets")
    def tickets() -> Any:
        if hmac.compare_digest(request.headers.get("Authorization", "").encode(), expected):
            story.verdict("vendor", "accepted (its own API key: it knows no users and no JWTs)")
            return {"tickets": ["DEMO-1", "DEMO-2"]}
        story.verdict("vendor", "refused 401 (not its API key)")
        return {"error": "unauthorized"}, 401

    return app


def gateway_app(
    story: Story, exchanger: TokenExchangeClient, http: requests.Session, urls: dict[str, str]
) -> Flask:
    """The gateway: exchanges the user's token for the upstream's credential and calls the
    upstream with that credential only, in a request built afresh: nothing of the user's is
    forwarded. (A real gateway also validates the user's token; the sidecar does it again.)"""
    app = Flask("demo-gateway")

    @app.get("/<upstream>/<operation>")
    def forward(upstream: str, operation: str) -> Any:
        user_token = bearer_token(request.headers.get("Authorization"))
        if request.path not in ROUTES or user_token is None:
            return {"error": "not_found"}, 404
        name, audience, scope, path = ROUTES[request.path]
        story.say(
            f"GET {request.path} with user token {fingerprint(user_token)}", "user -> gateway"
        )
        story.say(f"POST /token audience={audience} scope={scope}", "gateway -> sidecar")
        try:
            credential = exchanger.exchange(user_token, audience, scope=scope)
        except ExchangeError as exc:
            story.step.exchange = exc.error
            story.say(f"{exc.status} {exc.error}: nothing is sent upstream", "sidecar -> gateway")
            return jsonify(error=exc.error), 403
        if credential.issued_token_type == API_KEY_TYPE:
            story.step.exchange, shown = "static", masked(credential.access_token)
            story.say(f"200 (static): the {name} API key {shown}", "sidecar -> gateway")
        else:
            story.step.exchange, shown = "mint", fingerprint(credential.access_token)
            story.say(f"200 (mint): a token {shown} for {name} only", "sidecar -> gateway")
            _show_claims(story, credential.access_token)
        story.say(f"GET {path} with Authorization: Bearer {shown}", f"gateway -> {name}")
        story.step.upstream = name
        answer = http.get(urls[name] + path, headers=credential.headers(), timeout=10)
        story.step.upstream_status = answer.status_code
        return Response(answer.content, answer.status_code, content_type="application/json")

    return app


def _show_claims(story: Story, token: str) -> None:
    # Decoded for display only: verifying is code-search's business.
    claims = jwt.decode(token, options={"verify_signature": False})
    act = json.dumps(claims.get("act"), separators=(",", ":"))
    story.more(f"iss={claims['iss']} sub={claims['sub']}")
    story.more(f"aud={claims['aud']} scope={claims.get('scope')}")
    story.more(f"act={act} exp=in {int(claims['exp']) - int(time.time())} s")
