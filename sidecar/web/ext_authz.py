"""An Envoy ``ext_authz`` HTTP authorization service, on ``ext_authz.listen``: token exchange
for gateways that cannot call ``/token`` themselves (Envoy Gateway, Istio, agentgateway).

Envoy's HTTP service sends, for each request it guards, a check request with the original
method, ``path_prefix`` + the original path, the original ``Host`` and the headers it is allowed
to forward (``Authorization`` always), and no body. This endpoint:

1. picks the route (``ext_authz.routes``) from the Host and the path, hence the audience;
2. takes the user's bearer token from ``Authorization`` (RFC 6750 §2.1);
3. runs the same exchange as ``/token`` for ``ext_authz.client_id`` (policies, rate limit,
   audit trail, metrics);
4. answers exactly ``200`` (the only status Envoy takes as "allowed") with the upstream
   credential in the header Envoy copies onto the upstream request
   (``authorization_response.allowed_upstream_headers``), replacing the user's
   ``Authorization``; an API key sent in a header of its own comes with
   ``x-envoy-auth-headers-to-remove: authorization``, so the user's token is removed, never
   forwarded. Otherwise ``401`` (no or bad user token, with ``WWW-Authenticate: Bearer``),
   ``403`` (no route, or refused by policy) or ``429`` (rate limit), each with a fixed body,
   which Envoy returns to the client; ``503`` (a dependency down), which Envoy, like any 5xx,
   answers with its ``status_on_error`` (``deploy/envoy/envoy.yaml`` sets 503).

The listener must be reachable only by the pod's Envoy: anything that can reach it exchanges
tokens as ``ext_authz.client_id``.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sidecar.config.upstreams import ExtAuthzConfig
from sidecar.errors import InvalidRequestError, InvalidTargetError, ProtocolError
from sidecar.exchange.credentials import NOT_APPLICABLE
from sidecar.exchange.grant import Facts, Granted, Refused
from sidecar.exchange.request import ACCESS_TOKEN_TYPE, TOKEN_EXCHANGE_GRANT, FormParams
from sidecar.web.responses import STATUS_LINES

if TYPE_CHECKING:
    from sidecar.services import Services
    from sidecar.web.token import TokenEndpoint

log = logging.getLogger(__name__)

# RFC 6750 §2.1: credentials = "Bearer" 1*SP b64token
BEARER = re.compile(r"^[Bb][Ee][Aa][Rr][Ee][Rr] +([A-Za-z0-9._~+/-]+=*) *$")
REMOVE_HEADERS = "x-envoy-auth-headers-to-remove"
# ext_authz.secret arrives in this header, added by Envoy (authorization_request.headers_to_add).
SECRET_HEADER = "x-sidecar-ext-authz"
SECRET_HEADER_ENVIRON = "HTTP_X_SIDECAR_EXT_AUTHZ"
# Fixed bodies: nothing of the request, nor why exactly (that is in the audit trail).
DENIED = {
    401: {"error": "invalid_token", "error_description": "A valid bearer token is required."},
    403: {"error": "access_denied", "error_description": "Not allowed by policy."},
    429: {"error": "rate_limited", "error_description": "Too many requests."},
    503: {"error": "temporarily_unavailable", "error_description": "Try again later."},
}
# The exchange's refusals, as Envoy's client should see them.
STATUS_OF_ERROR = {
    "invalid_request": 401,  # the subject token (the user's) is missing, bad or expired
    "invalid_client": 503,  # ext_authz.client_id is misconfigured: not the user's fault
    "unauthorized_client": 403,
    "invalid_target": 403,
    "invalid_scope": 403,
    "temporarily_unavailable": 503,
}


class ExtAuthzEndpoint:
    def __init__(self, services: Services, token: TokenEndpoint, config: ExtAuthzConfig) -> None:
        self._services = services
        self._token = token
        self._config = config
        self._clock = services.clock

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        started = time.perf_counter()
        try:
            return self._check(environ, start_response, started)
        finally:
            self._token.observe_latency(started)

    def _check(
        self, environ: dict[str, Any], start_response: Callable[..., Any], started: float
    ) -> list[bytes]:
        if not self._from_envoy(environ):
            # Not audited: nothing but Envoy should reach this listener, and a stranger's
            # requests must not become database writes.
            log.warning("ext_authz: a check without the configured secret was refused")
            return self._deny(start_response, 403)
        at = self._clock()
        client_id = self._config.client_id
        path = environ.get("PATH_INFO", "")
        prefix = self._config.path_prefix
        route = None
        # A path the upstream could read as another one ("/mcp/../admin", "//", "\\") matches
        # no route: a path prefix must be a boundary the upstream sees too.
        if _plain(path) and (not prefix or path == prefix or path.startswith(prefix + "/")):
            route = self._config.route_for(environ.get("HTTP_HOST", ""), path[len(prefix) :] or "/")
        if route is None:
            refused = InvalidTargetError(reason="ext_authz: no route for the host and path")
            self._token.settle(Refused(refused, Facts()), client_id, at, started)
            return self._deny(start_response, 403)
        match = BEARER.match(environ.get("HTTP_AUTHORIZATION", ""))
        if match is None:
            refused = InvalidRequestError(reason="ext_authz: no bearer token in Authorization")
            facts = Facts(audiences=(route.audience,))
            self._token.settle(Refused(refused, facts), client_id, at, started)
            return self._deny(start_response, 401)
        form: dict[str, list[str]] = {
            "grant_type": [TOKEN_EXCHANGE_GRANT],
            "subject_token": [match.group(1)],
            "subject_token_type": [ACCESS_TOKEN_TYPE],
            "audience": [route.audience],
        }
        if route.scope:
            form["scope"] = [" ".join(route.scope)]
        client = self._services.authenticator.clients.get(client_id)
        if client is None:  # validated at start-up; never a silent pass
            return self._deny(start_response, 503)
        outcome = self._token.exchange_as(client, FormParams(form), at, started)
        if not isinstance(outcome, Granted):
            return self._deny(start_response, _status_of(outcome.error), outcome.error)
        response = outcome.response
        headers = [("Cache-Control", "no-store"), ("Content-Length", "0")]
        if response.token_type == NOT_APPLICABLE and response.credential_header:
            headers.append((response.credential_header, response.access_token))
            # Envoy removes after it sets: a key that goes in Authorization itself replaces the
            # user's token already, and removing "authorization" would drop the key too.
            if response.credential_header.lower() != "authorization":
                headers.append((REMOVE_HEADERS, "authorization"))
        else:
            headers.append(("Authorization", f"{response.token_type} {response.access_token}"))
        start_response(STATUS_LINES[200], headers)
        return [b""]

    def _from_envoy(self, environ: dict[str, Any]) -> bool:
        secret = self._config.secret
        if secret is None:  # a loopback listener (validated): only the pod reaches it
            return True
        sent = environ.get(SECRET_HEADER_ENVIRON, "")
        return hmac.compare_digest(sent.encode(), secret.get_secret_value().encode())

    @staticmethod
    def _deny(
        start_response: Callable[..., Any], status: int, error: ProtocolError | None = None
    ) -> list[bytes]:
        body = json.dumps(DENIED[status]).encode()
        headers = [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
        ]
        if status == 401:
            # RFC 6750 §3.1: no error code when the request carried no token at all.
            challenge = 'Bearer error="invalid_token"' if error is not None else "Bearer"
            headers.append(("WWW-Authenticate", challenge))
        if error is not None and status in (429, 503):
            headers.extend(error.response_headers().items())
        start_response(STATUS_LINES[status], headers)
        return [body]


def _plain(path: str) -> bool:
    """No dot segment, empty segment or backslash (the path is already percent-decoded)."""
    if "\\" in path or "//" in path:
        return False
    return not any(segment in (".", "..") for segment in path.split("/"))


def _status_of(error: ProtocolError) -> int:
    if error.status_code == 429:  # a rate limit (its OAuth code is temporarily_unavailable)
        return 429
    return STATUS_OF_ERROR.get(error.error, 503 if error.status_code >= 500 else 403)
