"""``POST /token`` as a bare WSGI callable, in front of the Flask app.

The token endpoint is called before every upstream hop, so it skips the framework: the form body
is read and parsed directly from the WSGI input (which also gives exact control over repeated
parameters, see :func:`parse_form`), and the answer is a pre-built header list and one JSON body.
Every other path, and any other method on ``/token`` (answered 405 and audited by the app), goes
to Flask. The checks are the same ones, in the same order, as docs/design.md §2.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from sidecar import logs
from sidecar.audit import AuditEvent, denied_event, granted_event
from sidecar.clients import Client
from sidecar.errors import (
    InvalidClientError,
    InvalidRequestError,
    ProtocolError,
    RateLimitedError,
    ServerError,
    UnauthorizedClientError,
    UnsupportedGrantTypeError,
)
from sidecar.exchange.grant import Facts, Granted, Outcome, Refused
from sidecar.exchange.request import MAX_BODY_BYTES, TOKEN_EXCHANGE_GRANT, FormParams, parse_form
from sidecar.metrics import Metrics
from sidecar.ratelimit import claimed_client_id
from sidecar.web.responses import STATUS_LINES, error_answer, log_unexpected, token_answer

if TYPE_CHECKING:  # the wiring is built at the edge; the endpoint only uses what it holds
    from sidecar.services import Services

log = logging.getLogger("sidecar.web.app")

FORM_TYPE = "application/x-www-form-urlencoded"
WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class TokenEndpoint:
    def __init__(self, services: Services, metrics: Metrics) -> None:
        self._services = services
        self._audit = services.audit
        self._clock = services.clock
        self._latency = metrics.latency
        self._exchanges = metrics.exchanges
        self._granted = metrics.exchanges.labels("granted", "")
        self._rate_limited = metrics.rate_limited

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        started = time.perf_counter()
        at = self._clock()
        client_id: str | None = None
        outcome: Outcome
        try:
            client, params = self._authenticated(environ)
            client_id = client.client_id
            self._admit(client)
            outcome = self._services.grant.exchange(
                client_id,
                params,
                policies=self._services.policies.get(),
                signing_key=self._services.signing_key(),
                now=at,
            )
        except ProtocolError as exc:
            outcome = Refused(exc, Facts())
        except Exception as exc:
            log_unexpected(exc)
            outcome = Refused(ServerError(reason=type(exc).__name__), Facts())
        outcome = self.settle(outcome, client_id, at, started)
        if isinstance(outcome, Granted):
            status, headers, body = token_answer(outcome.response.as_dict())
        else:
            status, headers, body = error_answer(outcome.error)
        start_response(STATUS_LINES[status], headers)
        self._latency.observe(time.perf_counter() - started)
        return [body]

    def observe_latency(self, started: float) -> None:
        self._latency.observe(time.perf_counter() - started)

    def exchange_as(self, client: Client, params: FormParams, at: float, started: float) -> Outcome:
        """The exchange for a client already known (the ext_authz listener's), under the same
        rate limit, grant-type check, policies and audit as ``/token``."""
        outcome: Outcome
        try:
            self._admit(client)
            outcome = self._services.grant.exchange(
                client.client_id,
                params,
                policies=self._services.policies.get(),
                signing_key=self._services.signing_key(),
                now=at,
            )
        except ProtocolError as exc:
            outcome = Refused(exc, Facts())
        except Exception as exc:
            log_unexpected(exc)
            outcome = Refused(ServerError(reason=type(exc).__name__), Facts())
        return self.settle(outcome, client.client_id, at, started)

    def settle(self, outcome: Outcome, client_id: str | None, at: float, started: float) -> Outcome:
        """Record the outcome (audit trail, metrics); a grant that cannot be recorded becomes a
        refusal, and no credential is sent."""
        request_id = logs.REQUEST_ID.get()
        latency_ms = round((time.perf_counter() - started) * 1000, 3)
        if isinstance(outcome, Granted):
            assert client_id is not None
            try:
                self._audit.record(
                    granted_event(
                        at, client_id, outcome, request_id=request_id, latency_ms=latency_ms
                    )
                )
            except ProtocolError as exc:  # the grant could not be recorded: no token is sent
                outcome = Refused(exc, outcome.facts)
            except Exception as exc:
                log_unexpected(exc)
                outcome = Refused(ServerError(reason=type(exc).__name__), outcome.facts)
        if isinstance(outcome, Granted):
            self._granted.inc()
            return outcome
        self._deny(
            denied_event(
                at,
                client_id,
                outcome.error,
                outcome.facts,
                request_id=request_id,
                latency_ms=latency_ms,
            )
        )
        return outcome

    def _deny(self, event: AuditEvent) -> None:
        try:
            self._audit.record(event)
            self._exchanges.labels("denied", event.error or "").inc()
        except Exception as exc:  # the refusal is still answered as JSON, with no-store
            log_unexpected(exc)

    def _authenticated(self, environ: dict[str, Any]) -> tuple[Client, FormParams]:
        """Transport checks, then client authentication (failures counted per peer); raises the
        protocol error that refuses the request."""
        if environ.get("QUERY_STRING"):
            # RFC 6749 §3.2 requires POST; parameters belong in the body, never the URL, where
            # proxies and logs would keep a token.
            raise InvalidRequestError(reason="parameters in the query string")
        mimetype = environ.get("CONTENT_TYPE", "").partition(";")[0].strip().lower()
        if mimetype != FORM_TYPE:
            raise InvalidRequestError(reason="body is not application/x-www-form-urlencoded")
        length = environ.get("CONTENT_LENGTH", "")
        # (At most 7 digits before int(): a 5,000-digit value must be a 400, not a ValueError.)
        if (
            not length.isdigit()
            or not length.isascii()
            or len(length) > 7
            or int(length) > MAX_BODY_BYTES
        ):
            raise InvalidRequestError(reason="body length missing or over size cap")
        body = environ["wsgi.input"].read(int(length)) if length != "0" else b""
        if len(body) != int(length):
            raise InvalidRequestError(reason="body shorter than its Content-Length")
        params = parse_form(body)
        authorization = environ.get("HTTP_AUTHORIZATION")
        services = self._services
        limiter = services.rate_limiter
        claimed = claimed_client_id(params, authorization) if limiter.active else None
        # Before any signature work (client assertion, subject token): shed overload cheaply. A
        # peek only: the claim is unauthenticated, so it must not spend the client's budget.
        if limiter.active and (retry_after := limiter.peek(claimed)) is not None:
            # (A peek refuses only a configured client, whose own requests emptied its bucket.)
            self._rate_limited.labels(claimed or "(unauthenticated)").inc()
            raise RateLimitedError(reason="rate limit", retry_after=retry_after)

        grant_type = params.single("grant_type")
        if grant_type is None:
            raise InvalidRequestError(
                "A required parameter is missing.", reason="missing grant_type"
            )
        if grant_type != TOKEN_EXCHANGE_GRANT:
            raise UnsupportedGrantTypeError(reason="unsupported grant_type")

        try:
            client = services.authenticator.authenticate(params, authorization)
        except InvalidClientError as exc:
            # Counted per peer, never against the claimed client: a wrong secret must not lock
            # the real client out. Over budget, a failure is answered 429 rather than 401.
            if limiter.active:
                peer = environ.get("REMOTE_ADDR") or ""
                if (retry_after := limiter.take_failure(peer, claimed)) is not None:
                    self._rate_limited.labels("(unauthenticated)").inc()
                    raise RateLimitedError(
                        reason=f"rate limit of failed authentication: {exc.reason}",
                        retry_after=retry_after,
                    ) from None
            raise
        return client, params

    def _admit(self, client: Client) -> None:
        """The authenticated client's rate limit and grant type; raises what refuses it."""
        limiter = self._services.rate_limiter
        # Charged only now that the client is proven, and before the grant's signature work.
        if limiter.active and (retry_after := limiter.take(client.client_id)) is not None:
            self._rate_limited.labels(client.client_id).inc()
            raise RateLimitedError(reason="rate limit", retry_after=retry_after)
        if not client.check_grant_type(TOKEN_EXCHANGE_GRANT):
            raise UnauthorizedClientError(reason="client may not use token exchange")


class TokenRouter:
    """The WSGI entry point: ``POST /token`` on the gateway's listener to
    :class:`TokenEndpoint`, everything on the ext_authz listener to Envoy's check endpoint, the
    rest to Flask (which answers only /admin on the admin listener
    and only the management paths on the management listener)."""

    def __init__(
        self,
        token: WsgiApp,
        flask_app: WsgiApp,
        *,
        listener_of: Callable[[dict[str, Any]], str],
        ext_authz: WsgiApp | None = None,
    ) -> None:
        self._token = token
        self._flask = flask_app
        self._listener_of = listener_of
        self._ext_authz = ext_authz

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        # Every request has an id: the client's X-Request-ID when it is a short token, else a
        # new one; in every log line and audit record of the request, and in the response.
        request_id = logs.request_id_from(environ.get("HTTP_X_REQUEST_ID"))
        logs.REQUEST_ID.set(request_id)

        def answer(status: str, headers: list[tuple[str, str]], *args: Any) -> Any:
            return start_response(status, [*headers, (logs.REQUEST_ID_HEADER, request_id)], *args)

        listener = self._listener_of(environ)
        if (
            environ.get("PATH_INFO") == "/token"
            and environ.get("REQUEST_METHOD") == "POST"
            and listener == "gateway"
        ):
            return self._token(environ, answer)
        if listener == "ext_authz" and self._ext_authz is not None:
            # Every method and path: Envoy checks each request as it came.
            return self._ext_authz(environ, answer)
        return self._flask(environ, answer)
