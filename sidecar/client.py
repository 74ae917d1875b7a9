"""A gateway's client of the token endpoint: OAuth 2.0 Token Exchange, RFC 8693 §2.1
(https://www.rfc-editor.org/rfc/rfc8693#section-2.1), with a cache, single-flight and typed errors.

Standalone: it imports only the standard library and ``requests``, so any Python gateway can copy
or import it without the rest of the sidecar. In three lines::

    client = TokenExchangeClient("http://127.0.0.1:8080/token", "gateway", secret)
    cred = client.exchange(user_token, "https://code-search.internal/mcp", scope="code.read")
    requests.get(url, headers=cred.headers())

Credentials are cached by (SHA-256 of the subject token, audience, resource, scope, token types)
until ``margin`` seconds before they expire; concurrent identical exchanges share one request.
Refusals raise one :class:`ExchangeError` subclass per RFC 6749 §5.2 ``error`` code; anything
that is not an OAuth answer raises :class:`TransportError`. No subject token or client secret
ever appears in a cache key, an exception or a ``repr``.
"""

from __future__ import annotations

import base64
import hashlib
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any, ClassVar, Literal
from urllib.parse import quote

import requests

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"

# RFC 9110 §5.1: a field name is a token.
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_RESPONSE_MEMBERS = ("access_token", "token_type", "issued_token_type", "expires_in", "scope")


# --- errors -----------------------------------------------------------------------------------


