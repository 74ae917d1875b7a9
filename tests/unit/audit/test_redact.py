"""What the audit trail keeps of a client's values (sidecar/audit/redact.py): a JWT only as its
SHA-256 prefix, a URI without its userinfo, every value within a bound, and every text in a form
any database stores. The trail applying these rules on each of its paths (row, log line, a denial
only logged) is tested in test_trail.py."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import jwt
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from sidecar.audit import (
    FIELDS,
    MAX_AUDIENCES,
    MAX_SCOPE_TEXT,
    MAX_TEXT,
    AuditEvent,
    fingerprint,
    redact_value,
    redact_words,
)
from sidecar.audit.log import event_values
from sidecar.audit.redact import make_storable, redact_audiences, storable, storable_values
from sidecar.exchange.subject import token_fingerprint

JWT_KEY = "k" * 32  # HS256: a JWT of realistic shape without a key pair


def a_jwt(**claims: Any) -> str:
    payload = {"iss": "https://idp.test.example", "sub": "alice", "scope": "code.read", **claims}
    return jwt.encode(payload, JWT_KEY, algorithm="HS256")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def sha256_prefix(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


JWT_SHAPES = {
    "JWS": a_jwt(),
    "JWE (five segments)": ".".join(
        [b64url(b'{"alg":"RSA-OAEP","enc":"A256GCM"}'), "x" * 342, "y" * 16, "z" * 200, "t" * 22]
    ),
    "header with a space": ".".join([b64url(b'{ "alg": "HS256" }'), b64url(b"{}"), "s" * 43]),
    "header with a newline": ".".join([b64url(b'{\n"alg":"HS256"}'), b64url(b"{}"), "s" * 43]),
    "no JSON header, long segments": ".".join(["A" * 20, "B" * 64, "C" * 43]),
    "starts with eyJ, no dots": "eyJhbGciOiJIUzI1NiJ9",
    "unsigned (empty signature)": a_jwt().rpartition(".")[0] + ".",
}


@pytest.mark.parametrize("token", JWT_SHAPES.values(), ids=JWT_SHAPES.keys())
def test_a_jwt_is_kept_only_as_its_sha256_prefix(token: str) -> None:
    marker = redact_value(token)
    assert marker == "sha256:" + sha256_prefix(token)
    assert redact_words(f"code.read {token} code.search") == f"code.read {marker} code.search"


def test_the_marker_uses_the_prefix_of_subject_token_sha256() -> None:
    token = a_jwt()
    assert redact_value(token) == fingerprint(token) == "sha256:" + token_fingerprint(token)


@pytest.mark.parametrize(
    "template",
    ["Bearer {}", "https://api.example.com/x?access_token={}&y=1", "a,{},b", "x {} y"],
)
def test_a_jwt_inside_a_value_is_replaced_by_its_sha256_prefix(template: str) -> None:
    token = a_jwt()
    redacted = redact_value(template.format(token))
    assert redacted == template.format("sha256:" + sha256_prefix(token))


@pytest.mark.parametrize(
    "value",
    [
        "gateway",
        "api.example.com",
        "eyes.example.com",  # begins like a JSON header, but a host name
        "a.b.c.d.e",
        "https://code-search.internal/mcp",
        "https://api.example.com/v1/users/@alice",  # an @ in the path is no userinfo
        "alice@example.com",
        "mailto:alice@example.com",
        "code.read",
        "x" * 63 + ".y" * 3,  # a DNS label can be 63 characters long
        "urn:ietf:params:oauth:token-type:access_token",
    ],
)
def test_ordinary_values_are_kept_as_they_are(value: str) -> None:
    assert redact_value(value) == value
    assert redact_words(f"{value} {value}") == f"{value} {value}"


@pytest.mark.parametrize(
    "value", ["gateway", "https://code-search.internal/mcp", "alice@example.com", "code.read"]
)
def test_a_common_value_is_returned_without_a_copy(value: str) -> None:
    # The cheap path taken on every /token request: the same object back, no scan beyond `in`.
    value = "".join(value)  # not an interned literal
    assert redact_value(value) is value


@pytest.mark.parametrize(
    ("value", "kept"),
    [
        ("https://user:s3cret@host/x", "https://host/x"),
        ("https://user:s3cret@host", "https://host"),
        ("https://user:s3cret@host?q=1#f", "https://host?q=1#f"),
        ("https://:s3cret@host/x", "https://host/x"),
        ("https://user@host/x", "https://host/x"),
        ("//user:s3cret@host/x", "//host/x"),  # scheme-relative
        ("HTTPS://USER:S3CRET@HOST/X", "HTTPS://HOST/X"),
        ("https://user:s3c@ret@host/x", "https://host/x"),  # the last @ ends the userinfo
        ("https://user:s3c ret@host/x", "https://host/x"),  # not a valid URI: dropped anyway
        ("https://user:s3cret\\@host/x", "https://host/x"),  # a backslash does not hide it
        ("https://user:s3cret@[::1", "https://[::1"),  # urlsplit would raise here
        ("x https://a:s3cret@h/ and ftp://b:s3cret@g/", "x https://h/ and ftp://g/"),
        ("https://a:s3cret@h//b:s3cret@g/x", "https://h//g/x"),
        ("\ud800://u:s3cret@h/x", "\ud800://h/x"),  # a lone surrogate: no encoding attempted
    ],
)
def test_userinfo_is_dropped_from_uris(value: str, kept: str) -> None:
    assert redact_value(value) == kept


def test_long_values_are_cut_to_a_short_bound() -> None:
    assert MAX_TEXT == 255
    assert redact_value("a" * 10_000) == "a" * MAX_TEXT
    assert redact_value("https://u:s3cret@" + "h" * 10_000) == "https://" + "h" * (MAX_TEXT - 8)
    assert redact_value("a" * 10_000, limit=16) == "a" * 16


def test_a_scope_is_bounded_word_by_word_and_in_total() -> None:
    scope = " ".join(["s" * 10_000, "code.read"])
    assert redact_words(scope, MAX_SCOPE_TEXT) == "s" * MAX_TEXT + " code.read"
    many = " ".join(f"scope.{n:04d}" for n in range(1_000))
    assert redact_words(many, MAX_SCOPE_TEXT) == many[:MAX_SCOPE_TEXT]
    assert redact_words("", MAX_SCOPE_TEXT) == ""


@given(
    prefix=st.text(max_size=40),
    rest=st.text(max_size=40),
    other=st.text(max_size=300),
    limit=st.integers(min_value=23, max_value=MAX_TEXT),
)
@settings(max_examples=300, deadline=None)
def test_any_text_is_redacted_without_raising_and_within_the_bound(
    prefix: str, rest: str, other: str, limit: int
) -> None:
    assume("s3cret" not in prefix + rest)
    value = f"{prefix}https://user:s3cret@{rest}"
    for text in (value, other, f"{other} {value}"):
        redacted = redact_value(text, limit)
        assert len(redacted) <= limit
        assert len(redact_words(text, limit)) <= limit
    assert "s3cret" not in redact_value(value, limit)
    assert "s3cret" not in redact_words(f"{other} {value}", MAX_SCOPE_TEXT)


# --- fingerprint --------------------------------------------------------------------------------


def test_a_fingerprint_is_the_marked_16_hex_digit_sha256_prefix() -> None:
    assert fingerprint("any text") == "sha256:" + sha256_prefix("any text")
    assert len(fingerprint("x" * 10_000)) == len("sha256:") + 16


def test_a_fingerprint_of_a_lone_surrogate_does_not_raise() -> None:
    # A value JSON admits but UTF-8 cannot encode: fingerprinted all the same, and not as "?".
    assert fingerprint("tok\ud800en").startswith("sha256:")
    assert fingerprint("tok\ud800en") != fingerprint("tok?en")


# --- storable text ------------------------------------------------------------------------------


def test_ascii_text_is_storable_as_it_is() -> None:
    text = "".join(["alice", "@example.com"])  # not an interned literal
    assert storable(text) is text


def test_non_ascii_text_is_kept() -> None:
    assert storable("üser-ñ 名前") == "üser-ñ 名前"


def test_a_lone_surrogate_and_a_nul_are_replaced() -> None:
    assert storable("bad\ud800") == "bad?"
    assert storable("nul\x00actor") == "nul\ufffdactor"


# --- audiences ----------------------------------------------------------------------------------


def test_ordinary_audiences_are_returned_as_the_same_list() -> None:
    audiences = ["https://code-search.internal/mcp", "https://tickets.internal/mcp"]
    assert redact_audiences(audiences) is audiences


def test_audiences_to_redact_come_back_in_a_new_list() -> None:
    token = a_jwt()
    audiences = ["https://ok.example", token, "https://u:s3cret@host/x"]

    redacted = redact_audiences(audiences)

    assert redacted == ["https://ok.example", "sha256:" + sha256_prefix(token), "https://host/x"]
    assert audiences == ["https://ok.example", token, "https://u:s3cret@host/x"]  # left alone


def test_at_most_max_audiences_are_kept() -> None:
    audiences = [f"https://a{n}.example" for n in range(MAX_AUDIENCES + 5)]
    assert redact_audiences(audiences) == audiences[:MAX_AUDIENCES]


# --- an event's values ----------------------------------------------------------------------------


def values(**fields: Any) -> dict[str, Any]:
    return event_values(AuditEvent(at=1.0, **fields))


def test_make_storable_changes_the_values_in_place_and_returns_them() -> None:
    given_values = values(subject=a_jwt())
    assert make_storable(given_values) is given_values
    assert given_values["subject"].startswith("sha256:")


@pytest.mark.parametrize("name", ["client_id", "subject", "actor", "reason", "scope"])
def test_each_field_a_client_or_an_idp_fills_is_redacted(name: str) -> None:
    token = a_jwt()
    stored = make_storable(values(**{name: f"x https://u:s3cret@host/ {token}"}))
    assert stored[name] == f"x https://host/ sha256:{sha256_prefix(token)}"


def test_a_single_value_field_is_redacted_as_one_value_not_word_by_word() -> None:
    token = a_jwt()
    stored = make_storable(values(subject="s" * 200 + " " + token))
    # One value: cut at MAX_TEXT after the embedded JWT is replaced.
    assert stored["subject"] == ("s" * 200 + " sha256:" + sha256_prefix(token))[:MAX_TEXT]


def test_the_scope_keeps_up_to_max_scope_text_characters() -> None:
    scope = " ".join(f"scope.{n:04d}" for n in range(200))  # 2,199 characters of short words
    stored = make_storable(values(scope=scope))
    assert stored["scope"] == scope[:MAX_SCOPE_TEXT]
    assert len(stored["scope"]) == MAX_SCOPE_TEXT > MAX_TEXT


@pytest.mark.parametrize("name", ["client_id", "subject", "actor", "reason"])
def test_the_other_client_fields_keep_up_to_max_text_characters(name: str) -> None:
    assert make_storable(values(**{name: "v" * 1000}))[name] == "v" * MAX_TEXT


def test_the_sidecars_own_fields_are_not_redacted() -> None:
    # error, jti, kid and the fingerprint are the sidecar's; subject_issuer is a configured
    # trusted issuer: kept as they are (the columns bound them, see test_sql.py).
    own = {
        "error": "invalid_target",
        "jti": "j" * 300,
        "kid": "eyJ-not-a-token-but-kept",
        "subject_token_sha256": "0123456789abcdef",
        "subject_issuer": "https://idp.example/" + "p" * 300,
    }
    assert {name: value for name, value in make_storable(values(**own)).items() if name in own} == (
        own
    )


def test_every_text_field_is_made_storable() -> None:
    numbers = ("at", "expires_at", "latency_ms", "audiences")
    text_fields = [name for name in FIELDS if name not in numbers]
    stored = make_storable(values(**dict.fromkeys(text_fields, "nul\x00")))
    assert {name: stored[name] for name in text_fields} == dict.fromkeys(text_fields, "nul\ufffd")


def test_storable_values_leave_the_event_alone() -> None:
    token = a_jwt()
    audiences = [token]
    event = AuditEvent(at=1.0, subject=token, audiences=audiences)

    stored = storable_values(event)

    assert stored["subject"] == stored["audiences"][0] == "sha256:" + sha256_prefix(token)
    assert (event.subject, event.audiences) == (token, [token])
    assert event.audiences is audiences
