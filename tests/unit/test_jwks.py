"""JWK Sets: parsing (bad keys skipped, good kept), the cached and rate-limited source, and
fetching over real HTTP on loopback."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from sidecar.errors import TemporarilyUnavailableError
from sidecar.jwks import (
    MAX_JWKS_BYTES,
    MAX_JWKS_KEYS,
    JwksSource,
    JwksUnavailable,
    RefreshRules,
    fetch_json,
    parse_jwks,
    read_json_file,
)
from tests.conftest import FakeClock

ALLOWED = frozenset({"RS256", "ES256", "EdDSA"})
RULES = RefreshRules(refresh_interval=300.0, min_refetch_interval=30.0, fetch_timeout=2.0)
URL = "https://idp.test.example/.well-known/jwks.json"


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def small_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=1024)


def ec_jwk(kid: str, **extra: Any) -> dict[str, Any]:
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    jwk.update(kid=kid, **extra)
    return jwk


def rsa_jwk(key: rsa.RSAPrivateKey, kid: str, **extra: Any) -> dict[str, Any]:
    jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    jwk.update(kid=kid, **extra)
    return jwk


# --- parse_jwks ---------------------------------------------------------------------------------


def test_good_keys_are_parsed_by_kid(rsa_key: rsa.RSAPrivateKey) -> None:
    ed = OKPAlgorithm.to_jwk(ed25519.Ed25519PrivateKey.generate().public_key(), as_dict=True)
    document = {
        "keys": [
            rsa_jwk(rsa_key, "rsa", alg="RS256", use="sig"),
            ec_jwk("ec"),
            {**ed, "kid": "ed"},
        ]
    }

    keys = parse_jwks(document, ALLOWED, source="test")

    assert set(keys) == {"rsa", "ec", "ed"}
    assert keys["rsa"].algorithms == frozenset({"RS256"})
    assert keys["ec"].algorithms == frozenset({"ES256"})
    assert keys["ed"].algorithms == frozenset({"EdDSA"})
    assert isinstance(keys["rsa"].key, rsa.RSAPublicKey)
    assert isinstance(keys["ec"].key, ec.EllipticCurvePublicKey)


def test_malformed_keys_are_skipped_and_good_ones_kept(
    rsa_key: rsa.RSAPrivateKey, caplog: pytest.LogCaptureFixture
) -> None:
    good = ec_jwk("good")
    document = {
        "keys": [
            "not an object",
            {"kty": "EC", "crv": "P-256", "x": "!!", "y": "??", "kid": "bad-base64"},
            {k: v for k, v in ec_jwk("x").items() if k != "kid"},  # no kid
            {**ec_jwk("x"), "kid": ""},
            {**ec_jwk("x"), "kid": 7},
            {**rsa_jwk(rsa_key, "wrong-kty-for-alg"), "alg": "ES256"},
            {"kty": "RSA", "kid": "no-modulus", "e": "AQAB"},
            good,
        ]
    }

    with caplog.at_level(logging.WARNING, logger="sidecar.jwks"):
        keys = parse_jwks(document, ALLOWED, source="idp")

    assert set(keys) == {"good"}
    assert any("skipping key" in record.getMessage() for record in caplog.records)


def test_encryption_keys_are_skipped() -> None:
    document = {"keys": [ec_jwk("enc", use="enc"), ec_jwk("sig", use="sig")]}
    assert set(parse_jwks(document, ALLOWED, source="test")) == {"sig"}


def test_keys_of_algorithms_outside_the_allowlist_are_skipped(rsa_key: rsa.RSAPrivateKey) -> None:
    document = {"keys": [rsa_jwk(rsa_key, "rsa"), ec_jwk("ec"), ec_jwk("ec-hs", alg="HS256")]}
    assert set(parse_jwks(document, frozenset({"ES256"}), source="test")) == {"ec"}


def test_rsa_keys_below_2048_bits_are_refused(
    rsa_key: rsa.RSAPrivateKey, small_rsa_key: rsa.RSAPrivateKey
) -> None:
    document = {"keys": [rsa_jwk(small_rsa_key, "small"), rsa_jwk(rsa_key, "ok")]}
    assert set(parse_jwks(document, ALLOWED, source="test")) == {"ok"}


def test_private_members_are_ignored(rsa_key: rsa.RSAPrivateKey) -> None:
    # A careless IdP publishing its private key: only the public part is ever used.
    private_jwk = RSAAlgorithm.to_jwk(rsa_key, as_dict=True)
    private_jwk.update(kid="leaky", alg="RS256")
    ec_private = ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()), as_dict=True)
    ec_private.update(kid="leaky-ec")

    keys = parse_jwks({"keys": [private_jwk, ec_private]}, ALLOWED, source="test")

    assert isinstance(keys["leaky"].key, rsa.RSAPublicKey)
    assert isinstance(keys["leaky-ec"].key, ec.EllipticCurvePublicKey)


@pytest.mark.parametrize("document", [[], {"keys": {}}, {"keys": "x"}, {}, "keys", None, 3])
def test_a_document_that_is_not_a_jwk_set_is_unavailable(document: Any) -> None:
    with pytest.raises(JwksUnavailable):
        parse_jwks(document, ALLOWED, source="test")


def test_an_empty_jwk_set_has_no_keys() -> None:
    assert parse_jwks({"keys": []}, ALLOWED, source="test") == {}


def test_only_the_first_keys_up_to_the_cap_are_read() -> None:
    jwk = ec_jwk("template")
    document = {"keys": [{**jwk, "kid": f"k{i}"} for i in range(MAX_JWKS_KEYS + 5)]}
    keys = parse_jwks(document, ALLOWED, source="test")
    assert len(keys) == MAX_JWKS_KEYS
    assert f"k{MAX_JWKS_KEYS}" not in keys


# --- JwksSource ---------------------------------------------------------------------------------


class FakeIdP:
    """A fetch callable: serves the current document, or raises when down; counts calls."""

    def __init__(self, *kids: str) -> None:
        self.jwks: dict[str, Any] = {"keys": [ec_jwk(kid) for kid in kids]}
        self.down = False
        self.calls: list[tuple[str, float]] = []

    def add_key(self, kid: str) -> None:
        self.jwks = {"keys": [*self.jwks["keys"], ec_jwk(kid)]}

    def __call__(self, url: str, timeout: float) -> Any:
        self.calls.append((url, timeout))
        if self.down:
            raise JwksUnavailable(f"{url}: HTTP 503")
        return json.loads(json.dumps(self.jwks))


def source(
    fetch: Callable[[str, float], Any], clock: FakeClock, rules: RefreshRules = RULES
) -> JwksSource:
    return JwksSource(name="idp", allowed=ALLOWED, rules=rules, clock=clock, url=URL, fetch=fetch)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1000.0)


@pytest.fixture
def issuer() -> FakeIdP:
    """An issuer publishing the one key k1."""
    return FakeIdP("k1")


@pytest.fixture
def keys(issuer: FakeIdP, clock: FakeClock) -> JwksSource:
    """``issuer``'s keys, on ``clock``, none fetched yet."""
    return source(issuer, clock)


