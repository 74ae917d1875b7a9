"""Client authentication at the token endpoint (RFC 6749 §2.3, RFC 7523 §2.2), with Authlib.

Confidential clients only: ``client_secret_basic``, ``client_secret_post`` (secrets compared in
constant time) and ``private_key_jwt`` (a signed assertion whose ``aud`` is our issuer or token
endpoint, with a short ``exp`` and a ``jti`` that is accepted once). RFC 6749 §2.3: a client
"MUST NOT use more than one authentication method in each request"; such a request is refused.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from authlib.oauth2.base import OAuth2Error
from authlib.oauth2.rfc6749 import ClientAuthentication, ClientMixin
from authlib.oauth2.rfc7523 import JWTBearerClientAssertion
from joserfc import jwt as jose_jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from pydantic import SecretStr

from sidecar.config import ClientConfig, Settings
from sidecar.errors import (
    InvalidClientError,
    InvalidRequestError,
    ProtocolError,
    TemporarilyUnavailableError,
)
from sidecar.exchange.request import FormParams
from sidecar.jwks import JwksUnavailable, fetch_json


class JtiRegistry(Protocol):
    """What client authentication needs from storage (sidecar.store.jtis.JtiStore): RFC 7523
    §3 item 7, a ``jti`` accepted once per client until it expires."""

    def remember(self, client_id: str, jti: str, expires_at: float) -> bool:
        """Record ``jti``; False if this client already used it (a replay)."""
        ...


log = logging.getLogger(__name__)

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_ALGORITHMS = ("RS256", "PS256", "ES256", "EdDSA")
# An assertion may live at most this long (exp - now): short-lived by design.
MAX_ASSERTION_LIFETIME = 300
CLIENT_JWKS_REFRESH = 300.0


class Client(ClientMixin):  # type: ignore[misc]
    """A configured client, in the shape Authlib's client authentication expects."""

    def __init__(self, config: ClientConfig, key_set: Callable[[], KeySet] | None) -> None:
        self.config = config
        self.client_id = config.client_id
        self._secret = (
            config.client_secret.get_secret_value().encode() if config.client_secret else None
        )
        self._key_set = key_set

    def get_client_id(self) -> str:
        return self.client_id

    def check_client_secret(self, client_secret: str) -> bool:
        if self._secret is None:
            return False
        # Constant time: the comparison must not reveal how much of the secret matched.
        return hmac.compare_digest(client_secret.encode("utf-8", "surrogatepass"), self._secret)

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return endpoint == "token" and method in self.config.auth_methods

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type in self.config.grant_types

    def key_set(self) -> KeySet:
        if self._key_set is None:
            raise InvalidClientError(reason="client has no keys")
        return self._key_set()


class _ClientKeys:
    """A client's JWK Set for private_key_jwt, inline or from its jwks_uri (cached)."""

    def __init__(
        self, config: ClientConfig, clock: Callable[[], float], fetch: Callable[[str, float], Any]
    ) -> None:
        self._config = config
        self._clock = clock
        self._fetch = fetch
        self._cached: KeySet | None = None
        self._fetched_at = float("-inf")
        if config.jwks is not None:
            self._cached = KeySet.import_key_set(config.jwks)  # type: ignore[arg-type]
            self._fetched_at = float("inf")

    def __call__(self) -> KeySet:
        if self._clock() - self._fetched_at >= CLIENT_JWKS_REFRESH:
            assert self._config.jwks_uri is not None
            try:
                self._cached = KeySet.import_key_set(self._fetch(self._config.jwks_uri, 3.0))
                self._fetched_at = self._clock()
            except (JwksUnavailable, JoseError, ValueError, TypeError) as exc:
                log.warning(
                    "keys of client %s unavailable: %s", self._config.client_id, type(exc).__name__
                )
        if self._cached is None:
            raise InvalidClientError(reason="client keys unavailable")
        return self._cached


