"""Parsing of the token endpoint's form body and of a token-exchange request.

RFC 6749 §3.2: "Parameters sent without a value MUST be treated as if they were omitted from the
request ... Request and response parameters MUST NOT be included more than once." RFC 8693 §2.1
allows ``audience`` and ``resource`` to repeat; nothing else may. We refuse empty values outright
rather than treat them as absent: a gateway that sends ``scope=`` has a bug worth surfacing.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import unquote_to_bytes, urlsplit

from sidecar.errors import InvalidRequestError, InvalidScopeError, InvalidTargetError

TOKEN_EXCHANGE_GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
# RFC 6749 §3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
SCOPE_TOKEN = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]+$")
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"
ID_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:id_token"

# Both name a JWT access token, which is what we verify and what we mint.
SUPPORTED_TOKEN_TYPES = frozenset({ACCESS_TOKEN_TYPE, JWT_TOKEN_TYPE})
REPEATABLE = frozenset({"audience", "resource"})

MAX_BODY_BYTES = 64 * 1024
MAX_TOKEN_CHARS = 16 * 1024
MAX_PARAMETERS = 32
MAX_TARGETS = 8
MAX_TARGET_CHARS = 2048
MAX_SCOPE_CHARS = 2048


@dataclass(frozen=True, slots=True)
class FormParams:
    """A parsed form body: parameter name -> every value it was given, in order."""

    values: dict[str, list[str]]

    def single(self, name: str) -> str | None:
        """The one value of ``name``, or None if absent. Repeats are refused at parse time."""
        found = self.values.get(name)
        return found[0] if found else None

    def many(self, name: str) -> list[str]:
        return self.values.get(name, [])

    def __contains__(self, name: str) -> bool:
        return name in self.values


@dataclass(frozen=True, slots=True)
class TokenExchangeRequest:
    subject_token: str
    subject_token_type: str
    audiences: tuple[str, ...]
    resources: tuple[str, ...]
    scopes: tuple[str, ...] | None  # None: no scope requested, the policy's defaults apply
    requested_token_type: str
    actor_token: str | None
    actor_token_type: str | None

    @property
    def targets(self) -> tuple[str, ...]:
        """Every requested audience and resource, deduplicated, in request order."""
        return tuple(dict.fromkeys((*self.audiences, *self.resources)))


_CONTROL_CHARACTER = re.compile("[\x00-\x1f\x7f]")


def _has_control_characters(text: str) -> bool:
    return _CONTROL_CHARACTER.search(text) is not None


def _form_decode(text: str) -> str:
    """``+`` is a space, ``%XX`` a byte; the bytes must be UTF-8 (UnicodeDecodeError if not).
    Most values (tokens) need no decoding at all."""
    if "%" in text:
        if len(text) <= _MEMO_CHARS:
            return _percent_decode_memo(text)
        return _percent_decode(text)
    return text.replace("+", " ") if "+" in text else text


def _percent_decode(text: str) -> str:
    decoded = unquote_to_bytes(text.replace("+", " ")).decode("utf-8")
    if _has_control_characters(decoded):
        raise InvalidRequestError(reason="control character in a parameter")
    return decoded


# The short percent-encoded values repeat on every request of a gateway (the grant type, the
# token types, its audiences and scopes): decoded once each, not per request. A value that
# fails raises every time (lru_cache keeps no exceptions); long values (tokens) are never kept.
_MEMO_CHARS = 256
_percent_decode_memo = lru_cache(maxsize=1024)(_percent_decode)


def _parse_pair(part: str) -> tuple[str, str]:
    """One ``name=value`` of the form (WHATWG URL §5.1), strictly: the ``=`` is required."""
    name, equals, value = part.partition("=")
    if not equals:
        raise ValueError("form field without '='")
    return _form_decode(name), _form_decode(value)


def parse_form(body: bytes) -> FormParams:
    """Parse an ``application/x-www-form-urlencoded`` body strictly.

    The body must be ASCII (RFC 6749 Appendix B percent-encodes everything else), its
    percent-decoded values valid UTF-8 without control characters, no value empty, and no
    parameter other than ``audience``/``resource`` present twice.
    """
    if len(body) > MAX_BODY_BYTES:
        raise InvalidRequestError("The request body is too large.", reason="body over size cap")
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError:
        raise InvalidRequestError(reason="body is not ASCII form encoding") from None
    if not text:
        return FormParams({})
    if not text.isprintable():  # for ASCII: a control character (0x00-0x1f, 0x7f) somewhere
        raise InvalidRequestError(reason="control character in a parameter")
    if text.count("&") >= MAX_PARAMETERS:
        raise InvalidRequestError(reason="too many parameters")
    try:
        pairs = [_parse_pair(part) for part in text.split("&")]
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequestError(reason="malformed form body") from None

    values: dict[str, list[str]] = {}
    for name, value in pairs:
        if name == "":
            raise InvalidRequestError(reason="parameter without a name")
        if value == "":
            raise InvalidRequestError("A parameter has an empty value.", reason="empty value")
        if name in values and name not in REPEATABLE:
            raise InvalidRequestError(
                "A parameter is included more than once.", reason=f"repeated parameter {name}"
            )
        values.setdefault(name, []).append(value)
    return FormParams(values)


def _require(params: FormParams, name: str) -> str:
    value = params.single(name)
    if value is None:
        raise InvalidRequestError(
            "A required parameter is missing.", reason=f"missing parameter {name}"
        )
    return value


def _token_type(params: FormParams, name: str, *, default: str | None = None) -> str | None:
    value = params.single(name) or default
    if value is not None and value not in SUPPORTED_TOKEN_TYPES:
        raise InvalidRequestError("The token type is not supported.", reason=f"unsupported {name}")
    return value


def _token(params: FormParams, name: str) -> str | None:
    value = params.single(name)
    if value is not None and len(value) > MAX_TOKEN_CHARS:
        raise InvalidRequestError("A token is too large.", reason=f"{name} over size cap")
    return value


def parse_resource(value: str) -> str:
    """RFC 8707 §2: "absolute URI ... MUST NOT include a fragment component"."""
    try:
        parts = urlsplit(value)
    except ValueError:
        raise InvalidTargetError(reason="malformed resource URI") from None
    if not parts.scheme or not parts.netloc or parts.fragment or "#" in value:
        raise InvalidTargetError(reason="resource is not an absolute URI without fragment")
    if _is_local_address(parts.hostname or ""):
        # A token for a loopback or link-local address (a cloud metadata service, say) is never
        # what a gateway should ask for, whatever a policy says.
        raise InvalidTargetError(reason="resource names a loopback or link-local address")
    return value


def _is_local_address(host: str) -> bool:
    if host.rstrip(".").lower() == "localhost" or host.rstrip(".").lower().endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return (
        address.is_loopback
        or address.is_link_local
        or address.is_unspecified
        or address.is_multicast
        or (isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None
            and _is_local_address(str(address.ipv4_mapped)))
    )  # fmt: skip


def parse_scope(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    if len(value) > MAX_SCOPE_CHARS:
        raise InvalidScopeError(reason="scope over size cap")
    # RFC 6749 §3.3: "a list of space-delimited, case-sensitive strings".
    scopes = value.split(" ")
    if any(not SCOPE_TOKEN.match(scope) for scope in scopes):
        raise InvalidScopeError(reason="malformed scope")
    return tuple(dict.fromkeys(scopes))


def parse_token_exchange(params: FormParams) -> TokenExchangeRequest:
    """Read the RFC 8693 §2.1 parameters of an already-parsed form."""
    _require(params, "subject_token")
    subject_token = _token(params, "subject_token")
    subject_token_type = _require(params, "subject_token_type")
    _token_type(params, "subject_token_type")

    actor_token = _token(params, "actor_token")
    actor_token_type = _token_type(params, "actor_token_type")
    # RFC 8693 §2.1: actor_token_type "is REQUIRED when the actor_token parameter is present
    # in the request but MUST NOT be included otherwise."
    if (actor_token is None) != (actor_token_type is None):
        raise InvalidRequestError(reason="actor_token and actor_token_type must come together")

    requested = _token_type(params, "requested_token_type", default=ACCESS_TOKEN_TYPE)
    assert requested is not None

    audiences = params.many("audience")
    resources = [parse_resource(value) for value in params.many("resource")]
    if not audiences and not resources:
        raise InvalidRequestError(
            "An audience or resource parameter is required.", reason="no target requested"
        )
    if len(audiences) + len(resources) > MAX_TARGETS:
        raise InvalidTargetError(reason="too many targets")
    if any(len(target) > MAX_TARGET_CHARS for target in (*audiences, *resources)):
        raise InvalidTargetError(reason="target over size cap")

    assert subject_token is not None  # _require above
    return TokenExchangeRequest(
        subject_token=subject_token,
        subject_token_type=subject_token_type,
        audiences=tuple(audiences),
        resources=tuple(resources),
        scopes=parse_scope(params.single("scope")),
        requested_token_type=requested,
        actor_token=actor_token,
        actor_token_type=actor_token_type,
    )
