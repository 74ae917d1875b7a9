"""The parties of the configuration: who the service trusts and whom it serves. The issuers whose
subject tokens it accepts (``trusted_issuers:``, ``kubernetes:``), the clients that exchange
tokens (``clients:``, with their ``rate_limit:``), and the admin API's callers (``admin:``).
Re-exported by :mod:`sidecar.config.models`, whose :class:`Settings` checks them against each
other."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from sidecar.config.common import (
    Duration,
    Listen,
    StrictModel,
    SubjectAlgorithm,
    check_http_url,
    parse_listen,
    refuse_duplicates,
)
from sidecar.exchange.request import TOKEN_EXCHANGE_GRANT

__all__ = [
    "AdminConfig",
    "AdminCredential",
    "ClientConfig",
    "KubernetesConfig",
    "RateLimitConfig",
    "TrustedIssuerConfig",
]


class TrustedIssuerConfig(StrictModel):
    issuer: str
    jwks_uri: str | None = None
    jwks_file: Path | None = None
    audiences: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1)
    algorithms: list[SubjectAlgorithm] = Field(default_factory=lambda: ["RS256", "ES256"])  # type: ignore[arg-type]
    # Scheduled refresh of the issuer's JWKS, and the minimum gap between two refetches that an
    # unknown `kid` may trigger (so a flood of unknown kids cannot hammer the IdP).
    refresh_interval: Duration = 300.0
    min_refetch_interval: Duration = 30.0
    fetch_timeout: Duration = 3.0
    # While the JWKS cannot be fetched, cached keys keep verifying for at most this long after
    # the last successful fetch; then subject tokens of this issuer get 503.
    max_stale: Duration = 3600.0

    @model_validator(mode="after")
    def _stale_after_refresh(self) -> TrustedIssuerConfig:
        if self.max_stale < self.refresh_interval:
            raise ValueError("max_stale must be at least refresh_interval")
        return self

    @field_validator("issuer")
    @classmethod
    def _issuer_url(cls, value: str) -> str:
        # Compared byte for byte with `iss`; no normalisation is applied, by design.
        return check_http_url(value)

    @field_validator("jwks_uri")
    @classmethod
    def _jwks_url(cls, value: str | None) -> str | None:
        return None if value is None else check_http_url(value)

    @field_validator("algorithms")
    @classmethod
    def _algorithms_present(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("must list at least one algorithm")
        return value

    @model_validator(mode="after")
    def _one_key_source(self) -> TrustedIssuerConfig:
        if (self.jwks_uri is None) == (self.jwks_file is None):
            raise ValueError("exactly one of jwks_uri or jwks_file is required")
        return self


class KubernetesConfig(TrustedIssuerConfig):
    """The cluster's service-account token issuer: a client may authenticate with its projected,
    audience-bound service-account token as an RFC 7523 client assertion, verified with these
    keys (the API server's ``/openid/v1/jwks``, or that document in a file)."""

    audiences: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=lambda: ["token-exchange-sidecar"], min_length=1
    )
    # A projected token lives 1 h by default (expirationSeconds); longer-lived tokens (the
    # legacy extended ones) are refused.
    max_token_lifetime: Duration = Field(3600.0 * 24, gt=0)

    @field_validator("issuer")
    @classmethod
    def _issuer_url(cls, value: str) -> str:
        # A cluster issuer may be an in-cluster https URL; compared byte for byte with `iss`.
        return check_http_url(value)


class RateLimitConfig(StrictModel):
    """A token bucket: ``per_second`` requests sustained, ``burst`` at once (per worker)."""

    per_second: float = Field(gt=0)
    burst: int = Field(ge=1)


class ClientConfig(StrictModel):
    client_id: str = Field(min_length=1, max_length=255)
    client_secret: SecretStr | None = None
    jwks: dict[str, Any] | None = None
    jwks_uri: str | None = None
    # Authenticates with its projected Kubernetes service-account token (kubernetes: issuer).
    kubernetes_service_account: str | None = Field(
        default=None,
        pattern=r"^system:serviceaccount:[a-z0-9]([-a-z0-9.]*[a-z0-9])?:[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
    )
    # This client's own limit, instead of the top-level rate_limit.
    rate_limit: RateLimitConfig | None = None
    # The grants this client may use; token exchange is the only grant this service offers, so
    # `[]` is the way to keep a client configured but unable to exchange (unauthorized_client).
    grant_types: list[Literal["urn:ietf:params:oauth:grant-type:token-exchange"]] = Field(
        default_factory=lambda: [TOKEN_EXCHANGE_GRANT]  # type: ignore[arg-type]
    )

    @field_validator("jwks_uri")
    @classmethod
    def _jwks_url(cls, value: str | None) -> str | None:
        return None if value is None else check_http_url(value)

    @field_validator("client_secret")
    @classmethod
    def _secret_strength(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value():
            raise ValueError("must not be empty")
        return value

    @model_validator(mode="after")
    def _one_credential(self) -> ClientConfig:
        has_keys = self.jwks is not None or self.jwks_uri is not None
        credentials = [
            self.client_secret is not None,
            has_keys,
            self.kubernetes_service_account is not None,
        ]
        if credentials.count(True) != 1:
            raise ValueError(
                "exactly one credential is required: client_secret, jwks / jwks_uri "
                "(private_key_jwt) or kubernetes_service_account"
            )
        if self.jwks is not None and self.jwks_uri is not None:
            raise ValueError("jwks and jwks_uri are mutually exclusive")
        if self.jwks is not None and not isinstance(self.jwks.get("keys"), list):
            raise ValueError("jwks must be a JWK Set with a 'keys' list")
        return self

    @property
    def auth_methods(self) -> tuple[str, ...]:
        if self.client_secret is not None:
            return ("client_secret_basic", "client_secret_post")
        # A service-account token is a JWT client assertion too (RFC 7523 §2.2), signed by the
        # cluster rather than by the client.
        return ("private_key_jwt",)


class AdminCredential(StrictModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$")
    token: SecretStr

    @field_validator("token")
    @classmethod
    def _token_strength(cls, value: SecretStr) -> SecretStr:
        if len(value.get_secret_value()) < 32:
            raise ValueError("must be at least 32 characters")
        return value


class AdminConfig(StrictModel):
    """The policy admin API; absent, it is disabled (404)."""

    # HOST:PORT of a separate listener; when set, /admin is served there and only there.
    listen: Listen | None = None
    credentials: list[AdminCredential] = Field(min_length=1)

    @model_validator(mode="after")
    def _distinct_names(self) -> AdminConfig:
        refuse_duplicates("credentials", [c.name for c in self.credentials])
        return self

    @property
    def listen_port(self) -> int | None:
        return parse_listen(self.listen)[1] if self.listen else None
