"""Access tokens from an upstream's own authorization server, for upstreams that do not trust our
keys: the OAuth 2.0 client credentials grant, RFC 6749 §4.4
(https://www.rfc-editor.org/rfc/rfc6749#section-4.4), "the client can request an access token
using only its client credentials", authenticated per §2.3.1 (``client_secret_basic`` or
``client_secret_post``); the target goes as RFC 8707 ``resource``
(https://www.rfc-editor.org/rfc/rfc8707#section-2) or as the widespread ``audience``.

Tokens are cached by (scopes, target) until shortly before they expire; concurrent requests for
one key share one fetch; transient failures (unreachable, timed out, 5xx, 429) are retried with
backoff. Every failure raises :class:`TemporarilyUnavailableError`: the client sees a 503, and
the audit trail a reason naming the upstream and the kind of failure, never the upstream's
``error_description`` or body, a token or the client secret.
"""

from __future__ import annotations

import base64
import json
import logging
import random
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit

import requests

from sidecar.errors import TemporarilyUnavailableError

log = logging.getLogger(__name__)

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})
DEFAULT_LIFETIME = 60  # seconds, for a response without expires_in (RFC 6749 §5.1: RECOMMENDED)
MAX_RETRY_AFTER = 5.0  # a longer Retry-After is not waited for: the backoff is used instead
MAX_RESPONSE_BYTES = 64 * 1024
# An upstream's ``error`` code reaches our audit trail only if it is a short, plain token.
_ERROR_CODE = re.compile(r"[A-Za-z0-9_.-]{1,64}")

CacheKey = tuple[tuple[str, ...], str | None]


@dataclass(frozen=True, slots=True)
class ClientCredentialsSettings:
    name: str  # the upstream's name, for logs and audit reasons; never a secret
    token_url: str
    client_id: str
    client_secret: str = field(repr=False)
    auth_method: str = "client_secret_basic"  # or "client_secret_post"
    audience_parameter: str = "resource"  # "resource" (RFC 8707), "audience" or "none"
    timeout: float = 2.0  # seconds, per attempt: connecting, and each read
    retries: int = 1  # extra attempts after the first, on transient failures only
    backoff: float = 0.2  # first wait (seconds); doubled each retry, plus up to 50% jitter
    margin: float = 30.0  # stop using a token this long before it expires (at most 10% of it)
    max_entries: int = 1000
    failure_memory: float = 5.0  # after a failed fetch, answer 503 at once for this long

    def __post_init__(self) -> None:
        url = urlsplit(self.token_url)
        loopback = url.scheme == "http" and url.hostname in LOOPBACK_HOSTS
        # Plain http would send the client secret in the clear; loopback is for tests and dev.
        if not (url.scheme == "https" or loopback) or not url.hostname:
            raise ValueError(f"upstream {self.name}: the token URL must be https")
        if url.username is not None:
            raise ValueError(f"upstream {self.name}: credentials do not belong in the token URL")
        if self.auth_method not in ("client_secret_basic", "client_secret_post"):
            raise ValueError(f"upstream {self.name}: unsupported auth_method")
        if self.audience_parameter not in ("resource", "audience", "none"):
            raise ValueError(f"upstream {self.name}: unsupported audience_parameter")
        if not self.client_id or not self.client_secret:
            raise ValueError(f"upstream {self.name}: client_id and client_secret are required")
        if self.timeout <= 0 or min(self.retries, self.backoff, self.margin, self.max_entries) < 0:
            raise ValueError(f"upstream {self.name}: a timing or size setting is out of range")


@dataclass(frozen=True, slots=True)
class UpstreamToken:
    access_token: str = field(repr=False)
    token_type: str  # as the upstream's authorization server said, e.g. "Bearer"
    expires_at: float  # on the source's clock
    scope: str | None  # the scope granted, if the authorization server said


Fetched = tuple[UpstreamToken, float]  # a token, and the time until which it is used


