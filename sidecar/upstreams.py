"""The configured upstream credentials (``upstreams:``) behind the grant's
:class:`~sidecar.exchange.credentials.UpstreamCredentials` interface: a static API key handed
out as configured, or a token obtained from the upstream's own authorization server with the
sidecar's client credentials (:mod:`sidecar.upstream_tokens`: cached, single-flight, retried)."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

from sidecar.config import Settings
from sidecar.config.upstreams import (
    BearerCredential,
    ClientCredentialsCredential,
    HeaderCredential,
    UpstreamConfig,
)
from sidecar.errors import InvalidTargetError, TemporarilyUnavailableError
from sidecar.exchange.credentials import (
    API_KEY_TOKEN_TYPE,
    NOT_APPLICABLE,
    UpstreamCredential,
)
from sidecar.exchange.policy import STATIC
from sidecar.exchange.request import ACCESS_TOKEN_TYPE
from sidecar.upstream_tokens import ClientCredentialsSettings, ClientCredentialsSource


class ConfiguredUpstreams:
    """Every upstream of the configuration, by name."""

    def __init__(
        self, upstreams: list[UpstreamConfig], *, clock: Callable[[], float] = time.time
    ) -> None:
        self._clock = clock
        self._static: dict[str, UpstreamCredential] = {}
        self._sources: dict[str, ClientCredentialsSource] = {}
        for upstream in upstreams:
            credentials = upstream.credentials
            if isinstance(credentials, BearerCredential):
                self._static[upstream.name] = UpstreamCredential(
                    access_token=credentials.token.get_secret_value(),
                    token_type="Bearer",
                    issued_token_type=API_KEY_TOKEN_TYPE,
                    expires_in=None,
                )
            elif isinstance(credentials, HeaderCredential):
                self._static[upstream.name] = UpstreamCredential(
                    access_token=credentials.token.get_secret_value(),
                    token_type=NOT_APPLICABLE,
                    issued_token_type=API_KEY_TOKEN_TYPE,
                    expires_in=None,
                    header=credentials.header,
                )
            else:
                self._sources[upstream.name] = ClientCredentialsSource(
                    _source_settings(upstream.name, credentials), clock=clock
                )

    @classmethod
    def from_settings(cls, settings: Settings) -> ConfiguredUpstreams | None:
        return cls(settings.upstreams) if settings.upstreams else None

    def credential(
        self, upstream: str, scopes: tuple[str, ...], audience: str, mode: str
    ) -> UpstreamCredential:
        static = self._static.get(upstream)
        source = self._sources.get(upstream)
        if (static, source) == (None, None):
            # A stored policy names an upstream the configuration no longer has: fail closed.
            raise InvalidTargetError(reason=f"upstream {upstream} is not configured")
        if (static is not None) != (mode == STATIC):
            # The policy asked for one kind, the configuration now holds another: neither is
            # handed out until they agree again.
            raise InvalidTargetError(
                reason=f"upstream {upstream}: its credentials do not fit credential {mode}"
            )
        if static is not None:
            return static
        assert source is not None
        token = source.token(scopes, audience)  # raises TemporarilyUnavailableError
        if token.scope is not None and not set(token.scope.split()) <= set(scopes):
            # RFC 6749 §3.3: the server may grant another scope than asked for; never more
            # than the policy granted.
            raise TemporarilyUnavailableError(
                reason=f"upstream {upstream}: its authorization server granted more scope "
                "than the policy allows"
            )
        return UpstreamCredential(
            access_token=token.access_token,
            token_type=token.token_type,
            issued_token_type=ACCESS_TOKEN_TYPE,
            expires_in=int(token.expires_at - self._clock()),
            scope=token.scope,
        )

    def observe_fetches(self, observe: Callable[[str, str], None]) -> None:
        """Call ``observe(upstream, outcome)`` after each fetch from an upstream's
        authorization server (``ok`` or ``failed``)."""
        for name, source in self._sources.items():
            source.observe = functools.partial(observe, name)

    def close(self) -> None:
        for source in self._sources.values():
            source.close()


def _source_settings(name: str, config: ClientCredentialsCredential) -> ClientCredentialsSettings:
    return ClientCredentialsSettings(
        name=name,
        token_url=config.token_url,
        client_id=config.client_id,
        client_secret=config.client_secret.get_secret_value(),
        auth_method=config.auth_method,
        audience_parameter=config.audience_parameter,
        timeout=config.timeout,
        retries=config.retries,
        failure_memory=config.failure_memory,
    )
