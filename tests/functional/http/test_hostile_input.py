"""Hostile requests to POST /token, over real HTTP, as one table (issue 6).

Every row is an attack: a broken transport or form, a forged or malformed subject or actor token,
a look-alike or forbidden target, an over-reaching scope, a delegation the subject did not allow.
Each must end in the docs/design.md §2 status and OAuth error with a fixed description that echoes
nothing, no stack trace, no 5xx, no token, the no-store headers, an audit record of the denial,
and no token or secret in any log line. Key-fetching headers (``jku``, ``x5u``, ...) point at a
loopback server that counts what reaches it: nothing may.

The table runs against the app on the in-process server and against ``sidecar serve`` (granian,
its default workers; each request on a new connection, so either worker may answer it), whose
log is its own output.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from jwt.algorithms import ECAlgorithm, get_default_algorithms

from tests.conftest import (
    ACCESS_TOKEN_TYPE,
    CLIENT_ASSERTION_TYPE,
    CODE_SEARCH,
    DISABLED,
    GATEWAY_SECRET,
    JWT_TOKEN_TYPE,
    OTHER_SECRET,
    TICKETS,
    TOKEN_EXCHANGE,
    ClientKeys,
    FakeClock,
    Gateway,
    InProcessGateway,
    ServedGateway,
    TestIdP,
    base_config,
    live_service,
    start_served_gateway,
)
from tests.functional.http.helpers import REQUEST_PARAMETERS, assert_oauth_error, send_exactly
from tests.loopback import CountingHttpServer

FORM = "application/x-www-form-urlencoded"
ID_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:id_token"
PAYMENTS = "https://payments.internal/mcp"
GATEWAY = ("gateway", GATEWAY_SECRET)


# --- keys, issuers and the server under attack -------------------------------------------------


class SecondIdP(TestIdP):
    """Another trusted issuer, with kids of its own."""

    __test__ = False
    issuer = "https://idp2.test.example"

    def __init__(self, directory: Path, rsa_key: rsa.RSAPrivateKey) -> None:
        directory.mkdir()
        super().__init__(directory, rsa_key)  # the RSA key is not published: EC only
        self.keys = {"idp2-ec": (self.ec_key, "ES256")}
        self.write_jwks()


@dataclass
class Arsenal:
    """What the attacks are built from: the trusted issuers, an attacker's own keys, and the
    counting server the attacker points key URLs at."""

    directory: Path
    idp: TestIdP
    idp2: SecondIdP
    client_keys: ClientKeys
    attacker_rsa: rsa.RSAPrivateKey
    attacker_ec: ec.EllipticCurvePrivateKey
    trap: CountingHttpServer

    def config(self, database_url: str) -> dict[str, Any]:
        config = base_config(self.idp, self.client_keys, database_url)
        config["trusted_issuers"].append(
            {
                "issuer": self.idp2.issuer,
                "jwks_file": str(self.idp2.jwks_path),
                "audiences": [self.idp2.audience],
                "algorithms": ["ES256"],
            }
        )
        return config


@dataclass
class Kit(Arsenal):
    """The arsenal and the server under attack."""

    gateway: Gateway


@pytest.fixture(scope="module")
def arsenal(
    tmp_path_factory: pytest.TempPathFactory, idp_rsa_key: rsa.RSAPrivateKey
) -> Iterator[Arsenal]:
    directory = tmp_path_factory.mktemp("hostile")
    attacker_ec = ec.generate_private_key(ec.SECP256R1())
    attacker_jwk = ECAlgorithm.to_jwk(attacker_ec.public_key(), as_dict=True)
    # The trap serves the attacker's key under the victim's kids: following a jku would verify.
    trap = CountingHttpServer(
        {"keys": [{**attacker_jwk, "kid": kid, "alg": "ES256"} for kid in ("rsa-1", "ec-1")]}
    )
    yield Arsenal(
        directory=directory,
        idp=TestIdP(directory, idp_rsa_key),
        idp2=SecondIdP(directory / "idp2", idp_rsa_key),
        client_keys=ClientKeys(),
        attacker_rsa=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        attacker_ec=attacker_ec,
        trap=trap,
    )
    trap.stop()


@pytest.fixture(scope="module")
def kit(arsenal: Arsenal, gateway_target: str) -> Iterator[Kit]:
    # One server per target for the whole table: each row is one request, and its audit row is
    # told apart by id. (A server per row would cost a migration and a key per row.)
    directory = arsenal.directory / gateway_target
    directory.mkdir()
    config = arsenal.config(f"sqlite:///{directory / 'sidecar.db'}")
    parts = {name: getattr(arsenal, name) for name in Arsenal.__dataclass_fields__}
    if gateway_target == "serve":
        served = start_served_gateway(directory, config, arsenal.idp, arsenal.client_keys)
        try:
            yield Kit(**parts, gateway=served)
        finally:
            served.stop()
        return
    with live_service(config) as (services, server):
        yield Kit(
            **parts,
            gateway=InProcessGateway(server, services, config, arsenal.idp, arsenal.client_keys),
        )


# --- forging tokens ----------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segment(value: Any) -> str:
    return b64(value if isinstance(value, bytes) else json.dumps(value).encode())


def claims(kit: Kit, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    payload: dict[str, Any] = {
        "iss": kit.idp.issuer,
        "sub": "alice@example.com",
        "aud": kit.idp.audience,
        "iat": now,
        "exp": now + 600,
        "scope": "code.read code.search",
        "jti": secrets.token_urlsafe(8),
    }
    payload.update(overrides)
    return {k: v for k, v in payload.items() if v is not OMIT}


OMIT = object()


def signed(
    header: dict[str, Any] | bytes,
    payload: dict[str, Any] | bytes,
    key: Any,
    alg: str,
) -> str:
    """A compact JWS over exactly these header and payload bytes, signed with ``alg``."""
    signing_input = f"{segment(header)}.{segment(payload)}"
    signature = get_default_algorithms()[alg].sign(signing_input.encode(), key)
    return f"{signing_input}.{b64(signature)}"


def with_signature(header: Any, payload: Any, signature: bytes) -> str:
    return f"{segment(header)}.{segment(payload)}.{b64(signature)}"


def genuine(
    kit: Kit, header: dict[str, Any] | None = None, *, ec: bool = False, **overrides: Any
) -> str:
    """Signed with the trusted issuer's real RSA key (with ``ec``, its EC key): only what the row
    changes is wrong."""
    kid, alg, key = ("ec-1", "ES256", kit.idp.ec_key) if ec else ("rsa-1", "RS256", kit.idp.rsa_key)
    return signed(
        {"alg": alg, "typ": "JWT", "kid": kid, **(header or {})}, claims(kit, **overrides), key, alg
    )


def hmac_signed(kit: Kit, alg: str, secret: bytes, kid: str = "rsa-1") -> str:
    """Algorithm confusion: HMAC keyed with the issuer's *public* key material."""
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    signing_input = f"{segment({'alg': alg, 'typ': 'JWT', 'kid': kid})}.{segment(claims(kit))}"
    signature = hmac.new(secret, signing_input.encode(), digest).digest()
    return f"{signing_input}.{b64(signature)}"


def public_pem(key: Any, fmt: serialization.PublicFormat) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, fmt)


def public_der(key: Any) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def published_jwk(kit: Kit, kid: str) -> dict[str, Any]:
    [jwk] = [k for k in json.loads(kit.idp.jwks_path.read_text())["keys"] if k["kid"] == kid]
    return dict(jwk)


