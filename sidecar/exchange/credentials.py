"""Credentials of an upstream's own, for the audiences whose policy says ``credential: static``
or ``client_credentials``: what the grant needs from outside, as a small interface (the
configured keys and the upstream authorization servers sit behind it, in
:mod:`sidecar.upstreams`), and how each is described in the RFC 8693 §2.2.1 response.

Every mode is gated by the same policy decision as a minted token (client, subject conditions,
scopes); only what is handed out differs. The response says truthfully what it is:

- a token from the upstream's authorization server is an OAuth access token
  (``issued_token_type`` ``urn:ietf:params:oauth:token-type:access_token``, ``token_type`` as
  that server said);
- an API key is not (RFC 8693 §3 allows other token type URIs): ``issued_token_type``
  :data:`API_KEY_TOKEN_TYPE`; ``token_type`` ``Bearer`` when it is sent as
  ``Authorization: Bearer``, else ``N_A`` (RFC 8693 §2.2.1) with ``credential_header`` naming
  the header to send it in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

API_KEY_TOKEN_TYPE = "urn:token-exchange-sidecar:token-type:api-key"
NOT_APPLICABLE = "N_A"  # RFC 8693 §2.2.1: the issued token is not an access token as such


@dataclass(frozen=True, slots=True)
class UpstreamCredential:
    access_token: str = field(repr=False)
    token_type: str  # "Bearer", the upstream's own, or N_A
    issued_token_type: str
    expires_in: int | None  # seconds it stays good (None: as long as the policy allows)
    scope: str | None = None  # the scope the upstream's authorization server granted, if said
    header: str | None = None  # for N_A: the header the key is sent in


class UpstreamCredentials(Protocol):
    def credential(
        self, upstream: str, scopes: tuple[str, ...], audience: str, mode: str
    ) -> UpstreamCredential:
        """The credential of ``upstream`` for these scopes and that audience, of the policy's
        ``mode`` (static or client_credentials); raises a ProtocolError
        (``temporarily_unavailable`` when the upstream's authorization server fails,
        ``invalid_target`` when the upstream is not configured, or not for that mode)."""
        ...