def test_keys_are_fetched_once_and_cached() -> None:
    idp, clock = FakeIdP("k1", "k2"), FakeClock(1000.0)
    keys = source(idp, clock)

    assert keys.find_key("k1") is not None
    clock.advance(RULES.refresh_interval - 1)
    assert keys.find_key("k2") is not None
    assert keys.find_key("k1") is not None

    assert idp.calls == [(URL, RULES.fetch_timeout)]


def test_keys_are_refreshed_after_the_refresh_interval(
    issuer: FakeIdP, clock: FakeClock, keys: JwksSource
) -> None:
    keys.find_key("k1")

    issuer.jwks = {"keys": [ec_jwk("k2")]}  # the issuer rotated and dropped k1
    clock.advance(RULES.refresh_interval)

    assert keys.find_key("k2") is not None
    assert len(issuer.calls) == 2
    assert keys.find_key("k1") is None


def test_unknown_kid_triggers_a_refetch_that_finds_a_new_key(
    issuer: FakeIdP, clock: FakeClock, keys: JwksSource
) -> None:
    keys.find_key("k1")

    issuer.add_key("k2")
    clock.advance(RULES.min_refetch_interval)

    assert keys.find_key("k2") is not None
    assert len(issuer.calls) == 2


def test_unknown_kid_right_after_a_fetch_does_not_refetch(
    issuer: FakeIdP, keys: JwksSource
) -> None:
    assert keys.find_key("unknown") is None
    assert keys.find_key("unknown") is None
    assert len(issuer.calls) == 1


def test_flood_of_unknown_kids_fetches_at_most_once_per_min_refetch_interval(
    issuer: FakeIdP, clock: FakeClock, keys: JwksSource
) -> None:
    keys.find_key("k1")
    clock.advance(RULES.min_refetch_interval)

    for i in range(200):
        assert keys.find_key(f"attacker-{i}") is None
    assert len(issuer.calls) == 2

    for _ in range(10):
        clock.advance(RULES.min_refetch_interval / 10 - 0.01)
        for i in range(20):
            keys.find_key(f"attacker-more-{i}")
    assert len(issuer.calls) == 2

    clock.advance(1)
    for i in range(20):
        keys.find_key(f"attacker-again-{i}")
    assert len(issuer.calls) == 3