def self_signed_certificate(key: ec.EllipticCurvePrivateKey) -> str:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idp.test.example")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return base64.b64encode(certificate.public_bytes(serialization.Encoding.DER)).decode()


def attacker_signed(kit: Kit, header: dict[str, Any], **overrides: Any) -> str:
    """Signed with the attacker's key, carrying a header that says where to find it."""
    return signed(
        {"alg": "ES256", "typ": "JWT", **header}, claims(kit, **overrides), kit.attacker_ec, "ES256"
    )


def nested_act(depth: int) -> dict[str, Any]:
    act: dict[str, Any] = {"sub": f"service-{depth}"}
    for level in range(depth - 1, 0, -1):
        act = {"sub": f"service-{level}", "act": act}
    return act


def mint_our_own(kit: Kit) -> str:
    before = kit.gateway.last_audit_id(settle=False)
    response = kit.gateway.exchange(genuine(kit))
    assert response.status_code == 200, response.text
    # Its grant is written before the attack starts counting audit rows.
    assert len(kit.gateway.audit_rows(after_id=before, expected=1)) == 1
    return str(response.json()["access_token"])


# --- the requests ------------------------------------------------------------------------------


@dataclass
class Hostile:
    """One request: a form (name/value pairs) or a raw body, and how it is sent."""

    form: list[tuple[str, str]] | None = None
    body: bytes | Iterator[bytes] | None = None
    content_type: str | None = FORM
    method: str = "POST"
    query: str = ""
    auth: tuple[str, str] | None = GATEWAY
    declared_length: int | None = None  # a Content-Length that is not the body's
    # Tokens and secrets the row sends: never in the response, never in a log line.
    secrets: tuple[str, ...] = field(default_factory=tuple)
    # Other request input: never echoed in the response (the audit trail may name a target).
    inputs: tuple[str, ...] = field(default_factory=tuple)


def exchange(subject: str, *extra: tuple[str, str], **params: str | None) -> Hostile:
    """A token-exchange form with ``subject`` (params override, None drops one)."""
    values: dict[str, str | None] = {
        "grant_type": TOKEN_EXCHANGE,
        "subject_token": subject,
        "subject_token_type": ACCESS_TOKEN_TYPE,
        "audience": CODE_SEARCH,
    }
    values.update(params)
    form = [(k, v) for k, v in values.items() if v is not None] + list(extra)
    return Hostile(form=form, secrets=(subject, *(v for _, v in extra)))


def subject_attack(make: Callable[[Kit], str]) -> Callable[[Kit], Hostile]:
    def build(kit: Kit) -> Hostile:
        return exchange(make(kit))

    return build


def actor_attack(make: Callable[[Kit], str]) -> Callable[[Kit], Hostile]:
    def build(kit: Kit) -> Hostile:
        actor = make(kit)
        request = exchange(genuine(kit), actor_token=actor, actor_token_type=ACCESS_TOKEN_TYPE)
        request.secrets += (actor,)
        return request

    return build


def send(kit: Kit, request: Hostile) -> requests.Response:
    url = kit.gateway.token_url + (f"?{request.query}" if request.query else "")
    headers = {"Content-Type": request.content_type} if request.content_type else {}
    if request.declared_length is not None:
        return _send_with_declared_length(kit, request, headers)
    data: Any = request.body if request.body is not None else request.form
    return send_exactly(request.method, url, data, request.content_type, auth=request.auth)


def _send_with_declared_length(
    kit: Kit, request: Hostile, headers: dict[str, str]
) -> requests.Response:
    # requests always tells the truth about the length; http.client sends what it is told.
    assert isinstance(request.body, bytes)
    connection = http.client.HTTPConnection("127.0.0.1", int(kit.gateway.url.rsplit(":", 1)[1]))
    try:
        connection.putrequest("POST", "/token")
        for name, value in headers.items():
            connection.putheader(name, value)
        if request.auth:
            basic = base64.b64encode(":".join(request.auth).encode()).decode()
            connection.putheader("Authorization", f"Basic {basic}")
        connection.putheader("Content-Length", str(request.declared_length))
        connection.endheaders(request.body)
        raw = connection.getresponse()
        response = requests.Response()
        response.status_code = raw.status
        response.headers.update(dict(raw.getheaders()))
        response._content = raw.read()
        return response
    finally:
        connection.close()


# --- the table ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Attack:
    build: Callable[[Kit], Hostile]
    status: int
    error: str


def refused(build: Callable[[Kit], Hostile], error: str = "invalid_request") -> Attack:
    return Attack(build, 400, error)


TABLE: dict[str, Attack] = {}


def table(category: str, rows: dict[str, Attack]) -> None:
    for name, attack in rows.items():
        TABLE[f"{category}:{name}"] = attack


# Transport and form -----------------------------------------------------------------------------


def _method(method: str) -> Callable[[Kit], Hostile]:
    def build(kit: Kit) -> Hostile:
        request = exchange(genuine(kit))
        request.method = method
        return request

    return build


def _body(
    content_type: str | None, encode: Callable[[list[tuple[str, str]]], bytes]
) -> Callable[[Kit], Hostile]:
    def build(kit: Kit) -> Hostile:
        subject = genuine(kit)
        form = exchange(subject).form or []
        return Hostile(body=encode(form), content_type=content_type, secrets=(subject,))

    return build


def _multipart(form: list[tuple[str, str]]) -> bytes:
    parts = [
        f'--b0undary\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n' for k, v in form
    ]
    return ("".join(parts) + "--b0undary--\r\n").encode()


def _urlencoded(form: list[tuple[str, str]]) -> bytes:
    return urlencode(form).encode()


def _query(query: Callable[[str], str], *, keep_body: bool = True) -> Callable[[Kit], Hostile]:
    def build(kit: Kit) -> Hostile:
        subject = genuine(kit)
        request = exchange(subject)
        request.query = query(subject)
        if not keep_body:
            request.form = [(k, v) for k, v in request.form or [] if k != "subject_token"]
        return request

    return build


def _raw(suffix: bytes) -> Callable[[Kit], Hostile]:
    def build(kit: Kit) -> Hostile:
        subject = genuine(kit)
        body = _urlencoded(exchange(subject).form or []) + suffix
        return Hostile(body=body, secrets=(subject,))

    return build


def _tainted(name: str, taint: Callable[[str], str]) -> Callable[[Kit], Hostile]:
    """A form whose ``name`` parameter is replaced by a tainted variant of its usual value."""

    def build(kit: Kit) -> Hostile:
        subject, actor = genuine(kit), genuine(kit, sub="agent-7")
        usual = {
            "grant_type": TOKEN_EXCHANGE,
            "subject_token": subject,
            "subject_token_type": ACCESS_TOKEN_TYPE,
            "audience": CODE_SEARCH,
            "resource": CODE_SEARCH,
            "scope": "code.read",
            "requested_token_type": ACCESS_TOKEN_TYPE,
            "actor_token": actor,
            "actor_token_type": JWT_TOKEN_TYPE,
            "client_id": "gateway",
        }
        form = dict(usual)
        if name not in ("actor_token", "actor_token_type"):
            del form["actor_token"], form["actor_token_type"]
        if name == "client_id":
            form["client_secret"] = GATEWAY_SECRET
        form[name] = taint(usual[name])
        auth = None if name == "client_id" else GATEWAY
        return Hostile(
            form=list(form.items()), auth=auth, secrets=(subject, actor), inputs=(form[name],)
        )

    return build