class ExchangeError(Exception):
    """A refused or failed exchange: the RFC 6749 §5.2 ``error`` code, its ``description``, the
    HTTP ``status`` and, when the endpoint sent ``Retry-After``, ``retry_after`` in seconds."""

    code: ClassVar[str | None] = None  # the ``error`` code a subclass stands for

    def __init__(
        self,
        error: str,
        description: str | None = None,
        *,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.error = error
        self.description = description
        self.status = status
        self.retry_after = retry_after
        message = f"{error}: {description}" if description else error
        super().__init__(f"{message} (HTTP {status})" if status is not None else message)


class InvalidRequest(ExchangeError):
    code = "invalid_request"


class InvalidClient(ExchangeError):
    code = "invalid_client"


class InvalidGrant(ExchangeError):
    code = "invalid_grant"


class UnauthorizedClient(ExchangeError):
    code = "unauthorized_client"


class UnsupportedGrantType(ExchangeError):
    code = "unsupported_grant_type"


class InvalidScope(ExchangeError):
    code = "invalid_scope"


class InvalidTarget(ExchangeError):
    code = "invalid_target"


class TemporarilyUnavailable(ExchangeError):
    code = "temporarily_unavailable"


class ServerError(ExchangeError):
    code = "server_error"


class TransportError(ExchangeError):
    """No OAuth answer: unreachable, timed out, redirected, or a body that is not one."""

    code = "transport_error"

    def __init__(self, description: str, *, status: int | None = None) -> None:
        super().__init__("transport_error", description, status=status)


# Every subclass but TransportError stands for an ``error`` code a token endpoint answers with.
_ERRORS: dict[str, type[ExchangeError]] = {
    cls.code: cls
    for cls in ExchangeError.__subclasses__()
    if cls.code and cls is not TransportError
}


# --- the credential ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Credential:
    """An issued token (RFC 8693 §2.2.1). ``expires_at`` is on the client's clock (monotonic by
    default), None when the endpoint gave no ``expires_in``; ``extra`` holds the other members."""

    access_token: str = field(repr=False)
    token_type: str
    issued_token_type: str
    expires_in: int | None
    scope: str | None
    extra: dict[str, Any] = field(default_factory=dict, repr=False, hash=False)
    expires_at: float | None = None

    def authorization_header(self) -> str:
        """The ``Authorization`` value: ``Bearer <token>`` (RFC 6750 §2.1) for a bearer token,
        the bare token for another type whose response names ``Authorization`` as its header."""
        if self.token_type.lower() == "bearer":
            return f"Bearer {self.access_token}"
        if self._credential_header().lower() == "authorization":
            return self.access_token
        raise ValueError(f"a {self.token_type!r} token is not sent as an Authorization header")

    def headers(self) -> dict[str, str]:
        """The request headers that present this credential to the upstream."""
        if self.token_type.lower() == "bearer":
            return {"Authorization": self.authorization_header()}
        return {self._credential_header(): self.access_token}

    def _credential_header(self) -> str:
        name = self.extra.get("credential_header")
        if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
            raise ValueError(f"no usable credential_header for a {self.token_type!r} token")
        return name


# --- the client -------------------------------------------------------------------------------

CacheKey = tuple[str, str | None, str | None, str | None, str, str | None]
AuthMethod = Literal["client_secret_basic", "client_secret_post"]


class TokenExchangeClient:
    """Exchanges subject tokens at ``token_url`` as the confidential client ``client_id``.

    ``timeout`` bounds connecting and each read (seconds); a cached credential stops being used
    ``margin`` seconds before it expires; at most ``max_entries`` are cached (least recently used
    evicted first). Thread-safe. ``clock`` must be monotonic; tests inject their own.
    """

    def __init__(
        self,
        token_url: str,
        client_id: str,
        client_secret: str,
        *,
        auth_method: AuthMethod = "client_secret_basic",
        timeout: float = 2.0,
        margin: float = 10.0,
        max_entries: int = 10_000,
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if auth_method not in ("client_secret_basic", "client_secret_post"):
            raise ValueError(f"unsupported auth_method {auth_method!r}")
        if timeout <= 0 or margin < 0 or max_entries < 0:
            raise ValueError("timeout must be positive, margin and max_entries not negative")
        self.token_url = token_url
        self.client_id = client_id
        self._client_secret = client_secret
        self._auth_method = auth_method
        self._timeout = timeout
        self._margin = margin
        self._max_entries = max_entries
        self._owns_session = session is None
        self._session = session if session is not None else requests.Session()
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: OrderedDict[CacheKey, Credential] = OrderedDict()
        self._in_flight: dict[CacheKey, Future[Credential]] = {}
        self._generation = 0  # bumped by clear(): an exchange begun before it is not cached

    def __enter__(self) -> TokenExchangeClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Forget every credential; close the HTTP session unless the caller passed it in."""
        self.clear()
        if self._owns_session:
            self._session.close()

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()
            self._generation += 1

    def exchange(
        self,
        subject_token: str,
        audience: str | None = None,
        *,
        resource: str | None = None,
        scope: str | Iterable[str] | None = None,
        subject_token_type: str = ACCESS_TOKEN_TYPE,
        requested_token_type: str | None = None,
    ) -> Credential:
        """A credential for ``audience`` and/or ``resource``: cached, the one another thread is
        already fetching for the same key, or fetched now. Raises an :class:`ExchangeError`."""
        if not subject_token:
            raise ValueError("subject_token is empty")
        if audience is None and resource is None:
            raise ValueError("an audience or a resource is required")
        scopes = normalise_scope(scope)
        digest = hashlib.sha256(subject_token.encode()).hexdigest()
        key = (digest, audience, resource, scopes, subject_token_type, requested_token_type)
        with self._lock:
            cached = self._fresh(key)
            if cached is not None:
                return cached
            leader = key not in self._in_flight
            if leader:
                self._in_flight[key] = Future()
            future = self._in_flight[key]
            generation = self._generation
        if not leader:
            return future.result()  # the leader's credential, or its exception raised here
        form = {
            "grant_type": TOKEN_EXCHANGE,
            "subject_token": subject_token,
            "subject_token_type": subject_token_type,
            "audience": audience,
            "resource": resource,
            "scope": scopes,
            "requested_token_type": requested_token_type,
        }
        try:
            credential = self._request({k: v for k, v in form.items() if v is not None})
        except BaseException as exc:
            with self._lock:
                del self._in_flight[key]
            # Waiters get the leader's error; an interrupt of the leader's thread is its own.
            shared = exc if isinstance(exc, Exception) else TransportError("Interrupted.")
            future.set_exception(shared)
            raise
        with self._lock:
            if generation == self._generation:
                self._store(key, credential)
            del self._in_flight[key]
        future.set_result(credential)
        return credential

    def _fresh(self, key: CacheKey) -> Credential | None:
        credential = self._cache.get(key)
        if credential is None:
            return None
        assert credential.expires_at is not None  # only expiring credentials are cached
        if self._clock() < credential.expires_at - self._margin:
            self._cache.move_to_end(key)
            return credential
        del self._cache[key]
        return None

    def _store(self, key: CacheKey, credential: Credential) -> None:
        # Not worth caching when it would be stale at once (expires_in <= margin).
        if credential.expires_in is None or credential.expires_in <= self._margin:
            return
        self._cache[key] = credential
        self._cache.move_to_end(key)
        while len(self._cache) > self._max_entries:
            self._cache.popitem(last=False)

    def _request(self, form: dict[str, str]) -> Credential:
        headers = {"Accept": "application/json"}
        if self._auth_method == "client_secret_basic":
            # RFC 6749 §2.3.1: id and secret are form-urlencoded before they are base64-encoded.
            pair = f"{quote(self.client_id, safe='')}:{quote(self._client_secret, safe='')}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        else:
            form = {**form, "client_id": self.client_id, "client_secret": self._client_secret}
        # Taken before sending: the token's lifetime starts no earlier than this.
        sent_at = self._clock()
        try:
            # No redirects: a 307/308 would resend the subject token and secret elsewhere.
            response = self._session.post(
                self.token_url,
                data=form,
                headers=headers,
                timeout=self._timeout,
                allow_redirects=False,
            )
        except requests.Timeout as exc:
            raise TransportError("The token endpoint did not answer in time.") from exc
        except requests.RequestException as exc:
            raise TransportError("The token endpoint could not be reached.") from exc
        return _credential_from(
            response, sent_at, hide=(form["subject_token"], self._client_secret)
        )


def normalise_scope(scope: str | Iterable[str] | None) -> str | None:
    """RFC 6749 §3.3: scope is a set of space-delimited strings; sorted, so order is no key."""
    if scope is None:
        return None
    words = scope.split() if isinstance(scope, str) else [w for s in scope for w in s.split()]
    return " ".join(sorted(set(words))) or None


def _credential_from(
    response: requests.Response, sent_at: float, hide: tuple[str, ...]
) -> Credential:
    status = response.status_code
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise TransportError("The token endpoint's answer is not a JSON object.", status=status)
    if status != 200:
        error = body.get("error")
        if not isinstance(error, str) or not error:
            raise TransportError(
                "The token endpoint's answer is not an OAuth error.", status=status
            )
        description = body.get("error_description")
        raise _ERRORS.get(error, ExchangeError)(
            error,
            _scrubbed(description, hide) if isinstance(description, str) else None,
            status=status,
            retry_after=_retry_after(response.headers.get("Retry-After")),
        )
    access_token, token_type = body.get("access_token"), body.get("token_type")
    issued_token_type, scope = body.get("issued_token_type"), body.get("scope")
    expires_in = body.get("expires_in")
    if not (
        isinstance(access_token, str)
        and access_token
        and isinstance(token_type, str)
        and isinstance(issued_token_type, str)
        and (scope is None or isinstance(scope, str))
        and (expires_in is None or (type(expires_in) is int and expires_in >= 0))
    ):
        raise TransportError("The token endpoint's answer is not a token response.", status=status)
    return Credential(
        access_token=access_token,
        token_type=token_type,
        issued_token_type=issued_token_type,
        expires_in=expires_in,
        scope=scope,
        extra={k: v for k, v in body.items() if k not in _RESPONSE_MEMBERS},
        expires_at=None if expires_in is None else sent_at + expires_in,
    )


def _retry_after(value: str | None) -> float | None:
    """RFC 9110 §10.2.3: delay-seconds or an HTTP-date; None when absent or unreadable."""
    if value is None:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _scrubbed(description: str, hide: tuple[str, ...]) -> str:
    """``description`` without the subject token or secret, should a server echo them (this
    sidecar never does)."""
    for value in hide:
        description = description.replace(value, "[redacted]")
    return description