class _Failure(Exception):
    """One failed attempt: ``str`` is the audit reason, without the upstream's name."""

    def __init__(self, reason: str, *, transient: bool, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.transient = transient
        self.retry_after = retry_after


class ClientCredentialsSource:
    """Tokens from one upstream's authorization server. Thread-safe."""

    def __init__(
        self,
        settings: ClientCredentialsSettings,
        *,
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        self._owns_session = session is None
        self._session = session if session is not None else requests.Session()
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._cache: OrderedDict[CacheKey, Fetched] = OrderedDict()
        self._in_flight: dict[CacheKey, Future[UpstreamToken]] = {}
        self._failed: dict[CacheKey, tuple[float, str]] = {}  # key -> (not before, reason)
        self._generation = 0  # bumped by clear(): a fetch begun before it is not cached
        self._warned_no_lifetime = False
        # Called with "ok" or "failed" after each fetch from the authorization server (metrics).
        self.observe: Callable[[str], None] | None = None
        s = settings
        # A waiter gives up once the fetch it waits for must have ended: every attempt timed
        # out and every wait between them was the longest it can be.
        waits = sum(max(s.backoff * 2**i * 1.5, MAX_RETRY_AFTER) for i in range(s.retries))
        self._wait_bound = s.timeout * (s.retries + 1) + waits + 1.0

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()
            self._generation += 1

    def close(self) -> None:
        """Forget every token; close the HTTP session unless the caller passed it in."""
        self.clear()
        if self._owns_session:
            self._session.close()

    def token(self, scopes: tuple[str, ...], target: str | None) -> UpstreamToken:
        """A token for (scopes, target): cached, or fetched (once for many concurrent callers).
        Raises :class:`TemporarilyUnavailableError` on any failure."""
        key: CacheKey = (tuple(sorted({word for s in scopes for word in s.split()})), target)
        with self._lock:
            failed = self._failed.get(key)
            if failed is not None and self._clock() < failed[0]:
                # A server that just failed is not asked again at once: requests are answered
                # 503 now rather than each holding a thread through the same timeouts.
                raise TemporarilyUnavailableError(reason=f"{failed[1]} (failed recently)")
            cached = self._cache.get(key)
            if cached is not None and self._clock() < cached[1]:
                self._cache.move_to_end(key)
                return cached[0]
            self._cache.pop(key, None)
            future = self._in_flight.get(key)
            leader = future is None
            if future is None:
                future = self._in_flight[key] = Future()
            generation = self._generation
        if not leader:
            try:
                return future.result(timeout=self._wait_bound)
            except TimeoutError:
                raise TemporarilyUnavailableError(
                    reason=f"upstream {self.settings.name}: gave up waiting for a token request"
                ) from None
        try:
            token, usable_until = self._fetch(*key)
        except BaseException as exc:
            self._observe("failed")
            with self._lock:
                del self._in_flight[key]
                reason = getattr(exc, "reason", None) or f"upstream {self.settings.name}: failed"
                self._failed[key] = (self._clock() + self.settings.failure_memory, reason)
                while len(self._failed) > self.settings.max_entries:
                    self._failed.pop(next(iter(self._failed)))
            # Waiters share the leader's error; an unexpected one still reaches them as a 503.
            shared = exc
            if not isinstance(exc, TemporarilyUnavailableError):
                shared = TemporarilyUnavailableError(
                    reason=f"upstream {self.settings.name}: token request failed"
                )
            future.set_exception(shared)
            raise
        self._observe("ok")
        with self._lock:
            self._failed.pop(key, None)
            if generation == self._generation:
                self._cache[key] = (token, usable_until)
                self._cache.move_to_end(key)
                while len(self._cache) > self.settings.max_entries:
                    self._cache.popitem(last=False)
            del self._in_flight[key]
        future.set_result(token)
        return token

    def _observe(self, outcome: str) -> None:
        if self.observe is not None:
            try:
                self.observe(outcome)
            except Exception:  # a metric never fails a token request
                log.exception("upstream %s: observer failed", self.settings.name)

    def _fetch(self, scopes: tuple[str, ...], target: str | None) -> Fetched:
        s = self.settings
        form = {"grant_type": "client_credentials"}
        if scopes:
            form["scope"] = " ".join(scopes)
        if target is not None and s.audience_parameter != "none":
            form[s.audience_parameter] = target
        headers = {"Accept": "application/json"}
        if s.auth_method == "client_secret_basic":
            # RFC 6749 §2.3.1: id and secret are form-urlencoded before they are base64-encoded.
            pair = f"{quote(s.client_id, safe='')}:{quote(s.client_secret, safe='')}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        else:
            form.update(client_id=s.client_id, client_secret=s.client_secret)
        for attempt in range(s.retries + 1):
            try:
                return self._attempt(form, headers)
            except _Failure as failure:
                if not failure.transient or attempt == s.retries:
                    tries = f" ({attempt + 1} attempts)" if attempt else ""
                    raise TemporarilyUnavailableError(
                        reason=f"upstream {s.name}: {failure}{tries}"
                    ) from failure
                delay = failure.retry_after
                if delay is None or delay > MAX_RETRY_AFTER:
                    delay = s.backoff * 2**attempt * random.uniform(1.0, 1.5)
                log.warning("upstream %s: %s; retrying in %.2f s", s.name, failure, delay)
                self._sleep(delay)
        raise AssertionError("unreachable")  # the last attempt returned or raised

    def _attempt(self, form: dict[str, str], headers: dict[str, str]) -> Fetched:
        s = self.settings
        sent_at = self._clock()  # the token's lifetime starts no earlier than this
        try:
            # No redirects: a 307/308 would resend the client secret to wherever it points.
            with self._session.post(
                s.token_url,
                data=form,
                headers=headers,
                timeout=s.timeout,
                allow_redirects=False,
                stream=True,
            ) as response:
                status, retry_after = response.status_code, response.headers.get("Retry-After")
                body = bytearray()
                for chunk in response.iter_content(16 * 1024):
                    body += chunk
                    if len(body) > MAX_RESPONSE_BYTES:
                        raise _Failure("answer too large", transient=False)
        except requests.Timeout as exc:
            raise _Failure("timed out", transient=True) from exc
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
            raise _Failure("unreachable", transient=True) from exc
        except requests.RequestException as exc:
            raise _Failure(f"request failed ({type(exc).__name__})", transient=False) from exc
        if status != 200:
            answer = f"authorization server answered {status}{_error_code(bytes(body))}"
            if 300 <= status < 400:
                answer += " (redirects are not followed)"
            transient = status == 429 or status >= 500
            raise _Failure(answer, transient=transient, retry_after=_seconds(retry_after))
        return self._token_from(bytes(body), sent_at)

    def _token_from(self, body: bytes, sent_at: float) -> Fetched:
        """The token and the time until which it is used, from a 200 answer (RFC 6749 §5.1)."""
        try:
            document = json.loads(body)
        except ValueError:
            raise _Failure("token response is not JSON", transient=False) from None
        if not isinstance(document, dict):
            raise _Failure("token response is not a JSON object", transient=False)
        access_token, token_type = document.get("access_token"), document.get("token_type")
        expires_in, scope = document.get("expires_in", DEFAULT_LIFETIME), document.get("scope")
        if not isinstance(access_token, str) or not access_token:
            raise _Failure("token response has no access_token", transient=False)
        if not B64TOKEN.fullmatch(access_token):
            # RFC 6750 §2.1 b64token: it goes into an Authorization header as it is.
            raise _Failure("token response has an access_token unfit for a header", transient=False)
        if not isinstance(token_type, str) or not token_type:
            raise _Failure("token response has no token_type", transient=False)
        if token_type.lower() != "bearer":
            # A DPoP (RFC 9449) or other token needs more than the token to be used: refused.
            raise _Failure("token response is not a bearer token", transient=False)
        token_type = "Bearer"
        # type() rather than isinstance(): JSON true is not a lifetime.
        if type(expires_in) is not int or expires_in <= 0:
            raise _Failure("token response has an unusable expires_in", transient=False)
        if scope is not None and not isinstance(scope, str):
            raise _Failure("token response has an unusable scope", transient=False)
        if "expires_in" not in document and not self._warned_no_lifetime:
            self._warned_no_lifetime = True
            log.warning(
                "upstream %s: token response has no expires_in; assuming %d s",
                self.settings.name,
                DEFAULT_LIFETIME,
            )
        expires_at = sent_at + expires_in
        token = UpstreamToken(access_token, token_type, expires_at, scope)
        return token, expires_at - min(self.settings.margin, expires_in / 10)


B64TOKEN = re.compile(r"[A-Za-z0-9._~+/-]+=*")


def _error_code(body: bytes) -> str:
    """`` <error>`` from an RFC 6749 §5.2 error body, if it is a plain short token; else ''."""
    try:
        document = json.loads(body)
    except ValueError:
        return ""
    error = document.get("error") if isinstance(document, dict) else None
    return f" {error}" if isinstance(error, str) and _ERROR_CODE.fullmatch(error) else ""


def _seconds(retry_after: str | None) -> float | None:
    """A Retry-After in delay-seconds (RFC 9110 §10.2.3); None if absent or an HTTP-date."""
    value = (retry_after or "").strip()
    return float(value) if value.isascii() and value.isdigit() else None