def _repeated(name: str, second: str | None = None) -> Callable[[Kit], Hostile]:
    """A complete form in which ``name`` appears twice: the same value again, or ``second``."""

    def build(kit: Kit) -> Hostile:
        subject, actor = genuine(kit), genuine(kit, sub="agent-7")
        assertion = kit.client_keys.assertion()
        groups = {
            "scope": {"scope": "code.read"},
            "requested_token_type": {"requested_token_type": ACCESS_TOKEN_TYPE},
            "actor_token": {"actor_token": actor, "actor_token_type": JWT_TOKEN_TYPE},
            "client_id": {"client_id": "gateway", "client_secret": GATEWAY_SECRET},
            "client_assertion": {
                "client_assertion_type": CLIENT_ASSERTION_TYPE,
                "client_assertion": assertion,
            },
        }
        group = next((g for prefix, g in groups.items() if prefix in name), {})
        if name == "client_secret":
            group = groups["client_id"]
        form = [*(exchange(subject).form or []), *group.items()]
        form.append((name, second if second is not None else dict(form)[name]))
        auth = None if name.startswith("client_") else GATEWAY
        return Hostile(form=form, auth=auth, secrets=(subject, actor, assertion))

    return build


def _two_client_methods(*methods: str) -> Callable[[Kit], Hostile]:
    def build(kit: Kit) -> Hostile:
        subject, assertion = genuine(kit), kit.client_keys.assertion()
        request = exchange(subject)
        request.auth = GATEWAY if "basic" in methods else None
        if "post" in methods:
            request.form = [*(request.form or []), ("client_id", "gateway")]
            request.form.append(("client_secret", GATEWAY_SECRET))
        if "assertion" in methods:
            request.form = [*(request.form or []), ("client_assertion_type", CLIENT_ASSERTION_TYPE)]
            request.form.append(("client_assertion", assertion))
        request.secrets += (assertion,)
        return request

    return build


def _oversized_body(kit: Kit) -> Hostile:
    subject = genuine(kit)
    body = _urlencoded([*(exchange(subject).form or []), ("padding", "p" * (64 * 1024))])
    return Hostile(body=body, secrets=(subject,))


def _lying_length(declared: int) -> Callable[[Kit], Hostile]:
    def build(kit: Kit) -> Hostile:
        subject = genuine(kit)
        return Hostile(
            body=_urlencoded(exchange(subject).form or []),
            declared_length=declared,
            secrets=(subject,),
        )

    return build


def _chunked(kit: Kit) -> Hostile:
    subject = genuine(kit)
    return Hostile(body=iter([_urlencoded(exchange(subject).form or [])]), secrets=(subject,))


def _too_many_parameters(kit: Kit) -> Hostile:
    return exchange(genuine(kit), *[(f"x{i}", "1") for i in range(40)])


def _oversized_token(name: str) -> Callable[[Kit], Hostile]:
    def build(kit: Kit) -> Hostile:
        token = genuine(kit, padding="p" * (16 * 1024))
        if name == "subject_token":
            return exchange(token)
        request = exchange(genuine(kit), actor_token=token, actor_token_type=ACCESS_TOKEN_TYPE)
        request.secrets += (token,)
        return request

    return build


def _empty(name: str) -> Callable[[Kit], Hostile]:
    def build(kit: Kit) -> Hostile:
        if name == "client_id":
            request = exchange(genuine(kit), client_id="", client_secret=GATEWAY_SECRET)
            request.auth = None
            return request
        return exchange(genuine(kit), **{name: ""})

    return build


CONTROL = {"NUL": "\x00", "CR": "\r", "LF": "\n", "CRLF": "\r\n", "DEL": "\x7f", "TAB": "\t"}

table(
    "transport",
    {
        **{
            f"method-{m}": Attack(_method(m), 405, "invalid_request")
            for m in ("GET", "PUT", "DELETE", "PATCH")
        },
        "json-body": refused(_body("application/json", lambda f: json.dumps(dict(f)).encode())),
        "multipart-body": refused(_body("multipart/form-data; boundary=b0undary", _multipart)),
        "text-plain-body": refused(_body("text/plain", _urlencoded)),
        "xml-body": refused(_body("application/xml", _urlencoded)),
        "no-content-type": refused(_body(None, _urlencoded)),
        "form-type-suffixed": refused(_body(FORM + "x", _urlencoded)),
        "token-in-query": refused(
            _query(lambda s: urlencode({"subject_token": s}), keep_body=False)
        ),
        "token-in-query-and-body": refused(_query(lambda s: urlencode({"subject_token": s}))),
        "harmless-query": refused(_query(lambda s: "debug=1")),
        "grant-type-in-query": refused(_query(lambda s: urlencode({"grant_type": TOKEN_EXCHANGE}))),
        "body-over-64-kib": refused(_oversized_body),
        "declared-length-over-cap": refused(_lying_length(10_000_000)),
        "chunked-without-length": refused(_chunked),
        "too-many-parameters": refused(_too_many_parameters),
        "subject-token-over-cap": refused(_oversized_token("subject_token")),
        "actor-token-over-cap": refused(_oversized_token("actor_token")),
        "invalid-utf8-ff": refused(_raw(b"&scope=%FF%FE")),
        "invalid-utf8-truncated": refused(_raw(b"&scope=caf%C3")),
        "invalid-utf8-overlong": refused(_raw(b"&scope=%C0%AF")),
        "invalid-utf8-surrogate": refused(_raw(b"&scope=%ED%A0%80")),
        "invalid-utf8-in-a-name": refused(_raw(b"&%FF=1")),
        "raw-non-ascii-byte": refused(_raw(b"&scope=\xc3\xa9")),
        "raw-crlf-in-body": refused(_raw(b"&scope=code.read\r\nX-Injected: 1")),
        "raw-nul-in-body": refused(_raw(b"&scope=code\x00read")),
        "nameless-parameter": refused(_raw(b"&=value")),
        "valueless-parameter": refused(_raw(b"&novalue")),
        "empty-pairs": refused(_raw(b"&&&")),
        **{
            f"{char}-in-{name}": refused(_tainted(name, lambda v, c=c: v[:8] + c + v[8:]))
            for name in REQUEST_PARAMETERS
            for char, c in CONTROL.items()
            if char in ("NUL", "CR", "LF") or name in ("subject_token", "audience")
        },
        "NUL-in-a-parameter-name": refused(
            lambda kit: exchange(genuine(kit), ("sco\x00pe", "code.read"))
        ),
        "LF-in-a-parameter-name": refused(
            lambda kit: exchange(genuine(kit), ("scope\nX", "code.read"))
        ),
        **{
            f"empty-{name}": refused(_empty(name))
            for name in (
                "grant_type",
                "subject_token",
                "subject_token_type",
                "audience",
                "scope",
                "requested_token_type",
                "actor_token",
                "client_id",
            )
        },
        "empty-resource": refused(lambda kit: exchange(genuine(kit), ("resource", ""))),
        **{
            f"repeated-{label}": refused(_repeated(name, second))
            for label, name, second in (
                ("grant_type", "grant_type", None),
                ("grant_type-differing", "grant_type", "client_credentials"),
                ("subject_token", "subject_token", None),
                ("subject_token-differing", "subject_token", "second-subject-token-value"),
                ("subject_token_type", "subject_token_type", JWT_TOKEN_TYPE),
                ("scope", "scope", "code.search"),
                ("requested_token_type", "requested_token_type", None),
                ("actor_token", "actor_token", "second-actor-token-value"),
                ("actor_token_type", "actor_token_type", ACCESS_TOKEN_TYPE),
                ("client_id", "client_id", None),
                ("client_id-differing", "client_id", "jwt-gateway"),
                ("client_secret", "client_secret", None),
                ("client_assertion", "client_assertion", "second-assertion-value"),
                ("client_assertion_type", "client_assertion_type", None),
            )
        },
        "basic-and-client-secret-post": refused(_two_client_methods("basic", "post")),
        "basic-and-client-assertion": refused(_two_client_methods("basic", "assertion")),
        "client-secret-post-and-assertion": refused(_two_client_methods("post", "assertion")),
        "all-three-client-methods": refused(_two_client_methods("basic", "post", "assertion")),
        "missing-grant-type": refused(lambda kit: exchange(genuine(kit), grant_type=None)),
        "missing-subject-token-type": refused(
            lambda kit: exchange(genuine(kit), subject_token_type=None)
        ),
        "id-token-type": refused(
            lambda kit: exchange(genuine(kit), subject_token_type=ID_TOKEN_TYPE)
        ),
        "saml-token-type": refused(
            lambda kit: exchange(
                genuine(kit), subject_token_type="urn:ietf:params:oauth:token-type:saml2"
            )
        ),
        "refresh-token-requested": refused(
            lambda kit: exchange(
                genuine(kit), requested_token_type="urn:ietf:params:oauth:token-type:refresh_token"
            )
        ),
        "other-grant-type": refused(
            lambda kit: exchange(genuine(kit), grant_type="client_credentials"),
            "unsupported_grant_type",
        ),
    },
)