class PrivateKeyJwt(JWTBearerClientAssertion):  # type: ignore[misc]
    """RFC 7523 §2.2 client authentication, as Authlib implements it, with our rules pinned:
    the algorithms, the accepted audiences, a short lifetime and database-backed ``jti``s."""

    CLIENT_AUTH_METHOD = "private_key_jwt"

    def __init__(
        self, audiences: list[str], jtis: JtiRegistry, clock: Callable[[], float], leeway: int
    ) -> None:
        super().__init__(validate_jti=True, leeway=leeway)
        self._audiences = audiences
        self._jtis = jtis
        self._clock = clock

    def get_audiences(self) -> list[str]:
        # RFC 7523 §3 item 3: "The JWT MUST contain an aud claim containing a value that
        # identifies the authorization server as an intended audience" - issuer or token endpoint.
        return self._audiences

    def resolve_client_public_key(self, client: Client) -> KeySet:
        return client.key_set()

    def process_assertion_claims(self, assertion: str, resolve_key: Any) -> Any:
        try:
            token = jose_jwt.decode(assertion, resolve_key, algorithms=list(ASSERTION_ALGORITHMS))
        except JoseError as exc:
            raise InvalidClientError(reason="client assertion signature invalid") from exc
        self.verify_claims(token.claims)
        return token.claims

    def verify_claims(self, claims: Any) -> None:
        exp = claims.get("exp")
        if not isinstance(exp, int | float) or isinstance(exp, bool):
            raise InvalidClientError(reason="client assertion without numeric exp")
        if exp - self._clock() > MAX_ASSERTION_LIFETIME:
            raise InvalidClientError(reason="client assertion lifetime too long")
        super().verify_claims(claims)

    def validate_jti(self, claims: Any, jti: Any) -> bool:
        if not isinstance(jti, str):
            return False
        return self._jtis.remember(claims["sub"], jti, expires_at=float(claims["exp"]))


@dataclass(slots=True)
class _AuthlibRequest:
    """The few attributes of an OAuth2Request that Authlib's client authentication reads."""

    headers: Mapping[str, str]
    form: Mapping[str, str]
    auth_method: str | None = None
    client: Any = None

    @property
    def payload(self) -> _AuthlibRequest:
        return self

    @property
    def data(self) -> Mapping[str, str]:
        return self.form

    @property
    def client_id(self) -> str | None:
        return self.form.get("client_id")


def _method_used(form: FormParams, authorization: str | None) -> str | None:
    methods = []
    if authorization is not None:
        scheme = authorization.split(" ", 1)[0].lower()
        if scheme != "basic":
            # RFC 6749 §5.2: the client used the Authorization header, so the 401 carries a
            # challenge, and Basic is the one scheme this endpoint accepts.
            raise InvalidClientError(reason="unsupported Authorization scheme", basic=True)
        methods.append("client_secret_basic")
    if "client_secret" in form:
        methods.append("client_secret_post")
    if "client_assertion" in form or "client_assertion_type" in form:
        methods.append("private_key_jwt")
    if len(methods) > 1:
        raise InvalidRequestError(reason="more than one client authentication method")
    return methods[0] if methods else None


class ServiceAccountTokens:
    """Kubernetes service-account tokens as client assertions (RFC 7523 §2.2 with a third-party
    issuer, RFC 7521 §5.1): the projected token a pod's kubelet writes, audience-bound to this
    service, signed by the cluster. Verified like a subject token (issuer, kid in the cluster's
    JWKS only, algorithm allowlist, exp/nbf/iat with leeway, audience), then bound to the one
    client configured with its ``sub`` (``system:serviceaccount:<namespace>:<name>``), which the
    ``kubernetes.io`` claim must confirm. The kubelet hands the same token to every call until it
    rotates it, so there is no one-time ``jti``: the audience and the lifetime bound it."""

    def __init__(
        self,
        settings: Settings,
        clients: Mapping[str, Client],
        clock: Callable[[], float],
        fetch: Callable[[str, float], Any],
    ) -> None:
        from sidecar.issuers import IssuerDirectory

        assert settings.kubernetes is not None
        self.issuer = settings.kubernetes.issuer
        self._max_lifetime = settings.kubernetes.max_token_lifetime
        self._leeway = settings.tokens.leeway
        self._directory = IssuerDirectory(settings, clock, fetch, entries=[settings.kubernetes])
        self._clients = {
            client.config.kubernetes_service_account: client
            for client in clients.values()
            if client.config.kubernetes_service_account is not None
        }

    def claims_issuer(self, assertion: str) -> bool:
        """Whether the (unverified) assertion names the cluster as its issuer."""
        return unverified_issuer(assertion) == self.issuer

    def authenticate(self, assertion: str) -> Client:
        from sidecar.exchange.subject import verify_token

        try:
            verified = verify_token(
                assertion, self._directory, leeway=self._leeway, role="service account"
            )
        except InvalidRequestError as exc:
            raise InvalidClientError(reason=exc.reason) from exc
        claims = verified.claims
        iat = claims.get("iat")
        if not isinstance(iat, int | float) or isinstance(iat, bool):
            raise InvalidClientError(reason="service account token without iat")
        # (exp is required and numeric: verify_token checked it.)
        if verified.expires_at - float(iat) > self._max_lifetime:
            raise InvalidClientError(reason="service account token lifetime too long")
        _, namespace, name = _service_account_parts(verified.subject)
        kubernetes = claims.get("kubernetes.io")
        account = kubernetes.get("serviceaccount") if isinstance(kubernetes, Mapping) else None
        if (
            not isinstance(account, Mapping)
            or kubernetes.get("namespace") != namespace  # type: ignore[union-attr]
            or account.get("name") != name
        ):
            raise InvalidClientError(reason="service account token claims disagree with its sub")
        client = self._clients.get(verified.subject)
        if client is None:
            raise InvalidClientError(reason="no client for this service account")
        return client


