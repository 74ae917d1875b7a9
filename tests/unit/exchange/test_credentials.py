"""Credential modes in the grant (``credential: static`` and ``client_credentials``): the same
policy decision gates them as a minted token, and the response says truthfully what was issued.
The upstream credentials behind the interface are a recording stand-in here; the configured ones
(API keys, an upstream authorization server over HTTP) are tested in
tests/functional/test_credential_modes.py."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from sidecar.errors import (
    InvalidRequestError,
    InvalidScopeError,
    InvalidTargetError,
    TemporarilyUnavailableError,
)
from sidecar.exchange.credentials import API_KEY_TOKEN_TYPE, NOT_APPLICABLE, UpstreamCredential
from sidecar.exchange.grant import Granted, Refused, TokenExchangeGrant
from sidecar.exchange.policy import PolicySet
from sidecar.exchange.request import FormParams
from sidecar.keys.keyring import SigningKey
from tests.conftest import ACCESS_TOKEN_TYPE, CODE_SEARCH, JWT_TOKEN_TYPE, SIDECAR_ISSUER, TestIdP
from tests.unit.support import InMemoryIssuers, issuer_directory, new_policy, new_signing_key

VENDOR = "https://api.vendor.example/mcp"
SAAS = "https://tickets.saas.example/api"
KEY = "vendor-key-" + "k" * 24


@dataclass
class RecordingUpstreams:
    """Answers as configured and records every call (upstream, scopes, audience)."""

    credentials: dict[str, UpstreamCredential]
    calls: list[tuple[str, tuple[str, ...], str]] = field(default_factory=list)
    modes: list[str] = field(default_factory=list)
    failure: Exception | None = None

    def credential(
        self, upstream: str, scopes: tuple[str, ...], audience: str, mode: str
    ) -> UpstreamCredential:
        self.calls.append((upstream, scopes, audience))
        self.modes.append(mode)
        if self.failure is not None:
            raise self.failure
        return self.credentials[upstream]


@pytest.fixture
def upstreams() -> RecordingUpstreams:
    return RecordingUpstreams(
        {
            "vendor": UpstreamCredential(KEY, "Bearer", API_KEY_TOKEN_TYPE, None),
            "vendor-header": UpstreamCredential(
                KEY, NOT_APPLICABLE, API_KEY_TOKEN_TYPE, None, header="X-API-Key"
            ),
            "saas": UpstreamCredential("saas-token", "Bearer", ACCESS_TOKEN_TYPE, 45, "t.read"),
        }
    )


@pytest.fixture
def policies() -> PolicySet:
    return PolicySet(
        [
            new_policy(
                client_id="gateway",
                audience=CODE_SEARCH,
                scopes=["code.read"],
                default_scopes=["code.read"],
            ),
            new_policy(
                client_id="gateway",
                audience=VENDOR,
                scopes=["v.read", "v.write"],
                default_scopes=["v.read"],
                ttl=120,
                subject={"email_verified": {"equals": True}},
                credential="static",
                upstream="vendor",
            ),
            new_policy(
                client_id="gateway",
                audience=SAAS,
                scopes=["t.read", "t.write"],
                default_scopes=["t.read"],
                ttl=120,
                credential="client_credentials",
                upstream="saas",
            ),
        ]
    )


@pytest.fixture
def grant(idp: TestIdP, upstreams: RecordingUpstreams) -> TokenExchangeGrant:
    issuers: InMemoryIssuers = issuer_directory(idp)
    return TokenExchangeGrant(
        issuer=SIDECAR_ISSUER, max_ttl=300, leeway=30, issuers=issuers, upstreams=upstreams
    )


@pytest.fixture
def key() -> SigningKey:
    return new_signing_key(0.0)


def form(subject: str, audience: str | list[str], **params: str) -> FormParams:
    values = {
        "grant_type": ["urn:ietf:params:oauth:grant-type:token-exchange"],
        "subject_token": [subject],
        "subject_token_type": [ACCESS_TOKEN_TYPE],
        "audience": audience if isinstance(audience, list) else [audience],
    }
    values.update({name: [value] for name, value in params.items()})
    return FormParams(values)


def run(
    grant: TokenExchangeGrant, policies: PolicySet, key: SigningKey, params: FormParams
) -> Granted | Refused:
    return grant.exchange("gateway", params, policies=policies, signing_key=key, now=key.created_at)


def test_a_static_policy_hands_out_the_upstreams_key_for_the_policy_lifetime(
    grant: TokenExchangeGrant,
    policies: PolicySet,
    key: SigningKey,
    idp: TestIdP,
    upstreams: RecordingUpstreams,
) -> None:
    outcome = run(grant, policies, key, form(idp.token(email_verified=True), VENDOR))

    assert isinstance(outcome, Granted)
    assert outcome.response.as_dict() == {
        "access_token": KEY,
        "issued_token_type": API_KEY_TOKEN_TYPE,
        "token_type": "Bearer",
        "expires_in": 120,
        "scope": "v.read",
    }
    assert (outcome.jti, outcome.kid, outcome.credential, outcome.upstream) == (
        None,
        None,
        "static",
        "vendor",
    )
    assert upstreams.calls == [("vendor", ("v.read",), VENDOR)]
    assert upstreams.modes == ["static"]


def test_a_key_sent_in_a_header_of_its_own_is_not_applicable_as_a_bearer_token(
    grant: TokenExchangeGrant, key: SigningKey, idp: TestIdP
) -> None:
    policies = PolicySet(
        [
            new_policy(
                client_id="gateway",
                audience=VENDOR,
                scopes=["v.read"],
                default_scopes=["v.read"],
                credential="static",
                upstream="vendor-header",
            )
        ]
    )

    outcome = run(grant, policies, key, form(idp.token(), VENDOR))

    assert isinstance(outcome, Granted)
    body = outcome.response.as_dict()
    assert (body["token_type"], body["credential_header"]) == ("N_A", "X-API-Key")


def test_an_upstream_token_lives_no_longer_than_the_upstream_said(
    grant: TokenExchangeGrant, policies: PolicySet, key: SigningKey, idp: TestIdP
) -> None:
    outcome = run(grant, policies, key, form(idp.token(), SAAS))

    assert isinstance(outcome, Granted)
    assert outcome.response.expires_in == 45
    assert outcome.response.issued_token_type == ACCESS_TOKEN_TYPE
    assert outcome.response.scope == "t.read"  # as the upstream's server granted it


@pytest.mark.parametrize(
    ("claims", "params", "error"),
    [
        ({"email_verified": False}, {}, InvalidTargetError),  # a subject condition
        ({"email_verified": True}, {"scope": "v.admin"}, InvalidScopeError),
        ({"email_verified": True}, {"requested_token_type": JWT_TOKEN_TYPE}, InvalidRequestError),
    ],
    ids=["subject-condition", "scope", "requested-jwt"],
)
def test_a_refusal_never_asks_the_upstream_for_its_credential(
    grant: TokenExchangeGrant,
    policies: PolicySet,
    key: SigningKey,
    idp: TestIdP,
    upstreams: RecordingUpstreams,
    claims: dict[str, bool],
    params: dict[str, str],
    error: type[Exception],
) -> None:
    outcome = run(grant, policies, key, form(idp.token(**claims), VENDOR, **params))

    assert isinstance(outcome, Refused)
    assert type(outcome.error) is error
    assert upstreams.calls == []


def test_an_upstream_credential_is_never_issued_for_several_audiences_at_once(
    grant: TokenExchangeGrant,
    policies: PolicySet,
    key: SigningKey,
    idp: TestIdP,
    upstreams: RecordingUpstreams,
) -> None:
    outcome = run(grant, policies, key, form(idp.token(), [SAAS, CODE_SEARCH]))

    assert isinstance(outcome, Refused)
    assert type(outcome.error) is InvalidTargetError
    assert "alone" in outcome.error.reason
    assert upstreams.calls == []


def test_an_upstream_failure_is_the_refusal(
    grant: TokenExchangeGrant,
    policies: PolicySet,
    key: SigningKey,
    idp: TestIdP,
    upstreams: RecordingUpstreams,
) -> None:
    upstreams.failure = TemporarilyUnavailableError(reason="upstream saas: timed out")

    outcome = run(grant, policies, key, form(idp.token(), SAAS))

    assert isinstance(outcome, Refused)
    assert outcome.error is upstreams.failure


def test_an_upstream_token_already_expired_is_refused_as_unavailable(
    grant: TokenExchangeGrant,
    policies: PolicySet,
    key: SigningKey,
    idp: TestIdP,
    upstreams: RecordingUpstreams,
) -> None:
    upstreams.credentials["saas"] = UpstreamCredential("t", "Bearer", ACCESS_TOKEN_TYPE, 0)

    outcome = run(grant, policies, key, form(idp.token(), SAAS))

    assert isinstance(outcome, Refused)
    assert type(outcome.error) is TemporarilyUnavailableError


def test_without_configured_upstreams_a_static_policy_refuses(
    idp: TestIdP, policies: PolicySet, key: SigningKey
) -> None:
    bare = TokenExchangeGrant(
        issuer=SIDECAR_ISSUER, max_ttl=300, leeway=30, issuers=issuer_directory(idp)
    )

    outcome = run(bare, policies, key, form(idp.token(email_verified=True), VENDOR))

    assert isinstance(outcome, Refused)
    assert type(outcome.error) is InvalidTargetError


def test_a_mint_policy_still_mints_beside_upstream_credentials(
    grant: TokenExchangeGrant,
    policies: PolicySet,
    key: SigningKey,
    idp: TestIdP,
    upstreams: RecordingUpstreams,
) -> None:
    outcome = run(grant, policies, key, form(idp.token(), CODE_SEARCH))

    assert isinstance(outcome, Granted)
    assert outcome.credential == "mint"
    assert outcome.jti is not None
    assert "credential_header" not in outcome.response.as_dict()
    assert upstreams.calls == []


def test_an_upstream_credentials_repr_never_shows_the_secret() -> None:
    assert KEY not in repr(UpstreamCredential(KEY, "Bearer", API_KEY_TOKEN_TYPE, None))