# Subject and actor tokens ----------------------------------------------------------------------


def _alg_none(spelling: str, signature: bytes = b"") -> Callable[[Kit], str]:
    def make(kit: Kit) -> str:
        header = {"alg": spelling, "typ": "JWT", "kid": "rsa-1"}
        return f"{segment(header)}.{segment(claims(kit))}.{b64(signature)}"

    return make


def _hmac_with_public_key(alg: str, encoding: str) -> Callable[[Kit], str]:
    def make(kit: Kit) -> str:
        key, kid = (
            (kit.idp.ec_key, "ec-1") if encoding.startswith("ec-") else (kit.idp.rsa_key, "rsa-1")
        )
        form = encoding.removeprefix("ec-")
        material = {
            "pem": lambda: public_pem(key, serialization.PublicFormat.SubjectPublicKeyInfo),
            "pem-pkcs1": lambda: public_pem(key, serialization.PublicFormat.PKCS1),
            "pem-stripped": lambda: public_pem(
                key, serialization.PublicFormat.SubjectPublicKeyInfo
            ).strip(),
            "der": lambda: public_der(key),
            "jwk": lambda: json.dumps(published_jwk(kit, kid)).encode(),
            "jwk-compact": lambda: json.dumps(
                published_jwk(kit, kid), separators=(",", ":")
            ).encode(),
            "jwks-file": lambda: kit.idp.jwks_path.read_bytes(),
            "modulus": lambda: published_jwk(kit, kid).get("n", "").encode(),
            "openssh": lambda: key.public_key().public_bytes(
                serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
            ),
        }[form]()
        return hmac_signed(kit, alg, material, kid)

    return make


def _other_algorithm(alg: str) -> Callable[[Kit], str]:
    def make(kit: Kit) -> str:
        if alg.startswith(("RS", "PS")):
            key, kid = kit.idp.rsa_key, "rsa-1"
        elif alg == "EdDSA":
            key, kid = ed25519.Ed25519PrivateKey.generate(), "ec-1"
        elif alg == "ES384":
            key, kid = ec.generate_private_key(ec.SECP384R1()), "ec-1"
        else:
            key, kid = kit.idp.ec_key, "ec-1"
        return signed({"alg": alg, "typ": "JWT", "kid": kid}, claims(kit), key, alg)

    return make


def _kid(kid: Any) -> Callable[[Kit], str]:
    def make(kit: Kit) -> str:
        header = {"alg": "RS256", "typ": "JWT", "kid": kid(kit) if callable(kid) else kid}
        if kid is OMIT:
            del header["kid"]
        return signed(header, claims(kit), kit.idp.rsa_key, "RS256")

    return make


def _key_url_header(name: str, *, genuinely_signed: bool) -> Callable[[Kit], str]:
    def make(kit: Kit) -> str:
        url = f"{kit.trap.url}/{name}/jwks.json"
        value: Any = {
            "jku": url,
            "x5u": url,
            "jwk": {**ECAlgorithm.to_jwk(kit.attacker_ec.public_key(), as_dict=True)},
            "x5c": [self_signed_certificate(kit.attacker_ec)],
        }[name]
        if genuinely_signed:
            return genuine(kit, {name: value}, ec=True)
        return attacker_signed(kit, {name: value, "kid": "ec-1"})

    return make


def _ecdsa_signature(signature: Callable[[Kit], bytes]) -> Callable[[Kit], str]:
    def make(kit: Kit) -> str:
        header = {"alg": "ES256", "typ": "JWT", "kid": "ec-1"}
        return with_signature(header, claims(kit), signature(kit))

    return make


def _der_signature(kit: Kit) -> bytes:
    # A valid ECDSA signature, but DER-encoded instead of the JWS fixed-length r || s.
    signing_input = f"{segment({'alg': 'ES256', 'typ': 'JWT', 'kid': 'ec-1'})}."
    return kit.idp.ec_key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))


def _segments(count: int) -> Callable[[Kit], str]:
    def make(kit: Kit) -> str:
        parts = genuine(kit).split(".")
        while len(parts) < count:
            parts.append(parts[-1])
        return ".".join(parts[:count])

    return make


def _jwe(kit: Kit) -> str:
    header = {"alg": "RSA-OAEP-256", "enc": "A256GCM", "kid": "rsa-1", "typ": "JWT"}
    parts = [segment(header), b64(secrets.token_bytes(256)), b64(secrets.token_bytes(12))]
    parts += [b64(json.dumps(claims(kit)).encode()), b64(secrets.token_bytes(16))]
    return ".".join(parts)


def _jwe_dir(kit: Kit) -> str:
    header = {"alg": "dir", "enc": "A128CBC-HS256", "kid": "rsa-1"}
    return ".".join([segment(header), "", b64(b"iv" * 8), segment(claims(kit)), b64(b"t" * 16)])


def _raw_segments(header: str, payload: str, signature: str = "c2ln") -> Callable[[Kit], str]:
    def make(kit: Kit) -> str:
        real_header, real_payload, real_signature = genuine(kit).split(".")
        return ".".join(
            [
                header.replace("{h}", real_header),
                payload.replace("{p}", real_payload),
                signature.replace("{s}", real_signature),
            ]
        )

    return make


def _raw_payload(payload: bytes) -> Callable[[Kit], str]:
    """Genuinely signed, over a payload that is not a JSON object."""

    def make(kit: Kit) -> str:
        return signed(
            {"alg": "RS256", "typ": "JWT", "kid": "rsa-1"}, payload, kit.idp.rsa_key, "RS256"
        )

    return make


