"""The verifier's refusals, each an RFC 6750 §3 challenge
(https://www.rfc-editor.org/rfc/rfc6750#section-3)."""

from __future__ import annotations

from collections.abc import Iterable


class VerificationError(Exception):
    """A token refused. ``description`` is fixed per class and never echoes the token; the
    exception's message (a reason for the upstream's own logs) names only which check failed."""

    error = "invalid_token"
    status = 401
    description = "The access token is invalid."

    def __init__(self, reason: str = "") -> None:
        super().__init__(reason or self.description)

    def challenge_parameters(self) -> list[str]:
        return [f'error="{self.error}"', f'error_description="{self.description}"']

    def www_authenticate(self, realm: str | None = None) -> str:
        """The RFC 6750 §3 ``WWW-Authenticate`` value for this failure."""
        parameters = [f'realm="{realm}"'] if realm else []
        parameters += self.challenge_parameters()
        return f"Bearer {', '.join(parameters)}" if parameters else "Bearer"


class InvalidToken(VerificationError):
    """RFC 6750 §3.1 ``invalid_token``: malformed, expired, revoked, or not for this upstream."""


class MissingToken(InvalidToken):
    """No bearer token at all. RFC 6750 §3.1: "If the request lacks any authentication
    information ..., the resource server SHOULD NOT include an error code"."""

    description = "A bearer access token is required."

    def challenge_parameters(self) -> list[str]:
        return []


class InsufficientScope(VerificationError):
    """RFC 6750 §3.1 ``insufficient_scope`` (HTTP 403), naming the scopes the request needs."""

    error = "insufficient_scope"
    status = 403
    description = "The access token lacks a required scope."

    def __init__(self, required: Iterable[str]) -> None:
        self.scopes = tuple(sorted(required))
        super().__init__(f"scopes required: {' '.join(self.scopes)}")

    def challenge_parameters(self) -> list[str]:
        return [*super().challenge_parameters(), f'scope="{" ".join(self.scopes)}"']


class JwksUnavailable(VerificationError):
    """The sidecar's JWKS cannot be fetched and none is cached: fail closed, as a 503."""

    error = "temporarily_unavailable"
    status = 503
    description = "The token issuer's keys are unavailable."