def _service_account_parts(subject: str) -> tuple[str, str, str]:
    prefix, _, rest = subject.partition("system:serviceaccount:")
    namespace, _, name = rest.partition(":")
    if prefix or not namespace or not name:
        raise InvalidClientError(reason="service account token sub is not a service account")
    return prefix, namespace, name


def unverified_issuer(assertion: str) -> str | None:
    """The ``iss`` an assertion names, read without verification (to choose the verifier)."""
    parts = assertion.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, RecursionError):
        return None
    issuer = claims.get("iss") if isinstance(claims, dict) else None
    return issuer if isinstance(issuer, str) else None


class ClientAuthenticator:
    def __init__(
        self,
        settings: Settings,
        jtis: JtiRegistry,
        clock: Callable[[], float],
        fetch: Callable[[str, float], Any] = fetch_json,
    ) -> None:
        self.clients = {
            c.client_id: Client(
                c, _ClientKeys(c, clock, fetch) if c.client_secret is None else None
            )
            for c in settings.clients
        }
        # An unknown client_id is answered exactly like a wrong secret, after a comparison of
        # the same cost, so response times do not tell which client ids exist.
        self._unknown = Client(
            ClientConfig(client_id="unknown", client_secret=SecretStr(secrets.token_urlsafe(32))),
            None,
        )
        self._service_accounts = (
            ServiceAccountTokens(settings, self.clients, clock, fetch)
            if settings.kubernetes is not None
            else None
        )
        self._authlib = ClientAuthentication(self._find_client)
        self._authlib.register(
            "private_key_jwt",
            PrivateKeyJwt(
                [settings.issuer, settings.token_endpoint], jtis, clock, settings.tokens.leeway
            ),
        )

    def _find_client(self, client_id: str) -> Client:
        return self.clients.get(client_id) or self._unknown

    def authenticate(self, form: FormParams, authorization: str | None) -> Client:
        """Return the authenticated client, or raise ``invalid_client`` / ``invalid_request``."""
        method = _method_used(form, authorization)
        basic = method == "client_secret_basic"
        if method is None:
            raise InvalidClientError(reason="no client authentication")
        if (
            method == "private_key_jwt"
            and form.single("client_assertion_type") != CLIENT_ASSERTION_TYPE
        ):
            raise InvalidClientError(reason="unsupported client_assertion_type")
        assertion = form.single("client_assertion")
        if (
            method == "private_key_jwt"
            and self._service_accounts is not None
            and assertion is not None
            and self._service_accounts.claims_issuer(assertion)
        ):
            account_client = self._service_accounts.authenticate(assertion)
            return self._matching_claimed_id(form, account_client, basic=False)
        request = _AuthlibRequest(
            headers={"Authorization": authorization} if authorization else {},
            form={name: values[0] for name, values in form.values.items()},
        )
        try:
            client: Client = self._authlib.authenticate(request, [method], "token")
        except TemporarilyUnavailableError:
            raise
        except ProtocolError as exc:
            raise InvalidClientError(reason=exc.reason, basic=basic) from exc
        except (OAuth2Error, JoseError, ValueError) as exc:
            raise InvalidClientError(reason=f"{method} failed", basic=basic) from exc
        if client is self._unknown:  # cannot happen (its secret is random); fail closed anyway
            raise InvalidClientError(reason="unknown client", basic=basic)
        if client.config.kubernetes_service_account is not None:
            # Only the cluster's token authenticates such a client, never a key of its own.
            raise InvalidClientError(reason="client authenticates with its service account")
        return self._matching_claimed_id(form, client, basic=basic)

    @staticmethod
    def _matching_claimed_id(form: FormParams, client: Client, *, basic: bool) -> Client:
        claimed = form.single("client_id")
        if claimed is not None and claimed != client.client_id:
            # RFC 6749 §3.2.1 / RFC 7521 §4.2: a client_id parameter must name the same client.
            raise InvalidClientError(reason="client_id does not match the credentials", basic=basic)
        return client
