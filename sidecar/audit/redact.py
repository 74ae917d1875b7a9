"""What the audit trail keeps of a value a client sent: nothing verbatim beyond a short bound.

A subject token pasted into ``audience`` or ``scope`` by mistake, or a password in a
``resource`` URI's userinfo, would otherwise sit in the log and the table for as long as they are
kept, readable by everyone who may read the audit trail. :func:`make_storable` runs once per
event, and both the log line and the row come from its result, so the two hold the same text.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from typing import Any

from sidecar.audit.event import FIELDS, AuditEvent
from sidecar.audit.log import event_values

# Column limits: a long `sub` from an IdP must not turn a batch into a failed insert.
TRUNCATED = ("reason", "subject", "actor", "client_id")
MAX_TEXT = 255  # also the bound of each value from a request (an audience, a scope token)
MAX_SCOPE_TEXT = 1024  # the whole scope string (a Text column: the bound is ours)
MAX_AUDIENCES = 16  # the request parser allows 8 targets; the audit keeps its own bound


def storable(text: str) -> str:
    """A string every database stores: claim values come from IdPs, and a lone surrogate (which
    JSON admits) or a NUL (which PostgreSQL refuses) must not make a batch fail for ever."""
    if text.isascii() and "\x00" not in text:
        return text
    return text.encode("utf-8", "replace").decode("utf-8").replace("\x00", "\ufffd")


# Three to five base64url segments: a JWS (3) or JWE (5) compact serialization.
_JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]{2,}(?:\.[A-Za-z0-9_-]*){2,4}")
# One inside a longer value ("https://host/x?token=eyJ...", "Bearer eyJ..."): a JOSE header is
# a JSON object, so its base64url begins "eyJ" ('{"').
_EMBEDDED_JWT = re.compile(r"(?:eyJ|eyA|ewo|ewk|ew0)[A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]*){2,4}")
_JSON_START = ("ey", "ew")  # base64url of '{' followed by '"', ' ' or a line break / tab
_MIN_HEADER = 15  # characters of the shortest JOSE header, {"alg":"x"}, in base64url
_MAX_LABEL = 63  # a DNS label: a longer dot-separated segment is no host name
_PLAIN = _MAX_LABEL + 2  # no value this short or shorter is a JWT unless it starts "ey"/"ew"


def fingerprint(text: str) -> str:
    """What stands for a token in the audit trail: the short SHA-256 prefix of
    ``subject_token_sha256``, marked as such."""
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    return "sha256:" + digest[:16]


def _looks_like_jwt(text: str) -> bool:
    # Three dotted segments alone would also match every host name ("api.example.com"), which
    # the audit must keep readable: a JWT is told apart by its JSON header or its length.
    if text.startswith("eyJ"):
        return True
    json_start = text.startswith(_JSON_START)
    if not json_start and len(text) <= _PLAIN:
        return False
    if text.count(".") < 2 or _JWT_SHAPE.fullmatch(text) is None:
        return False
    segments = text.split(".")
    if json_start and len(segments[0]) >= _MIN_HEADER:
        return True
    return max(len(segment) for segment in segments) > _MAX_LABEL


def _drop_userinfo(text: str) -> str:
    """Every ``//userinfo@`` cut out, found by hand rather than by a URI parser, which refuses
    (or reads differently) the malformed values an attacker sends. The authority ends at the
    first ``/``, ``?`` or ``#`` (RFC 3986 §3.2); a backslash does not end it here, so that text
    a browser would read as a password is dropped too."""
    start = text.find("//")
    while start != -1:
        start += 2
        end = len(text)
        for stop in "/?#":
            found = text.find(stop, start, end)
            if found != -1:
                end = found
        at = text.rfind("@", start, end)
        if at != -1:
            text = text[:start] + text[at + 1 :]
            end = start + (end - at - 1)
        start = text.find("//", end)
    return text


def redact_value(text: str, limit: int = MAX_TEXT) -> str:
    """``text`` as the audit may keep it: a JWT as its :func:`fingerprint` (also one inside the
    value), a URI without its userinfo, at most ``limit`` characters. Never raises."""
    if (
        len(text) <= _PLAIN
        and len(text) <= limit
        and ("@" not in text or "//" not in text)
        and "ey" not in text
        and "ew" not in text
    ):
        return text  # the common case: a host name, a URI, an e-mail address, a scope token
    if _looks_like_jwt(text):
        return fingerprint(text)[:limit]
    if "@" in text:
        text = _drop_userinfo(text)
    if "ey" in text or "ew" in text:  # a JOSE header's base64url begins so
        text = _EMBEDDED_JWT.sub(lambda match: fingerprint(match[0]), text)
    return text[:limit]


def redact_words(text: str, limit: int = MAX_TEXT) -> str:
    """A space-separated text (a scope, a reason that quotes requested scopes or a parameter's
    name) with each word as :func:`redact_value` keeps it, at most ``limit`` characters."""
    if (
        len(text) <= _PLAIN
        and len(text) <= limit
        and ("@" not in text or "//" not in text)
        and " ey" not in text
        and " ew" not in text
        and not text.startswith(_JSON_START)
    ):
        return text  # no word in it can be a JWT or carry userinfo
    return " ".join([redact_value(word) for word in text.split(" ")])[:limit]


def redact_audiences(audiences: list[str]) -> list[str]:
    """The audiences redacted, in a new list (the event's own is left as it is); the same list
    when none needs it, the usual case."""
    if len(audiences) <= MAX_AUDIENCES:
        for audience in audiences:
            if len(audience) > _PLAIN or "ey" in audience or "ew" in audience or "@" in audience:
                break
        else:
            return audiences
    return [redact_value(audience) for audience in audiences[:MAX_AUDIENCES]]


# Fields holding a str or None, and the columns cut to their size.
_TEXT = tuple(
    name for name in FIELDS if name not in ("at", "expires_at", "latency_ms", "audiences")
)
# Fields that may hold what a client sent, and how each is redacted. audiences: the request's
# targets, recorded before any check. reason: quotes the requested scope tokens a policy refused
# and the name of a repeated form parameter. scope (only on a grant, within what the policy
# allows), client_id (only once authenticated), subject and actor (only from a verified token):
# bounded all the same, since a client's or an IdP's values are no more trusted for the audit.
# The other fields are the sidecar's own (error, jti, kid, the fingerprint) or a configured
# trusted issuer (subject_issuer).
_REDACTED: tuple[tuple[str, Callable[[str], str]], ...] = (
    ("reason", redact_words),
    ("client_id", redact_value),
    ("subject", redact_value),
    ("actor", redact_value),
    ("scope", lambda text: redact_words(text, MAX_SCOPE_TEXT)),
)


def make_storable(values: dict[str, Any]) -> dict[str, Any]:
    """The event's values (in place) with what came from the request redacted, and every text
    as any database stores it: the log line and the row then hold the same text."""
    for name in _TEXT:
        value = values[name]
        if value is not None and (not value.isascii() or "\x00" in value):
            values[name] = storable(value)
    for name, redact in _REDACTED:
        value = values[name]
        # (The checks of redact_value's first line, loosened: no call for the usual values.)
        if value is not None and (
            len(value) > _PLAIN or "ey" in value or "ew" in value or "@" in value
        ):
            values[name] = redact(value)
    if values["audiences"]:
        values["audiences"] = redact_audiences(values["audiences"])
    return values


def storable_values(event: AuditEvent) -> dict[str, Any]:
    return make_storable(event_values(event))