def _raw_header(header: bytes) -> Callable[[Kit], str]:
    def make(kit: Kit) -> str:
        return signed(header, claims(kit), kit.idp.rsa_key, "RS256")

    return make


def _claim_json(name: str, raw_json: str) -> Callable[[Kit], str]:
    """Genuinely signed; claim ``name`` is the raw JSON text ``raw_json`` (which may be a value
    json.dumps would never write, such as 1e400 or Infinity)."""

    def make(kit: Kit) -> str:
        payload = claims(kit, **{name: "__RAW__"})
        text = json.dumps(payload).replace('"__RAW__"', raw_json)
        return signed(
            {"alg": "RS256", "typ": "JWT", "kid": "rsa-1"}, text.encode(), kit.idp.rsa_key, "RS256"
        )

    return make


def _claims(**overrides: Any) -> Callable[[Kit], str]:
    def make(kit: Kit) -> str:
        return genuine(kit, **{k: (v(kit) if callable(v) else v) for k, v in overrides.items()})

    return make


def _header(**header: Any) -> Callable[[Kit], str]:
    def make(kit: Kit) -> str:
        return genuine(kit, header)

    return make


def _issuer(iss: str) -> Callable[[Kit], str]:
    return _claims(iss=iss)


def _cross_issuer(kit: Kit) -> str:
    # Claims the first issuer, names the second issuer's kid, signed with the second's key.
    header = {"alg": "ES256", "typ": "JWT", "kid": "idp2-ec"}
    return signed(header, claims(kit), kit.idp2.ec_key, "ES256")


def _cross_issuer_reverse(kit: Kit) -> str:
    header = {"alg": "ES256", "typ": "JWT", "kid": "ec-1"}
    payload = claims(kit, iss=kit.idp2.issuer, aud=kit.idp2.audience)
    return signed(header, payload, kit.idp.ec_key, "ES256")


def _forged_with_attacker_key(kit: Kit) -> str:
    return signed(
        {"alg": "RS256", "typ": "JWT", "kid": "rsa-1"}, claims(kit), kit.attacker_rsa, "RS256"
    )


def _altered_payload(kit: Kit) -> str:
    header, _, signature = genuine(kit, sub="alice@example.com").split(".")
    return f"{header}.{segment(claims(kit, sub='admin@example.com'))}.{signature}"


def _stripped_signature(kit: Kit) -> str:
    header, payload, _ = genuine(kit).split(".")
    return f"{header}.{payload}."


