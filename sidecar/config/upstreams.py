"""The credentials the sidecar holds for upstreams that do not trust its JWKS (``upstreams:``),
and the Envoy ``ext_authz`` listener (``ext_authz:``).

An upstream entry has the shape of a gateway backend definition, so such definitions can be
imported as they are (``upstreams_file:``)::

    {"name": "vendor", "url": "https://api.vendor.example/mcp",
     "credentials": {"type": "bearer", "token": "${VENDOR_API_KEY}"}}

Secrets stay in the configuration (environment or mounted files, ``${NAME}`` / ``${file:PATH}``):
a policy names an upstream, never a secret, so the policy table, its history and the admin API
never hold one."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from sidecar.config.common import (
    Duration,
    Listen,
    StrictModel,
    check_http_url,
    parse_listen,
    refuse_duplicates,
)

# RFC 9110 §5.6.2: a header name is a token.
HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
HEADER_VALUE = re.compile(r"[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?")
# Headers a credential may never be sent in: hop-by-hop, framing, or routing.
FORBIDDEN_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "te",
        "upgrade",
        "cookie",
        "keep-alive",
        "proxy-authorization",
    }
)
UPSTREAM_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"
# An ext_authz route's host: a DNS name or IPv4 address, or "*." and a name (any subdomain).
_LABEL = r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?"
ROUTE_HOST = re.compile(rf"^(\*\.)?{_LABEL}(\.{_LABEL})*$")


def _header_value(value: SecretStr) -> SecretStr:
    # It goes into an HTTP header as it is: visible ASCII, spaces only inside (RFC 9110 §5.5).
    # (A Secret read with ${NAME} keeps a trailing line break; ${file:...} drops one.)
    if not HEADER_VALUE.fullmatch(value.get_secret_value()):
        raise ValueError("must be visible ASCII, without line breaks or edge spaces")
    return value


class BearerCredential(StrictModel):
    """An API key the upstream takes as ``Authorization: Bearer KEY``."""

    type: Literal["bearer"]
    token: SecretStr = Field(min_length=1)

    check_token = field_validator("token")(_header_value)


class HeaderCredential(StrictModel):
    """An API key the upstream takes in a header of its own (``X-API-Key: KEY``)."""

    type: Literal["header"]
    header: str = Field(min_length=1, max_length=64)
    token: SecretStr = Field(min_length=1)

    check_token = field_validator("token")(_header_value)

    @field_validator("header")
    @classmethod
    def _header_name(cls, value: str) -> str:
        if not HEADER_NAME.match(value) or value.lower() in FORBIDDEN_HEADERS:
            raise ValueError(f"{value!r} cannot carry a credential")
        return value


class ClientCredentialsCredential(StrictModel):
    """The sidecar's own OAuth client at the upstream's authorization server (RFC 6749 §4.4)."""

    type: Literal["client_credentials"]
    token_url: str
    client_id: str = Field(min_length=1)
    client_secret: SecretStr = Field(min_length=1)
    auth_method: Literal["client_secret_basic", "client_secret_post"] = "client_secret_basic"
    # How the upstream's audience is passed on: RFC 8707 `resource`, `audience`, or not at all.
    audience_parameter: Literal["resource", "audience", "none"] = "resource"
    # Short, so that a gateway's own timeout (sidecar.client: 2 s) is not spent waiting on a
    # vendor: at worst timeout x (retries + 1) plus a backoff; a failure then answers 503 at
    # once for failure_memory.
    timeout: Duration = Field(2.0, gt=0, le=60)
    retries: int = Field(1, ge=0, le=5)
    failure_memory: Duration = Field(5.0, ge=0, le=300)

    @field_validator("token_url")
    @classmethod
    def _token_url(cls, value: str) -> str:
        return check_http_url(value)


Credential = Annotated[
    BearerCredential | HeaderCredential | ClientCredentialsCredential,
    Field(discriminator="type"),
]
STATIC_TYPES = ("bearer", "header")


class UpstreamConfig(StrictModel):
    name: str = Field(pattern=UPSTREAM_NAME)
    url: str | None = None  # informational: where the upstream is (a backend definition's url)
    credentials: Credential

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return None if value is None else check_http_url(value)

    @property
    def mode(self) -> str:
        """The policy credential mode this upstream serves: static or client_credentials."""
        return "static" if self.credentials.type in STATIC_TYPES else "client_credentials"


def check_upstreams(upstreams: list[UpstreamConfig]) -> None:
    refuse_duplicates("upstreams", [u.name for u in upstreams])


class ExtAuthzRoute(StrictModel):
    """Requests to ``host`` (exact, or ``*.suffix``) under ``path_prefix`` are for ``audience``."""

    host: str = Field(min_length=1, max_length=255)
    path_prefix: str = Field("/", pattern=r"^/")
    audience: str = Field(min_length=1, max_length=2048)
    scope: list[str] | None = None  # requested scopes; absent: the policy's default scopes

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        # A name as Envoy sends it in Host, without the port (stripped before matching): a
        # port, brackets, a scheme or a "*" anywhere but a leading "*." could never match.
        name = value.lower()
        if ROUTE_HOST.match(name):
            return name
        try:  # an IPv6 literal, written without brackets
            return str(ipaddress.IPv6Address(name))
        except ValueError:
            pass
        raise ValueError(f"{value!r} is not a host name, *.suffix or IP address without a port")

    def matches(self, host: str, path: str) -> bool:
        name = host.lower()
        if self.host.startswith("*."):
            host_ok = name.endswith(self.host[1:]) and len(name) > len(self.host) - 1
        else:
            host_ok = name == self.host
        prefix = self.path_prefix
        path_ok = path == prefix.rstrip("/") or path.startswith(
            prefix if prefix.endswith("/") else prefix + "/"
        )
        return host_ok and (prefix == "/" or path_ok)


class ExtAuthzConfig(StrictModel):
    """An Envoy ``ext_authz`` HTTP service on a listener of its own: Envoy forwards each
    request's headers; the sidecar exchanges the user's bearer token for the route's audience,
    as ``client_id``, and answers with the upstream credential for Envoy to set."""

    listen: Listen
    client_id: str = Field(min_length=1)  # the policies' client for requests through Envoy
    path_prefix: str = Field("", pattern=r"^(/[^?#]*)?$")  # Envoy's http_service.path_prefix
    routes: list[ExtAuthzRoute] = Field(min_length=1)
    # Proof that the caller is Envoy: the value Envoy adds in the x-sidecar-ext-authz header of
    # each check (authorization_request.headers_to_add). Required unless listen is loopback:
    # whoever can call this listener is handed upstream credentials.
    secret: SecretStr | None = Field(default=None, min_length=16)

    @model_validator(mode="after")
    def _routes(self) -> ExtAuthzConfig:
        refuse_duplicates("ext_authz.routes", [f"{r.host}{r.path_prefix}" for r in self.routes])
        return self

    @model_validator(mode="after")
    def _reachable_only_by_envoy(self) -> ExtAuthzConfig:
        host = parse_listen(self.listen)[0]
        if self.secret is None and not _loopback(host):
            raise ValueError(
                "ext_authz.listen is not a loopback address: set ext_authz.secret (Envoy sends "
                "it in x-sidecar-ext-authz), or whoever reaches the listener gets credentials"
            )
        return self

    def route_for(self, host: str, path: str) -> ExtAuthzRoute | None:
        """The most specific route for the request (longest path prefix), or None."""
        if host.startswith("["):  # an IPv6 literal, with or without a port
            host = host[1 : host.find("]")]
        elif host.count(":") == 1:  # drop a port
            host = host.rsplit(":", 1)[0]
        found = [r for r in self.routes if r.matches(host, path)]
        return max(
            found, key=lambda r: (not r.host.startswith("*."), len(r.path_prefix)), default=None
        )


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
