"""The Flask application factory and its views.

Views do not build error bodies: a protocol error raised anywhere leaves through
:func:`protocol_error_response`, anything else through :func:`unexpected_error_response`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from authlib.oauth2.rfc8414 import AuthorizationServerMetadata
from flask import Flask, Response, request
from prometheus_client import CONTENT_TYPE_LATEST
from werkzeug.exceptions import HTTPException

from sidecar.audit import AuditEvent
from sidecar.config import Settings
from sidecar.config.common import parse_listen
from sidecar.errors import (
    ProtocolError,
)
from sidecar.exchange.request import MAX_BODY_BYTES, TOKEN_EXCHANGE_GRANT
from sidecar.metrics import KeyringCollector, Metrics
from sidecar.services import Services
from sidecar.store.db import observe_errors
from sidecar.web.admin import admin_blueprint
from sidecar.web.bodies import CloseOnUnreadBody
from sidecar.web.ext_authz import ExtAuthzEndpoint
from sidecar.web.responses import (
    NO_STORE,
    json_response,
    protocol_error_response,
    unexpected_error_response,
)
from sidecar.web.token import TokenEndpoint, TokenRouter

log = logging.getLogger(__name__)

FORM_TYPE = "application/x-www-form-urlencoded"


def http_error_response(exc: HTTPException) -> Response:
    status = exc.code or 500
    if status >= 500:
        return unexpected_error_response(exc)
    headers = {k: v for k, v in exc.get_headers() if k.lower() == "allow"}
    body = {"error": "invalid_request", "error_description": exc.name + "."}
    return json_response(body, status, {**NO_STORE, **headers})


def server_metadata(settings: Settings) -> dict[str, Any]:
    """RFC 8414 §2 authorization server metadata."""
    metadata = AuthorizationServerMetadata(
        {
            "issuer": settings.issuer,
            "token_endpoint": settings.token_endpoint,
            "jwks_uri": settings.jwks_uri,
            "grant_types_supported": [TOKEN_EXCHANGE_GRANT],
            "token_endpoint_auth_methods_supported": [
                "client_secret_basic",
                "client_secret_post",
                "private_key_jwt",
            ],
            "token_endpoint_auth_signing_alg_values_supported": [
                "RS256",
                "PS256",
                "ES256",
                "EdDSA",
            ],
            # No authorization endpoint: this server issues tokens only by exchange.
            "response_types_supported": [],
            "service_documentation": "https://github.com/token-exchange-sidecar#readme",
        }
    )
    metadata.validate_token_endpoint()
    metadata.validate_jwks_uri()
    metadata.validate_grant_types_supported()
    metadata.validate_token_endpoint_auth_methods_supported()
    return dict(metadata)


def create_app(
    settings: Settings, services: Services | None = None, *, listener: str = "any"
) -> Flask:
    """The application factory; ``services`` lets tests pass their own clock, fetcher or engine.

    ``listener`` says which listener the app serves when ``admin.listen`` or
    ``management.listen`` give listeners of their own: ``"gateway"``, ``"admin"`` (only /admin),
    ``"management"`` (only the JWKS, metadata, health and metrics), or ``"any"`` (a server that
    binds them all in one process: told apart by the local port)."""
    services = services or Services(settings)
    metrics = Metrics()
    metrics.add_collector(
        KeyringCollector(
            services.keyring.get,
            services.clock,
            rotate_every=settings.keys.rotate_every,
            publish_ahead=settings.keys.publish_ahead,
        )
    )
    for name, cache in (
        ("subject_tokens", services.grant.subject_cache),
        ("minted_tokens", services.grant.minted_cache),
    ):
        if cache is not None:
            cache.stats.observe = metrics.cache_observer(name)
    services.audit.observe_pending = metrics.audit_queue.set
    services.audit.observe_failure = metrics.audit_write_failures.inc
    observe_errors(services.engine, lambda kind: metrics.database_errors.labels(kind).inc())
    if services.upstreams is not None:
        services.upstreams.observe_fetches(
            lambda upstream, outcome: metrics.upstream_token_fetches.labels(upstream, outcome).inc()
        )
    services.issuers.observe_fetches(
        lambda issuer, outcome: metrics.jwks_fetches.labels(issuer, outcome).inc()
    )
    metadata = server_metadata(settings)
    app = Flask("sidecar")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.extensions["sidecar"] = services

    if settings.admin is not None:
        app.register_blueprint(admin_blueprint(services, settings.admin))
    listener_of = listener_classifier(settings, listener)
    _separate_listeners(app, settings, listener_of)

    app.register_error_handler(ProtocolError, protocol_error_response)
    app.register_error_handler(Exception, unexpected_error_response)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        response = http_error_response(exc)
        if request.path == "/token":
            # Refused before the view ran (a method other than POST): a denial at the token
            # endpoint all the same, so it is audited and counted like the others.
            error = "server_error" if response.status_code >= 500 else "invalid_request"
            services.audit.record(AuditEvent(at=services.clock(), error=error, reason=exc.name))
            metrics.exchanges.labels("denied", error).inc()
        return response

    endpoint = TokenEndpoint(services, metrics)

    @app.post("/token")
    def token() -> Any:
        # Reached only when the router in front of Flask did not take the request.
        return endpoint

    @app.get("/.well-known/jwks.json")
    def jwks() -> Response:
        keyring = services.keyring.get()
        # Short enough that a verifier always sees a key before it signs (Settings.jwks_max_age).
        return json_response(
            keyring.jwks(services.clock()),
            headers={"Cache-Control": f"public, max-age={settings.jwks_max_age}"},
        )

    @app.get("/.well-known/oauth-authorization-server")
    def oauth_metadata() -> Response:
        return json_response(metadata, headers={"Cache-Control": "public, max-age=3600"})

    @app.get("/healthz")
    def healthz() -> Response:
        return json_response({"status": "ok"})

    @app.get("/readyz")
    def readyz() -> Response:
        checks = services.readiness()
        ready = all(checks.values())
        return json_response(
            {"status": "ready" if ready else "not ready", "checks": checks}, 200 if ready else 503
        )

    @app.get("/metrics")
    def prometheus() -> Response:
        # content_type, not mimetype: werkzeug would append a second charset parameter.
        return Response(metrics.render(), content_type=CONTENT_TYPE_LATEST)

    ext_authz = None
    if settings.ext_authz is not None:
        ext_authz = ExtAuthzEndpoint(services, endpoint, settings.ext_authz)
    router = TokenRouter(endpoint, app.wsgi_app, listener_of=listener_of, ext_authz=ext_authz)
    # Outermost: an answer that left the body unread tells the client the connection closes.
    app.wsgi_app = CloseOnUnreadBody(router)  # type: ignore[method-assign]
    return app


# What the management listener serves: what upstreams fetch to verify tokens, and what the
# orchestrator and Prometheus poll.
MANAGEMENT_PATHS = frozenset(
    {
        "/.well-known/jwks.json",
        "/.well-known/oauth-authorization-server",
        "/healthz",
        "/readyz",
        "/metrics",
    }
)
NOT_FOUND = {"error": "not_found", "error_description": "Not found."}


def listener_classifier(settings: Settings, listener: str) -> Callable[[dict[str, Any]], str]:
    """The listener a request arrived on: ``"gateway"``, ``"admin"`` or ``"management"``. Known
    from the server (a listener of its own) or from the socket the request arrived on, never
    from the Host header."""
    if listener != "any":
        return lambda environ: listener
    ports: dict[int, str] = {}
    if settings.admin is not None and settings.admin.listen_port is not None:
        ports[settings.admin.listen_port] = "admin"
    if settings.management is not None:
        ports[settings.management.listen_port] = "management"
    if settings.ext_authz is not None:
        ports[parse_listen(settings.ext_authz.listen)[1]] = "ext_authz"
    if not ports:
        return lambda environ: "gateway"
    return lambda environ: ports.get(_local_port(environ) or 0, "gateway")


def _separate_listeners(
    app: Flask, settings: Settings, listener_of: Callable[[dict[str, Any]], str]
) -> None:
    """With ``admin.listen``, /admin answers only on that listener, and that listener answers
    nothing else: the gateway's network path cannot reach the admin API. With
    ``management.listen``, that listener answers only :data:`MANAGEMENT_PATHS`."""
    admin_apart = settings.admin is not None and settings.admin.listen_port is not None
    if not admin_apart and settings.management is None:
        return

    @app.before_request
    def route_by_listener() -> Response | None:
        kind = listener_of(request.environ)
        path = request.path
        if kind == "admin":
            allowed = path.startswith("/admin/")
        elif kind == "management":
            allowed = path in MANAGEMENT_PATHS
        else:
            allowed = not (admin_apart and path.startswith("/admin/"))
        if not allowed:
            return json_response(NOT_FOUND, 404, NO_STORE)
        return None


def _local_port(environ: dict[str, Any]) -> int | None:
    """The local TCP port of the connection; None on a Unix socket. Read from the socket itself:
    on a Unix socket gunicorn fills SERVER_PORT from the Host header, which the client chooses."""
    connection = environ.get("gunicorn.socket") or environ.get("werkzeug.socket")
    if connection is None:  # a server that does not expose its socket (the Flask test client)
        port = environ.get("SERVER_PORT", "")
        return int(port) if port.isdigit() else None
    try:
        address = connection.getsockname()
    except OSError:
        return None
    return int(address[1]) if isinstance(address, tuple) else None