NOW = int(time.time())
SUBJECT_TOKENS: dict[str, Callable[[Kit], str]] = {
    **{f"alg-{s}": _alg_none(s) for s in ("none", "None", "NONE", "nOnE")},
    "alg-none-with-signature": _alg_none("none", b"\x00" * 32),
    "alg-none-with-trailing-space": _alg_none("none "),
    "alg-empty": _alg_none(""),
    "alg-missing": _raw_header(b'{"typ":"JWT","kid":"rsa-1"}'),
    "alg-null": _raw_header(b'{"alg":null,"typ":"JWT","kid":"rsa-1"}'),
    "alg-list": _raw_header(b'{"alg":["RS256"],"typ":"JWT","kid":"rsa-1"}'),
    **{
        f"{alg}-keyed-with-{encoding}": _hmac_with_public_key(alg, encoding)
        for alg in ("HS256", "HS384", "HS512")
        for encoding in ("pem", "der", "jwk")
    },
    **{
        f"HS256-keyed-with-{encoding}": _hmac_with_public_key("HS256", encoding)
        for encoding in (
            "pem-pkcs1",
            "pem-stripped",
            "jwk-compact",
            "jwks-file",
            "modulus",
            "openssh",
            "ec-pem",
            "ec-der",
            "ec-jwk",
        )
    },
    **{
        f"alg-{alg}-outside-allowlist": _other_algorithm(alg)
        for alg in ("PS256", "PS512", "RS384", "RS512", "ES384", "EdDSA")
    },
    "ES256-with-an-rsa-kid": lambda kit: signed(
        {"alg": "ES256", "typ": "JWT", "kid": "rsa-1"}, claims(kit), kit.idp.ec_key, "ES256"
    ),
    "RS256-with-an-ec-kid": lambda kit: signed(
        {"alg": "RS256", "typ": "JWT", "kid": "ec-1"}, claims(kit), kit.idp.rsa_key, "RS256"
    ),
    **{
        f"kid-{name}": _kid(kid)
        for name, kid in {
            "path-traversal": "../../etc/passwd",
            "absolute-path": "/etc/passwd",
            "file-url": "file:///etc/passwd",
            "http-url": lambda kit: f"{kit.trap.url}/kid/jwks.json",
            "sql": "' OR 1=1 --",
            "sql-union": "rsa-1' UNION SELECT key FROM signing_keys --",
            "nosql": {"$ne": None},
            "300-chars": "k" * 300,
            "nul": "\x00",
            "nul-suffix": "rsa-1\x00",
            "crlf": "rsa-1\r\nX-Injected: 1",
            "empty": "",
            "integer": 1,
            "null": None,
            "list": ["rsa-1"],
            "unknown": "no-such-kid",
            "case": "RSA-1",
            "trailing-space": "rsa-1 ",
            "missing": OMIT,
        }.items()
    },
    **{
        f"{name}-header{'-genuine' if genuinely else ''}": _key_url_header(
            name, genuinely_signed=genuinely
        )
        for name in ("jku", "x5u", "jwk", "x5c")
        for genuinely in (False, True)
    },
    "crit-exp": _header(crit=["exp"]),
    "crit-unknown-extension": _header(
        crit=["http://attacker.example/ext"], **{"http://attacker.example/ext": True}
    ),
    "crit-empty": _header(crit=[]),
    "crit-b64": _header(crit=["b64"], b64=False),
    "b64-false": _header(b64=False),
    "b64-true": _header(b64=True),
    "ecdsa-zeros": _ecdsa_signature(lambda kit: b"\x00" * 64),
    "ecdsa-zeros-short": _ecdsa_signature(lambda kit: b"\x00" * 32),
    "ecdsa-63-bytes": _ecdsa_signature(lambda kit: b"\x01" * 63),
    "ecdsa-65-bytes": _ecdsa_signature(lambda kit: b"\x01" * 65),
    "ecdsa-128-bytes": _ecdsa_signature(lambda kit: b"\x01" * 128),
    "ecdsa-empty": _ecdsa_signature(lambda kit: b""),
    "ecdsa-der-encoded": _ecdsa_signature(_der_signature),
    "ecdsa-all-ones": _ecdsa_signature(lambda kit: b"\xff" * 64),
    "rsa-zeros": lambda kit: with_signature(
        {"alg": "RS256", "typ": "JWT", "kid": "rsa-1"}, claims(kit), b"\x00" * 256
    ),
    "rsa-stripped-signature": _stripped_signature,
    "rsa-forged-with-attacker-key": _forged_with_attacker_key,
    "rsa-altered-payload": _altered_payload,
    "jwe-5-segments": _jwe,
    "jwe-dir-5-segments": _jwe_dir,
    "1-segment": _segments(1),
    "2-segments": _segments(2),
    "4-segments": _segments(4),
    "6-segments": _segments(6),
    "empty-segments": lambda kit: "..",
    "trailing-dot": lambda kit: genuine(kit) + ".",
    "opaque": lambda kit: "opaque-reference-" + secrets.token_urlsafe(16),
    "header-bad-base64": _raw_segments("!!{h}!!", "{p}", "{s}"),
    "payload-bad-base64": _raw_segments("{h}", "{p}$$", "{s}"),
    "signature-bad-base64": _raw_segments("{h}", "{p}", "***"),
    "header-unicode": _raw_segments("{h}\u00e9", "{p}", "{s}"),
    "header-not-json": _raw_header(b"not json at all"),
    "header-json-list": _raw_header(b'["RS256"]'),
    "header-json-string": _raw_header(b'"RS256"'),
    "header-invalid-utf8": _raw_header(b'{"alg":"RS256","kid":"\xff\xfe"}'),
    "payload-not-json": _raw_payload(b"not json"),
    "payload-json-list": _raw_payload(b'["alice"]'),
    "payload-json-number": _raw_payload(b"42"),
    "payload-invalid-utf8": _raw_payload(b'{"sub":"\xff"}'),
    "payload-deeply-nested": _raw_payload(b'{"x":' * 1500 + b"1" + b"}" * 1500),
    "exp-string": _claims(exp=str(NOW + 600)),
    "exp-1e400": _claim_json("exp", "1e400"),
    "exp-Infinity": _claim_json("exp", "Infinity"),
    "exp-NaN": _claim_json("exp", "NaN"),
    "exp-10e400-int": _claim_json("exp", "1" + "0" * 400),
    "exp-negative": _claims(exp=-1),
    "exp-true": _claims(exp=True),
    "exp-false": _claims(exp=False),
    "exp-null": _claims(exp=None),
    "exp-list": _claims(exp=[NOW + 600]),
    "exp-object": _claims(exp={"value": NOW + 600}),
    "exp-missing": _claims(exp=OMIT),
    "expired": _claims(iat=NOW - 7200, exp=NOW - 3600),
    "expired-beyond-leeway": lambda kit: genuine(kit, exp=int(time.time()) - 31),
    "nbf-future": _claims(nbf=NOW + 3600),
    "nbf-string": _claims(nbf=str(NOW)),
    "nbf-huge": _claim_json("nbf", "1e400"),
    "iat-future": _claims(iat=NOW + 3600),
    "iat-string": _claims(iat="yesterday"),
    "iat-numeric-string": _claims(iat=str(NOW)),
    "iat-10e400-int": _claim_json("iat", "1" + "0" * 400),
    "nbf-10e400-int": _claim_json("nbf", "1" + "0" * 400),
    "sub-missing": _claims(sub=OMIT),
    "sub-empty": _claims(sub=""),
    "sub-number": _claims(sub=42),
    "sub-object": _claims(sub={"id": "alice"}),
    "iss-missing": _claims(iss=OMIT),
    "iss-list": _claims(iss=[TestIdP.issuer]),
    "iss-untrusted": _issuer("https://idp.attacker.example"),
    "iss-prefix": _issuer(TestIdP.issuer[:-1]),
    "iss-suffix": _issuer(TestIdP.issuer + ".attacker.example"),
    "iss-path-suffix": _issuer(TestIdP.issuer + "/tenant"),
    "iss-trailing-slash": _issuer(TestIdP.issuer + "/"),
    "iss-upper-host": _issuer(TestIdP.issuer.upper()),
    "iss-upper-scheme": _issuer(TestIdP.issuer.replace("https", "HTTPS")),
    "iss-http": _issuer(TestIdP.issuer.replace("https", "http")),
    "iss-default-port": _issuer(TestIdP.issuer + ":443"),
    "iss-leading-space": _issuer(" " + TestIdP.issuer),
    "iss-zero-width": _issuer(TestIdP.issuer + "\u200b"),
    "iss-confusable": _issuer(TestIdP.issuer.replace("idp", "\u0456dp")),
    "iss-fragment": _issuer(TestIdP.issuer + "#"),
    "another-issuers-kid": _cross_issuer,
    "another-issuers-kid-reverse": _cross_issuer_reverse,
    "aud-foreign": _claims(aud="https://another-gateway.example"),
    "aud-foreign-list": _claims(aud=["https://a.example", "https://b.example"]),
    "aud-missing": _claims(aud=OMIT),
    "aud-empty-list": _claims(aud=[]),
    "aud-number": _claims(aud=7),
    "aud-near-miss": _claims(aud=TestIdP.audience + "/"),
    "aud-of-the-other-issuer": _claims(aud=SecondIdP.audience + "-not"),
    "id-token-nonce": _claims(nonce="n-0S6_WzA2Mj"),
    "id-token-at-hash": _claims(at_hash="77QmUPtjPfzWtF2AnpK9RQ"),
    "id-token-c-hash": _claims(c_hash="LDktKdoQak3Pk0cnXxCltA"),
    "typ-id-token": _header(typ="id_token+jwt"),
    "typ-logout": _header(typ="logout+jwt"),
    "typ-dpop": _header(typ="dpop+jwt"),
    "typ-number": _header(typ=5),
    "our-own-minted-token": mint_our_own,
}

table("subject", {name: refused(subject_attack(make)) for name, make in SUBJECT_TOKENS.items()})
table(
    "actor",
    {
        name: refused(actor_attack(SUBJECT_TOKENS[name]))
        for name in (
            "alg-none",
            "HS256-keyed-with-pem",
            "kid-path-traversal",
            "jku-header",
            "x5c-header-genuine",
            "jwe-5-segments",
            "exp-string",
            "expired",
            "iss-trailing-slash",
            "another-issuers-kid",
            "aud-foreign",
            "id-token-nonce",
            "our-own-minted-token",
        )
    },
)

# Targets and scopes ---------------------------------------------------------------------------


def _targets(
    parameter: str, *targets: str, audience: str | None = None
) -> Callable[[Kit], Hostile]:
    """A genuine exchange naming ``targets`` as ``parameter`` (audience or resource), beside
    ``audience`` (None: no other)."""

    def build(kit: Kit) -> Hostile:
        request = exchange(genuine(kit), audience=audience)
        request.form = [*(request.form or []), *((parameter, t) for t in targets)]
        request.inputs = targets
        return request

    return build


def _audience(*audiences: str) -> Callable[[Kit], Hostile]:
    return _targets("audience", *audiences)


def _resource(*resources: str, audience: str | None = None) -> Callable[[Kit], Hostile]:
    return _targets("resource", *resources, audience=audience)


def _scope(
    scope: str, audience: str = CODE_SEARCH, held: str | None = None
) -> Callable[[Kit], Hostile]:
    def build(kit: Kit) -> Hostile:
        subject = genuine(kit, **({"scope": held} if held is not None else {}))
        request = exchange(subject, audience=audience, scope=scope)
        request.inputs = (scope,)
        return request

    return build


