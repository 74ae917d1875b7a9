"""OAuth 2.0 protocol errors: one class per ``error`` code (RFC 6749 §5.2, RFC 8693 §2.2.2,
RFC 8707 §2), each carrying its code and HTTP status as class attributes.

Descriptions are short and fixed: they never echo request input. ``reason`` is the internal,
more precise cause (which check refused the request); it goes to the audit trail and logs,
never to the client. Authlib's classes are the base so Authlib's own raises fit the same mould.
"""

from __future__ import annotations

from typing import ClassVar

from authlib.oauth2.base import OAuth2Error
from authlib.oauth2.rfc6749 import errors as rfc6749


class ProtocolError(OAuth2Error):  # type: ignore[misc]
    """Base of every error this service answers with an RFC 6749 error body."""

    error: ClassVar[str]
    status_code: ClassVar[int]
    description: str = "The request was refused."

    def __init__(self, description: str | None = None, *, reason: str | None = None) -> None:
        super().__init__(description=description or type(self).description)
        self.reason = reason or self.description

    def response_headers(self) -> dict[str, str]:
        return {}


class InvalidRequestError(ProtocolError, rfc6749.InvalidRequestError):  # type: ignore[misc]
    error = "invalid_request"
    status_code = 400
    description = "The request is malformed."


class InvalidClientError(ProtocolError, rfc6749.InvalidClientError):  # type: ignore[misc]
    """Client authentication failed. RFC 6749 §5.2: "If the client attempted to authenticate via
    the Authorization request header field, the authorization server MUST respond with an
    HTTP 401 ... and include the WWW-Authenticate response header field"."""

    error = "invalid_client"
    status_code = 401
    description = "Client authentication failed."

    def __init__(
        self, description: str | None = None, *, reason: str | None = None, basic: bool = False
    ) -> None:
        super().__init__(description, reason=reason)
        self.basic = basic

    def response_headers(self) -> dict[str, str]:
        if self.basic:
            return {"WWW-Authenticate": 'Basic realm="token-exchange-sidecar", charset="UTF-8"'}
        return {}


class UnauthorizedClientError(ProtocolError, rfc6749.UnauthorizedClientError):  # type: ignore[misc]
    error = "unauthorized_client"
    status_code = 400
    description = "The client is not allowed to use this grant type."


class UnsupportedGrantTypeError(ProtocolError):
    # Not based on Authlib's class: its constructor takes the grant type (so it cannot be built
    # like the others here) and its description echoes that request input.
    error = "unsupported_grant_type"
    status_code = 400
    description = "The grant type is not supported."


class InvalidScopeError(ProtocolError, rfc6749.InvalidScopeError):  # type: ignore[misc]
    error = "invalid_scope"
    status_code = 400
    description = "The requested scope is not allowed."


class InvalidTargetError(ProtocolError):
    """RFC 8707 §2 / RFC 8693 §2.2.2: the requested audience or resource is invalid, unknown,
    or not allowed for this client."""

    error = "invalid_target"
    status_code = 400
    description = "The requested audience or resource is not allowed."


class TemporarilyUnavailableError(ProtocolError):
    """A dependency (database, issuer keys) is down; the client may retry."""

    error = "temporarily_unavailable"
    status_code = 503
    description = "The service is temporarily unavailable."

    def __init__(
        self, description: str | None = None, *, reason: str | None = None, retry_after: int = 5
    ) -> None:
        super().__init__(description, reason=reason)
        self.retry_after = retry_after

    def response_headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class ServerError(ProtocolError):
    error = "server_error"
    status_code = 500
    description = "Internal error."


class RateLimitedError(TemporarilyUnavailableError):
    """RFC 6585 §4: 429 Too Many Requests, with Retry-After; the OAuth error code is the
    retryable ``temporarily_unavailable``."""

    status_code = 429
    description = "Too many requests."