def test_flood_of_unknown_kids_from_many_threads_fetches_once(
    issuer: FakeIdP, clock: FakeClock, keys: JwksSource
) -> None:
    keys.find_key("k1")
    clock.advance(RULES.min_refetch_interval)

    threads = [threading.Thread(target=keys.find_key, args=(f"attacker-{i}",)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)

    assert len(issuer.calls) == 2


def test_fetch_failure_keeps_the_cached_keys(
    issuer: FakeIdP, clock: FakeClock, keys: JwksSource
) -> None:
    cached = keys.find_key("k1")

    issuer.down = True
    clock.advance(RULES.refresh_interval)

    assert keys.find_key("k1") is cached
    assert len(issuer.calls) == 2
    # Still down: retried no more than once per min_refetch_interval, cached keys still served.
    clock.advance(1)
    assert keys.find_key("k1") is cached
    assert len(issuer.calls) == 2


def test_recovery_after_a_failed_refresh(
    issuer: FakeIdP, clock: FakeClock, keys: JwksSource
) -> None:
    keys.find_key("k1")
    issuer.down = True
    clock.advance(RULES.refresh_interval)
    keys.find_key("k1")

    issuer.down = False
    issuer.add_key("k2")
    clock.advance(RULES.min_refetch_interval)

    assert keys.find_key("k2") is not None


def test_failure_with_nothing_cached_is_temporarily_unavailable(
    issuer: FakeIdP, clock: FakeClock, keys: JwksSource
) -> None:
    issuer.down = True

    with pytest.raises(TemporarilyUnavailableError) as caught:
        keys.find_key("k1")
    assert caught.value.error == "temporarily_unavailable"
    assert caught.value.status_code == 503
    assert "Retry-After" in caught.value.response_headers()

    # A burst of requests while the issuer is down does not hammer it.
    for _ in range(20):
        with pytest.raises(TemporarilyUnavailableError):
            keys.find_key("k1")
    assert len(issuer.calls) == 1

    issuer.down = False
    clock.advance(1)
    assert keys.find_key("k1") is not None
    assert len(issuer.calls) == 2


def test_an_unparseable_document_counts_as_a_failure() -> None:
    clock = FakeClock(1000.0)

    def fetch(url: str, timeout: float) -> Any:
        return {"not": "a jwk set"}

    with pytest.raises(TemporarilyUnavailableError):
        source(fetch, clock).find_key("k1")


def test_file_source_is_read_and_reread_after_the_refresh_interval(tmp_path: Path) -> None:
    path = tmp_path / "idp.jwks.json"
    path.write_text(json.dumps({"keys": [ec_jwk("k1")]}))
    clock = FakeClock(1000.0)
    keys = JwksSource(name="idp", allowed=ALLOWED, rules=RULES, clock=clock, path=path)

    assert keys.find_key("k1") is not None
    path.write_text(json.dumps({"keys": [ec_jwk("k2")]}))
    assert keys.find_key("k2") is None  # not yet: cached

    clock.advance(RULES.refresh_interval)
    assert keys.find_key("k2") is not None


def test_missing_file_with_nothing_cached_is_temporarily_unavailable(tmp_path: Path) -> None:
    keys = JwksSource(
        name="idp", allowed=ALLOWED, rules=RULES, clock=FakeClock(), path=tmp_path / "absent"
    )
    with pytest.raises(TemporarilyUnavailableError):
        keys.find_key("k1")


def test_fixed_document_is_never_refetched() -> None:
    clock = FakeClock(1000.0)
    keys = JwksSource(
        name="client",
        allowed=ALLOWED,
        rules=RULES,
        clock=clock,
        document={"keys": [ec_jwk("k1")]},
    )
    clock.advance(10 * RULES.refresh_interval)
    assert keys.find_key("k1") is not None
    assert keys.find_key("unknown") is None


# --- read_json_file -----------------------------------------------------------------------------


def test_read_json_file(tmp_path: Path) -> None:
    path = tmp_path / "doc.json"
    path.write_text('{"keys": []}')
    assert read_json_file(path) == {"keys": []}


@pytest.mark.parametrize("content", [b"not json", b"\xff\xfe", b"x" * (MAX_JWKS_BYTES + 1)])
def test_unreadable_files_are_unavailable(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "doc.json"
    path.write_bytes(content)
    with pytest.raises(JwksUnavailable):
        read_json_file(path)


# --- fetch_json over real HTTP ------------------------------------------------------------------

GOOD_JWKS = {"keys": [{"kty": "EC", "kid": "k"}]}


class _Handler(BaseHTTPRequestHandler):
    stop: threading.Event
    hits: list[str]

    def log_message(self, format: str, *args: Any) -> None:  # keep the test output clean
        pass

    def _send(self, status: int, body: bytes, **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self.hits.append(self.path)
        if self.path == "/jwks":
            self._send(200, json.dumps(GOOD_JWKS).encode())
        elif self.path == "/not-found":
            self._send(404, b'{"error": "nope"}')
        elif self.path == "/error":
            self._send(500, json.dumps(GOOD_JWKS).encode())
        elif self.path == "/redirect":
            self._send(302, b"", Location="/jwks")
        elif self.path == "/not-json":
            self._send(200, b"<html>hello</html>")
        elif self.path == "/huge":
            self._send(200, b'{"keys": [], "pad": "' + b"x" * MAX_JWKS_BYTES + b'"}')
        elif self.path == "/huge-chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunk = b"x" * 65536
            for _ in range(MAX_JWKS_BYTES // len(chunk) + 2):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.write(b"0\r\n\r\n")
        elif self.path == "/stall-headers":
            self.stop.wait(3)
        elif self.path == "/stall-body":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b'{"keys"')
            self.wfile.flush()
            self.stop.wait(3)
        elif self.path == "/trickle":
            # One byte at a time, each well within the socket timeout, never finishing.
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            while not self.stop.wait(0.05):
                self.wfile.write(b" ")
                self.wfile.flush()
        else:
            self._send(404, b"{}")


@pytest.fixture(scope="module")
def http_server() -> Iterator[tuple[str, list[str]]]:
    stop = threading.Event()
    hits: list[str] = []
    handler = type("Handler", (_Handler,), {"stop": stop, "hits": hits})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", hits
    stop.set()
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_fetch_json_returns_the_document(http_server: tuple[str, list[str]]) -> None:
    base, _ = http_server
    assert fetch_json(f"{base}/jwks", 2.0) == GOOD_JWKS


@pytest.mark.parametrize("path", ["/not-found", "/error"])
def test_non_200_is_unavailable(http_server: tuple[str, list[str]], path: str) -> None:
    base, _ = http_server
    with pytest.raises(JwksUnavailable, match="HTTP"):
        fetch_json(f"{base}{path}", 2.0)


def test_redirect_is_not_followed(http_server: tuple[str, list[str]]) -> None:
    base, hits = http_server
    hits.clear()
    with pytest.raises(JwksUnavailable, match="302"):
        fetch_json(f"{base}/redirect", 2.0)
    assert hits == ["/redirect"]


def test_body_that_is_not_json_is_unavailable(http_server: tuple[str, list[str]]) -> None:
    base, _ = http_server
    with pytest.raises(JwksUnavailable, match="not JSON"):
        fetch_json(f"{base}/not-json", 2.0)


@pytest.mark.parametrize("path", ["/huge", "/huge-chunked"])
def test_oversized_body_is_refused(http_server: tuple[str, list[str]], path: str) -> None:
    base, _ = http_server
    with pytest.raises(JwksUnavailable, match="too large"):
        fetch_json(f"{base}{path}", 2.0)


@pytest.mark.parametrize("path", ["/stall-headers", "/stall-body", "/trickle"])
def test_timeout_is_honoured(http_server: tuple[str, list[str]], path: str) -> None:
    base, _ = http_server
    started = time.monotonic()
    with pytest.raises(JwksUnavailable):
        fetch_json(f"{base}{path}", 0.3)
    assert time.monotonic() - started < 1.5


def test_connection_refused_is_unavailable() -> None:
    with socket.socket() as probe:  # a port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(JwksUnavailable):
        fetch_json(f"http://127.0.0.1:{port}/jwks", 1.0)


def test_stalled_issuer_with_nothing_cached_is_temporarily_unavailable(
    http_server: tuple[str, list[str]],
) -> None:
    base, _ = http_server
    clock = FakeClock(1000.0)
    rules = RefreshRules(refresh_interval=300.0, min_refetch_interval=30.0, fetch_timeout=0.3)
    stalled = JwksSource(
        name="stalled", allowed=ALLOWED, rules=rules, clock=clock, url=f"{base}/stall-body"
    )
    with pytest.raises(TemporarilyUnavailableError):
        stalled.find_key("k")