NEAR_MISS_AUDIENCES = {
    "not-in-policy": PAYMENTS,
    "disabled-policy": DISABLED,
    "confusable-cyrillic-i": CODE_SEARCH.replace("internal", "\u0456nternal"),
    "confusable-unicode-hyphen": CODE_SEARCH.replace("-", "\u2010"),
    "confusable-fullwidth": CODE_SEARCH.replace("mcp", "\uff4dcp"),
    "confusable-small-capital": CODE_SEARCH.replace("code", "\u1d04ode"),
    "confusable-punycode": "https://xn--code-search-0l6e.internal/mcp",
    "zero-width-space": CODE_SEARCH.replace("search", "sea\u200brch"),
    "zero-width-joiner-after": CODE_SEARCH + "\u200d",
    "byte-order-mark-before": "\ufeff" + CODE_SEARCH,
    "soft-hyphen": CODE_SEARCH.replace("mcp", "m\u00adcp"),
    "right-to-left-override": CODE_SEARCH + "\u202e",
    "extra-path-segment": CODE_SEARCH + "/admin",
    "dot-dot-segment": CODE_SEARCH + "/../admin",
    "encoded-slash": CODE_SEARCH + "%2F..%2Fadmin",
    "path-parameter": CODE_SEARCH + ";x=1",
    "query": CODE_SEARCH + "?x=1",
    "other-port": CODE_SEARCH.replace(".internal", ".internal:8443"),
    "port-zero": CODE_SEARCH.replace(".internal", ".internal:0"),
    "trailing-slash": CODE_SEARCH + "/",
    "http-scheme": CODE_SEARCH.replace("https", "http"),
    "userinfo": CODE_SEARCH.replace("https://", "https://gateway@"),
    "trailing-dot-host": CODE_SEARCH.replace(".internal", ".internal."),
    "leading-space": " " + CODE_SEARCH,
    "path-case": CODE_SEARCH.replace("mcp", "MCP"),
    "bare-host": "code-search.internal",
    "loopback-audience": "http://127.0.0.1/mcp",
    "metadata-audience": "http://169.254.169.254/latest/meta-data/",
    "target-over-cap": CODE_SEARCH + "/" + "a" * 2100,
}

LOCAL_RESOURCES = {
    "loopback-v4": "http://127.0.0.1/mcp",
    "loopback-v4-port": "http://127.0.0.1:8080/mcp",
    "loopback-v4-other": "http://127.9.9.9/",
    "loopback-v6": "http://[::1]/mcp",
    "v4-mapped-loopback": "http://[::ffff:127.0.0.1]/mcp",
    "link-local-metadata": "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "link-local-v6": "http://[fe80::1]/mcp",
    "localhost": "http://localhost/mcp",
    "localhost-upper-dot": "http://LOCALHOST./mcp",
    "sub-localhost": "http://metadata.localhost/mcp",
    "unspecified": "http://0.0.0.0/mcp",
    "multicast": "http://224.0.0.1/mcp",
}

table(
    "target",
    {
        **{
            f"audience-{name}": refused(_audience(a), "invalid_target")
            for name, a in NEAR_MISS_AUDIENCES.items()
        },
        **{
            f"resource-{name}": refused(_resource(r), "invalid_target")
            for name, r in {
                "relative-path": "/mcp",
                "no-scheme": "code-search.internal/mcp",
                "network-path": "//code-search.internal/mcp",
                "bare-word": "mcp",
                "urn": "urn:example:code-search",
                "no-host": "https:///mcp",
                "fragment": CODE_SEARCH + "#section",
                "empty-fragment": CODE_SEARCH + "#",
                "malformed-ipv6": "http://[::1/mcp",
                "javascript": "javascript:alert(1)",
                "not-in-policy": PAYMENTS,
                "trailing-slash": CODE_SEARCH + "/",
                **{f"local-{n}": r for n, r in LOCAL_RESOURCES.items()},
            }.items()
        },
        "several-audiences-one-not-in-policy": refused(
            _audience(CODE_SEARCH, PAYMENTS), "invalid_target"
        ),
        "several-audiences-one-disabled": refused(
            _audience(CODE_SEARCH, DISABLED), "invalid_target"
        ),
        "several-audiences-one-look-alike": refused(
            _audience(CODE_SEARCH, CODE_SEARCH + "\u200b"), "invalid_target"
        ),
        "audience-and-metadata-resource": refused(
            _resource(LOCAL_RESOURCES["link-local-metadata"], audience=CODE_SEARCH),
            "invalid_target",
        ),
        "audience-and-loopback-resource": refused(
            _resource("http://127.0.0.1/mcp", audience=CODE_SEARCH), "invalid_target"
        ),
        "resources-one-forbidden": refused(_resource(CODE_SEARCH, PAYMENTS), "invalid_target"),
        "too-many-targets": refused(
            _audience(*[CODE_SEARCH] * 5, *[f"https://u{i}.internal/mcp" for i in range(5)]),
            "invalid_target",
        ),
        "no-target": refused(_audience()),
        **{
            f"scope-omnibus-{name}": refused(_scope(scope), "invalid_scope")
            for name, scope in {
                "star": "*",
                "prefix-star": "code.*",
                "all": "all",
                "admin": "admin",
                "root": "root",
                "openid": "openid",
                "offline-access": "offline_access",
                "with-a-real-one": "code.read *",
            }.items()
        },
        **{
            f"scope-beyond-policy-{name}": refused(
                _scope(scope, held="code.read code.write tickets.read"), "invalid_scope"
            )
            for name, scope in {
                "write": "code.write",
                "read-and-write": "code.read code.write",
                "other-policys-scope": "tickets.read",
                "case": "CODE.READ",
            }.items()
        },
        "scope-beyond-subject": refused(
            _scope("tickets.read", TICKETS, held="code.read"), "invalid_scope"
        ),
        "default-scope-beyond-subject": refused(
            lambda kit: exchange(genuine(kit, scope="code.read"), audience=TICKETS), "invalid_scope"
        ),
        "scope-double-space": refused(_scope("code.read  code.search"), "invalid_scope"),
        "scope-leading-space": refused(_scope(" code.read"), "invalid_scope"),
        "scope-quote": refused(_scope('code."read'), "invalid_scope"),
        "scope-backslash": refused(_scope("code\\read"), "invalid_scope"),
        "scope-non-ascii": refused(_scope("c\u00f6de.read"), "invalid_scope"),
        "scope-over-cap": refused(_scope(" ".join(["code.read"] * 300)), "invalid_scope"),
    },
)

# Delegation ------------------------------------------------------------------------------------


def _delegation(
    subject_claims: dict[str, Any],
    actor_claims: dict[str, Any] | None = None,
    *,
    actor_issuer: str = "idp",
) -> Callable[[Kit], Hostile]:
    def build(kit: Kit) -> Hostile:
        subject = genuine(kit, **subject_claims)
        if actor_claims is None:
            return exchange(subject)
        if actor_issuer == "idp2":
            actor = signed(
                {"alg": "ES256", "typ": "JWT", "kid": "idp2-ec"},
                claims(kit, iss=kit.idp2.issuer, aud=kit.idp2.audience, **actor_claims),
                kit.idp2.ec_key,
                "ES256",
            )
        else:
            actor = genuine(kit, **actor_claims)
        request = exchange(subject, actor_token=actor, actor_token_type=JWT_TOKEN_TYPE)
        request.secrets += (actor,)
        return request

    return build


def _actor_without_type(kit: Kit) -> Hostile:
    actor = genuine(kit, sub="agent-7")
    request = exchange(genuine(kit), actor_token=actor)
    request.secrets += (actor,)
    return request


