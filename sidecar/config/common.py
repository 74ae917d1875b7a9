"""What every section of the configuration shares: the error type, durations, strict models,
URL checks and the protocol constants the checks refer to."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict

# Only asymmetric algorithms: an HMAC "key" would be the issuer's public key, which is the
# classic algorithm-confusion attack, and "none" is never acceptable.
SubjectAlgorithm = Literal[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"
]
SigningAlgorithm = Literal["ES256", "EdDSA", "RS256", "PS256"]

# Scope values that grant "everything" defeat the point of narrowing; refused in any policy.
OMNIBUS_SCOPES = frozenset({"*", "all", "any", "root", "admin:*"})

_DURATION = re.compile(r"^\s*(\d+)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key path and the problem."""


def parse_duration(value: Any) -> float:
    """``90``, ``"90s"``, ``"15m"``, ``"24h"``, ``"7d"``, ``"500ms"`` -> seconds."""
    if isinstance(value, bool):
        raise ValueError("must be a duration such as 30s, 15m or 24h")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(int(match.group(1)) * _UNITS[match.group(2)])
    else:
        raise ValueError("must be a duration such as 30s, 15m or 24h")
    if not math.isfinite(seconds):  # YAML's .nan and .inf: every comparison with NaN is false
        raise ValueError("must be a finite duration")
    if seconds < 0:
        raise ValueError("must not be negative")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False)


def check_http_url(value: str, *, allow_path: bool = True) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError("must be an absolute http(s) URL")
    if parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError("must use https (plain http is allowed only on loopback)")
    if parts.query or parts.fragment:
        raise ValueError("must not have a query or fragment")
    if not allow_path and parts.path not in ("", "/"):
        raise ValueError("must not have a path")
    return value


def refuse_duplicates(what: str, values: list[str]) -> None:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise ValueError(f"{what}: {value!r} appears twice")
        seen.add(value)


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` (the RFC 3986 §3.2.2 authority syntax), a port from 0 to
    65535 in plain digits; raises ValueError otherwise."""
    try:
        parts = urlsplit("//" + text)
        host, port = parts.hostname, parts.port
    except ValueError:  # an out-of-range port, an unbracketed or half-bracketed IPv6 address
        host = port = None
    digits = text.rpartition(":")[2]
    if not host or port is None or parts.path or parts.username is not None or not digits.isdigit():
        raise ValueError(f"{text!r} is not HOST:PORT")
    return host, port


def check_listen(text: str) -> str:
    parse_listen(text)
    return text


Listen = Annotated[str, AfterValidator(check_listen)]