table(
    "delegation",
    {
        "actor-token-without-type": refused(_actor_without_type),
        "actor-type-without-token": refused(
            lambda kit: exchange(genuine(kit), actor_token_type=ACCESS_TOKEN_TYPE)
        ),
        "actor-type-unsupported": refused(
            lambda kit: exchange(
                genuine(kit),
                actor_token=genuine(kit, sub="agent-7"),
                actor_token_type=ID_TOKEN_TYPE,
            )
        ),
        "actor-not-in-may-act": refused(
            _delegation({"may_act": {"sub": "agent-1"}}, {"sub": "agent-2"})
        ),
        "actor-may-act-case": refused(
            _delegation({"may_act": {"sub": "Agent-1"}}, {"sub": "agent-1"})
        ),
        "actor-of-another-issuer-than-may-act": refused(
            _delegation(
                {"may_act": {"sub": "agent-1", "iss": SecondIdP.issuer}}, {"sub": "agent-1"}
            )
        ),
        "actor-same-sub-other-issuer": refused(
            _delegation(
                {"may_act": {"sub": "agent-1", "iss": TestIdP.issuer}},
                {"sub": "agent-1"},
                actor_issuer="idp2",
            )
        ),
        "may-act-malformed-string": refused(
            _delegation({"may_act": "agent-1"}, {"sub": "agent-1"})
        ),
        "may-act-malformed-list": refused(
            _delegation({"may_act": ["agent-1"]}, {"sub": "agent-1"})
        ),
        **{
            f"act-chain-depth-{depth}": refused(_delegation({"act": nested_act(depth)}))
            for depth in (5, 10, 64)
        },
        "act-chain-depth-5-with-actor": refused(
            _delegation({"act": nested_act(5)}, {"sub": "agent-1"})
        ),
        "act-malformed-string": refused(_delegation({"act": "service-1"})),
        "act-without-sub": refused(_delegation({"act": {"client_id": "svc"}})),
        "act-sub-number": refused(_delegation({"act": {"sub": 1}})),
        "act-nested-malformed": refused(_delegation({"act": {"sub": "svc", "act": ["x"]}})),
    },
)

CASES = [pytest.param(attack, id=name) for name, attack in TABLE.items()]


# --- the assertions -----------------------------------------------------------------------------


def secret_fragments(values: tuple[str, ...]) -> list[str]:
    """Each value, and for a JWT its payload and signature segments: a leak of part of a token
    is a leak. Short values are left out (they would match by chance)."""
    fragments = []
    for value in (*values, GATEWAY_SECRET, OTHER_SECRET):
        fragments.append(value)
        fragments += [part for part in value.split(".")[1:] if len(part) >= 16]
    return [f for f in fragments if len(f) >= 16]


def log_mark(kit: Kit) -> int:
    return kit.gateway.log_size() if isinstance(kit.gateway, ServedGateway) else 0


def product_log(kit: Kit, caplog: pytest.LogCaptureFixture, mark: int) -> str:
    """What the service logged since ``mark``: under ``sidecar serve`` its output (every worker,
    granian and the supervisor); in-process, the records of the service's loggers."""
    if isinstance(kit.gateway, ServedGateway):
        return kit.gateway.log_since(mark)
    # urllib3 (the test's own HTTP client) and werkzeug (the test server) are not the product.
    records = [r for r in caplog.records if not r.name.startswith(("urllib3", "werkzeug"))]
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    return "\n".join(formatter.format(record) for record in records)


def test_the_server_under_attack_grants_a_clean_request(kit: Kit) -> None:
    # The control row: every refusal below is a refusal of the attack, not of a broken setup.
    before = kit.gateway.last_audit_id(settle=False)
    response = kit.gateway.exchange(genuine(kit), scope="code.read")
    assert response.status_code == 200, response.text
    actor = genuine(kit, sub="agent-7")
    response = kit.gateway.exchange(
        genuine(kit, may_act={"sub": "agent-7"}, act=nested_act(3)),
        actor_token=actor,
        actor_token_type=JWT_TOKEN_TYPE,
    )
    assert response.status_code == 200, response.text
    # Both grants audited (and written before the next row counts its own).
    rows = kit.gateway.audit_rows(after_id=before, expected=2)
    assert [row.decision for row in rows] == ["granted", "granted"]


@pytest.mark.parametrize("attack", CASES)
def test_a_hostile_request_is_refused_cleanly_and_audited(
    kit: Kit, attack: Attack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    request = attack.build(kit)
    # Every earlier row waited for its own audit rows: nothing of theirs is still queued. (Under
    # sidecar serve, a second row of this request would be written in the same batch as the
    # first, or be counted by the next row.)
    before = kit.gateway.last_audit_id(settle=False)
    mark = log_mark(kit)
    trapped = kit.trap.count

    response = send(kit, request)

    # Short values would match the fixed wording or a header by chance.
    never_echoed = [v for v in (*request.secrets, *request.inputs) if len(v) >= 8]
    assert_oauth_error(response, attack.status, attack.error, *never_echoed)
    assert response.status_code < 500
    assert "Traceback" not in response.text
    assert 'File "' not in response.text
    if attack.status == 405:
        assert "POST" in response.headers["Allow"]
    # The denial is in the audit trail, once, with its error code and an internal reason.
    rows = kit.gateway.audit_rows(after_id=before, expected=1)
    assert [(row.decision, row.error) for row in rows] == [("denied", attack.error)]
    assert rows[0].reason
    assert rows[0].jti is None
    # No key URL in any header was followed.
    assert kit.trap.count == trapped == 0, kit.trap.paths
    # No token or secret of this request in any log line of the service.
    log = product_log(kit, caplog, mark)
    if isinstance(kit.gateway, ServedGateway):
        # What was read is this request's part of the server's output: its audit line (a JSON
        # log record, the default format when stderr is not a terminal).
        assert '"logger": "sidecar.audit", "message": "exchange"' in log, log
        assert f'"decision":"denied","error":"{attack.error}"' in log, log
    for fragment in secret_fragments(request.secrets):
        assert fragment not in log, "a token or secret reached a log line"


# --- a flood of unknown kids --------------------------------------------------------------------


class ThirdIdP(TestIdP):
    __test__ = False
    issuer = "https://idp3.test.example"


def test_a_flood_of_unknown_kids_refetches_the_issuers_keys_at_most_once(
    tmp_path: Path, idp_rsa_key: rsa.RSAPrivateKey
) -> None:
    idp = ThirdIdP(tmp_path, idp_rsa_key)
    jwks = CountingHttpServer(idp.public_jwks())
    clock = FakeClock()
    config = base_config(idp, ClientKeys(), f"sqlite:///{tmp_path / 'sidecar.db'}")
    issuer = config["trusted_issuers"][0]
    del issuer["jwks_file"]
    issuer.update(jwks_uri=f"{jwks.url}/jwks.json", min_refetch_interval="30s")
    try:
        with live_service(config, clock=clock) as (_, server):
            assert server.exchange(idp.token()).status_code == 200
            assert jwks.count == 1  # the first use loaded the keys
            clock.advance(31)  # past min_refetch_interval: one refetch is allowed again

            flood = [idp.token(kid=f"unknown-{i}-{secrets.token_hex(4)}") for i in range(50)]
            with ThreadPoolExecutor(max_workers=8) as pool:
                responses = list(pool.map(server.exchange, flood))

            for token, response in zip(flood, responses, strict=True):
                assert_oauth_error(response, 400, "invalid_request", token)
            assert jwks.count - 1 == 1, jwks.paths  # one refetch for fifty unknown kids
            assert server.exchange(idp.token()).status_code == 200  # the known kid still verifies
            assert jwks.count == 2
    finally:
        jwks.stop()
