"""The token-exchange grant end to end (``sidecar/exchange/grant.py``), with no database and no
server: an in-memory issuer directory over the test IdP's keys, a policy set built in memory, a
signing key generated here and a fixed ``now``. Everything is asserted through the outcome of
``TokenExchangeGrant.exchange`` (``Granted`` or ``Refused``) and through ``evaluate`` alone.

- RFC 8693 §2.1 (the request), §2.2.1 (the response), §2.2.2 (errors: ``invalid_request`` for
  an invalid subject or actor token, ``invalid_target`` for a target no policy allows), §4.1
  (``act``), §4.4 (``may_act``);
- RFC 9068 §2.2 (the minted JWT access token's claims) and §4 (validation by the upstream);
- RFC 6749 §3.3 / §5.2 (``invalid_scope``).

A note on time: ``exchange(now=...)`` governs the policy decision and the minted claims, but the
subject token's ``exp``/``nbf``/``iat`` are checked by PyJWT against the wall clock (see
``sidecar/exchange/subject.py``). So ``now`` is fixed at the start of each test from the wall
clock, and subject tokens are issued around it.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jwt
import pytest

from sidecar.errors import (
    InvalidRequestError,
    InvalidScopeError,
    InvalidTargetError,
    ProtocolError,
)
from sidecar.exchange.caches import MintedTokenCache, SubjectTokenCache
from sidecar.exchange.grant import Facts, Granted, JtiSource, Refused, TokenExchangeGrant
from sidecar.exchange.policy import Decision, Policy, PolicySet
from sidecar.exchange.request import FormParams
from sidecar.exchange.subject import VerifiedToken, token_fingerprint
from sidecar.keys.keyring import SigningKey
from tests.conftest import (
    ACCESS_TOKEN_TYPE,
    CODE_SEARCH,
    JWT_TOKEN_TYPE,
    SIDECAR_ISSUER,
    TICKETS,
    TestIdP,
)
from tests.unit.support import (
    InMemoryIssuers,
    issuer_directory,
    new_policy,
    new_signing_key,
)

REPO = Path(__file__).resolve().parents[3]
WIKI = "https://wiki.internal/mcp"
DISABLED = "https://disabled.internal/mcp"
MAX_TTL = 300
LEEWAY = 30
CLIENT = "gateway"
ALICE = "alice@example.com"


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture
def now() -> float:
    """The fixed time of the test (whole seconds, taken once from the wall clock: see above)."""
    return float(int(time.time()))


@pytest.fixture
def issuers(idp: TestIdP) -> InMemoryIssuers:
    return issuer_directory(idp)


@pytest.fixture
def key(now: float) -> SigningKey:
    return new_signing_key(now)


@pytest.fixture
def code_search() -> Policy:
    return new_policy(
        client_id=CLIENT,
        audience=CODE_SEARCH,
        scopes=["code.read", "code.search"],
        default_scopes=["code.read"],
        ttl=120,
        copy_claims=["email"],
    )


@pytest.fixture
def policies(code_search: Policy) -> PolicySet:
    return PolicySet(
        [
            code_search,
            new_policy(
                client_id=CLIENT,
                audience=TICKETS,
                scopes=["tickets.read"],
                default_scopes=["tickets.read"],
                ttl=60,
                require_subject_scopes=True,
            ),
            new_policy(
                client_id=CLIENT,
                audience=WIKI,
                scopes=["code.read", "wiki.read"],
                default_scopes=["code.read"],
                ttl=90,
                copy_claims=["email"],
            ),
            new_policy(client_id=CLIENT, audience=DISABLED, scopes=["code.read"], enabled=False),
            new_policy(
                client_id="other",
                audience=TICKETS,
                scopes=["tickets.read"],
                default_scopes=["tickets.read"],
            ),
        ]
    )


def make_grant(issuers: InMemoryIssuers, **overrides: Any) -> TokenExchangeGrant:
    fields: dict[str, Any] = {
        "issuer": SIDECAR_ISSUER,
        "max_ttl": MAX_TTL,
        "leeway": LEEWAY,
        "issuers": issuers,
    }
    fields.update(overrides)
    return TokenExchangeGrant(**fields)


@pytest.fixture
def grant(issuers: InMemoryIssuers) -> TokenExchangeGrant:
    """The grant as services.py builds it, with a minted-token cache (reuse at half life)."""
    return make_grant(issuers, minted_cache=MintedTokenCache(100, min_remaining=0.5))


def subject_token(idp: TestIdP, now: float, **claims: Any) -> str:
    """A subject token of the test IdP issued at ``now``, valid ten minutes."""
    defaults: dict[str, Any] = {"iat": int(now), "exp": int(now) + 600}
    return idp.token(**{**defaults, **claims})


def form(subject: str | None, **params: str | list[str] | None) -> FormParams:
    """A token-exchange form as ``parse_form`` gives it: each value a list; None drops one."""
    values: dict[str, Any] = {
        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
        "subject_token": subject,
        "subject_token_type": ACCESS_TOKEN_TYPE,
        "audience": CODE_SEARCH,
    }
    values.update(params)
    return FormParams(
        {
            name: value if isinstance(value, list) else [value]
            for name, value in values.items()
            if value is not None
        }
    )


def exchange(
    grant: TokenExchangeGrant,
    params: FormParams,
    *,
    policies: PolicySet,
    key: SigningKey,
    now: float,
    client_id: str = CLIENT,
) -> Granted | Refused:
    return grant.exchange(client_id, params, policies=policies, signing_key=key, now=now)


def granted(outcome: Granted | Refused) -> Granted:
    assert isinstance(outcome, Granted), f"refused: {getattr(outcome, 'error', None)!r}"
    return outcome


def refused(outcome: Granted | Refused, error: type[ProtocolError]) -> Refused:
    assert isinstance(outcome, Refused), "expected a refusal, got a grant"
    assert type(outcome.error) is error, outcome.error.reason
    return outcome


def verify_minted(
    token: str, key: SigningKey, audience: str = CODE_SEARCH, leeway: int = 0
) -> dict[str, Any]:
    """What an upstream does (RFC 9068 §4): the one algorithm of our key, our issuer, its own
    identifier as audience, and the RFC 9068 §2.2 claims required. (On the wall clock: a token
    minted at a ``now`` ahead of it needs ``leeway``.)"""
    claims: dict[str, Any] = jwt.decode(
        token,
        jwt.PyJWK(key.public_jwk).key,
        algorithms=[key.algorithm],
        issuer=SIDECAR_ISSUER,
        audience=audience,
        leeway=leeway,
        options={"require": ["iss", "exp", "aud", "sub", "client_id", "iat", "jti"]},
    )
    return claims


# --- granted: the token and the response --------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["ES256", "EdDSA"])
def test_a_grant_is_a_jwt_that_verifies_with_the_signing_key(
    idp: TestIdP,
    issuers: InMemoryIssuers,
    policies: PolicySet,
    now: float,
    algorithm: str,
) -> None:
    key = new_signing_key(now, algorithm)
    outcome = granted(
        exchange(
            make_grant(issuers), form(subject_token(idp, now)), policies=policies, key=key, now=now
        )
    )

    token = outcome.response.access_token
    verify_minted(token, key)  # raises unless signature, alg, iss and aud all check out
    header = jwt.get_unverified_header(token)
    assert header == {"alg": algorithm, "kid": key.kid, "typ": "at+jwt"}  # RFC 9068 §2.1
    assert outcome.kid == key.kid


def test_a_minted_token_does_not_verify_for_another_audience(
    idp: TestIdP, grant: TokenExchangeGrant, policies: PolicySet, key: SigningKey, now: float
) -> None:
    outcome = granted(
        exchange(grant, form(subject_token(idp, now)), policies=policies, key=key, now=now)
    )

    with pytest.raises(jwt.InvalidAudienceError):
        verify_minted(outcome.response.access_token, key, audience=TICKETS)


def test_the_minted_token_carries_the_rfc9068_claims(
    idp: TestIdP, grant: TokenExchangeGrant, policies: PolicySet, key: SigningKey, now: float
) -> None:
    outcome = granted(
        exchange(grant, form(subject_token(idp, now)), policies=policies, key=key, now=now)
    )

    claims = verify_minted(outcome.response.access_token, key)
    assert claims["iss"] == SIDECAR_ISSUER
    assert claims["sub"] == ALICE
    assert claims["aud"] == CODE_SEARCH  # one audience: a string
    assert claims["client_id"] == CLIENT
    assert claims["scope"] == "code.read"  # no scope requested: the policy's defaults
    assert claims["iat"] == int(now)
    assert claims["exp"] == int(now) + 120  # the policy's ttl
    assert claims["jti"] == outcome.jti
    assert outcome.expires_at == claims["exp"]


def test_without_an_actor_token_act_names_the_client(
    idp: TestIdP, grant: TokenExchangeGrant, policies: PolicySet, key: SigningKey, now: float
) -> None:
    outcome = granted(
        exchange(grant, form(subject_token(idp, now)), policies=policies, key=key, now=now)
    )

    assert verify_minted(outcome.response.access_token, key)["act"] == {"sub": CLIENT}


def test_an_actor_allowed_by_may_act_is_named_in_act_with_its_issuer(
    idp: TestIdP, grant: TokenExchangeGrant, policies: PolicySet, key: SigningKey, now: float
) -> None:
    subject = subject_token(idp, now, may_act={"sub": "agent-7", "iss": idp.issuer})
    actor = subject_token(idp, now, sub="agent-7")
    params = form(subject, actor_token=actor, actor_token_type=ACCESS_TOKEN_TYPE)

    outcome = granted(exchange(grant, params, policies=policies, key=key, now=now))

    claims = verify_minted(outcome.response.access_token, key)
    assert claims["sub"] == ALICE  # the subject stays the user (RFC 8693 §1.1, delegation)
    assert claims["act"] == {"sub": "agent-7", "iss": idp.issuer}
    assert outcome.facts.actor == "agent-7"


def test_a_prior_act_chain_of_the_subject_token_is_nested_inside_the_new_act(
    idp: TestIdP, grant: TokenExchangeGrant, policies: PolicySet, key: SigningKey, now: float
) -> None:
    subject = subject_token(idp, now, act={"sub": "upstream-svc", "iss": idp.issuer})

    outcome = granted(exchange(grant, form(subject), policies=policies, key=key, now=now))

    act = verify_minted(outcome.response.access_token, key)["act"]
    assert act == {"sub": CLIENT, "act": {"sub": "upstream-svc", "iss": idp.issuer}}


def test_the_response_is_the_rfc8693_success_response(
    idp: TestIdP, grant: TokenExchangeGrant, policies: PolicySet, key: SigningKey, now: float
) -> None:
    outcome = granted(
        exchange(grant, form(subject_token(idp, now)), policies=policies, key=key, now=now)
    )

    assert outcome.response.as_dict() == {
        "access_token": outcome.response.access_token,
        "issued_token_type": ACCESS_TOKEN_TYPE,
        "token_type": "Bearer",
        "expires_in": 120,
        "scope": "code.read",
    }


def test_the_requested_token_type_is_the_issued_token_type(
    idp: TestIdP, grant: TokenExchangeGrant, policies: PolicySet, key: SigningKey, now: float
) -> None:
    params = form(subject_token(idp, now), requested_token_type=JWT_TOKEN_TYPE)

    outcome = granted(exchange(grant, params, policies=policies, key=key, now=now))

    assert outcome.response.issued_token_type == JWT_TOKEN_TYPE


def test_requested_scopes_within_the_policy_are_granted(
    idp: TestIdP, grant: TokenExchangeGrant, policies: PolicySet, key: SigningKey, now: float
) -> None:
    params = form(subject_token(idp, now), scope="code.search code.read")

    outcome = granted(exchange(grant, params, policies=policies, key=key, now=now))

    assert outcome.response.scope == "code.read code.search"
    assert verify_minted(outcome.response.access_token, key)["scope"] == "code.read code.search"


def test_the_lifetime_never_exceeds_the_subject_tokens_remaining_lifetime(
    idp: TestIdP, grant: TokenExchangeGrant, policies: PolicySet, key: SigningKey, now: float
) -> None:
    subject = subject_token(idp, now, exp=int(now) + 50)  # the policy's ttl is 120

    outcome = granted(exchange(grant, form(subject), policies=policies, key=key, now=now))

    assert outcome.response.expires_in == 50
    assert verify_minted(outcome.response.access_token, key)["exp"] == int(now) + 50


def test_the_lifetime_never_exceeds_the_global_maximum(
    idp: TestIdP, issuers: InMemoryIssuers, policies: PolicySet, key: SigningKey, now: float
) -> None:
    grant = make_grant(issuers, max_ttl=30)

    outcome = granted(
        exchange(grant, form(subject_token(idp, now)), policies=policies, key=key, now=now)
    )

    assert outcome.response.expires_in == 30


def test_several_audiences_give_one_token_for_all_with_the_scopes_every_policy_allows(
    idp: TestIdP, grant: TokenExchangeGrant, policies: PolicySet, key: SigningKey, now: float
) -> None:
    params = form(subject_token(idp, now), audience=[CODE_SEARCH, WIKI])

    outcome = granted(exchange(grant, params, policies=policies, key=key, now=now))

    claims = verify_minted(outcome.response.access_token, key, audience=WIKI)
    assert claims["aud"] == [CODE_SEARCH, WIKI]
    assert claims["scope"] == "code.read"
    assert outcome.response.expires_in == 90  # the shorter of the two policies' ttl
    assert outcome.facts.audiences == (CODE_SEARCH, WIKI)


def test_only_the_policys_allow_listed_claims_are_copied_from_the_subject_token(
    idp: TestIdP, grant: TokenExchangeGrant, policies: PolicySet, key: SigningKey, now: float
) -> None:
    subject = subject_token(idp, now, email="alice@example.com", groups=["admins"])

    outcome = granted(exchange(grant, form(subject), policies=policies, key=key, now=now))

    claims = verify_minted(outcome.response.access_token, key)
    assert claims["email"] == "alice@example.com"
    assert "groups" not in claims


def test_a_grant_records_every_fact_of_the_request(
    idp: TestIdP, grant: TokenExchangeGrant, policies: PolicySet, key: SigningKey, now: float
) -> None:
    subject = subject_token(idp, now)

    outcome = granted(exchange(grant, form(subject), policies=policies, key=key, now=now))

    assert outcome.facts == Facts(
        audiences=(CODE_SEARCH,),
        subject=ALICE,
        subject_issuer=idp.issuer,
        subject_token_sha256=token_fingerprint(subject),
        actor=None,
    )
    assert outcome.reused is False


def test_each_new_grant_has_a_new_jti(
    idp: TestIdP, issuers: InMemoryIssuers, policies: PolicySet, key: SigningKey, now: float
) -> None:
    grant = make_grant(issuers)  # no minted-token cache
    params = form(subject_token(idp, now))

    jtis = {
        granted(exchange(grant, params, policies=policies, key=key, now=now)).jti for _ in range(5)
    }

    assert len(jtis) == 5


def test_jti_values_are_128_random_bits_in_base64url() -> None:
    source = JtiSource()

    values = [source() for _ in range(600)]  # more than one 4 KiB chunk

    assert len(set(values)) == len(values)
    assert all(len(value) == 22 and "=" not in value for value in values)  # 16 bytes, unpadded


# --- refused: the error class and the facts known by then --------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        {"subject_token_type": None},
        {"audience": None},
        {"subject_token_type": "urn:ietf:params:oauth:token-type:saml2"},
        {"actor_token": "a.b.c"},  # without actor_token_type
    ],
    ids=["no-subject-token-type", "no-target", "unsupported-token-type", "actor-without-type"],
)
def test_a_request_refused_at_parsing_is_invalid_request_and_knows_no_subject(
    idp: TestIdP,
    grant: TokenExchangeGrant,
    policies: PolicySet,
    key: SigningKey,
    now: float,
    params: dict[str, Any],
) -> None:
    outcome = exchange(
        grant, form(subject_token(idp, now), **params), policies=policies, key=key, now=now
    )

    assert refused(outcome, InvalidRequestError).facts == Facts()


def test_a_resource_with_a_fragment_is_invalid_target_at_parsing(
    idp: TestIdP, grant: TokenExchangeGrant, policies: PolicySet, key: SigningKey, now: float
) -> None:
    params = form(subject_token(idp, now), audience=None, resource="https://wiki.internal/#x")

    outcome = exchange(grant, params, policies=policies, key=key, now=now)

    assert refused(outcome, InvalidTargetError).facts == Facts()


def bad_subject_tokens(idp: TestIdP, now: float) -> dict[str, str]:
    good = subject_token(idp, now)
    header, payload, signature = good.split(".")
    return {
        "tampered-signature": f"{header}.{payload}.{signature[::-1]}",
        "not-a-jws": "not-a-token",
        "untrusted-issuer": subject_token(idp, now, iss="https://evil.example"),
        "unknown-kid": idp.token(kid="nobody", iat=int(now), exp=int(now) + 600),
        "wrong-audience": subject_token(idp, now, aud="https://someone-else.example"),
        "expired": subject_token(idp, now, iat=int(now) - 4000, exp=int(now) - 3600),
        "no-sub": idp.token(omit=("sub",), iat=int(now), exp=int(now) + 600),
        "id-token": subject_token(idp, now, nonce="n-0S6_WzA2Mj"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "tampered-signature",
        "not-a-jws",
        "untrusted-issuer",
        "unknown-kid",
        "wrong-audience",
        "expired",
        "no-sub",
        "id-token",
    ],
)
def test_a_bad_subject_token_is_invalid_request_and_only_the_targets_are_known(
    idp: TestIdP,
    grant: TokenExchangeGrant,
    policies: PolicySet,
    key: SigningKey,
    now: float,
    case: str,
) -> None:
    token = bad_subject_tokens(idp, now)[case]

    outcome = refused(
        exchange(grant, form(token), policies=policies, key=key, now=now), InvalidRequestError
    )

    assert outcome.facts == Facts(audiences=(CODE_SEARCH,))


def test_a_target_without_a_policy_is_invalid_target_and_the_subject_is_known(
    idp: TestIdP, grant: TokenExchangeGrant, policies: PolicySet, key: SigningKey, now: float
) -> None:
    subject = subject_token(idp, now)
    params = form(subject, audience="https://unknown.internal/mcp")

    outcome = refused(
        exchange(grant, params, policies=policies, key=key, now=now), InvalidTargetError
    )

    assert outcome.facts == Facts(
        audiences=("https://unknown.internal/mcp",),
        subject=ALICE,
        subject_issuer=idp.issuer,
        subject_token_sha256=token_fingerprint(subject),
    )
    assert outcome.error.reason == "no policy for the client and target"


def test_a_policy_of_another_client_does_not_apply(
    idp: TestIdP, grant: TokenExchangeGrant, policies: PolicySet, key: SigningKey, now: float
) -> None:
    params = form(subject_token(idp, now), audience=TICKETS)

    outcome = exchange(grant, params, policies=policies, key=key, now=now, client_id="intruder")

    refused(outcome, InvalidTargetError)


def test_a_disabled_policy_is_invalid_target(
    idp: TestIdP, grant: TokenExchangeGrant, policies: PolicySet, key: SigningKey, now: float
) -> None:
    params = form(subject_token(idp, now), audience=DISABLED)

    outcome = refused(
        exchange(grant, params, policies=policies, key=key, now=now), InvalidTargetError
    )

    assert "disabled" in outcome.error.reason


def test_one_target_without_a_policy_refuses_the_whole_request(
    idp: TestIdP, grant: TokenExchangeGrant, policies: PolicySet, key: SigningKey, now: float
) -> None:
    params = form(subject_token(idp, now), audience=[CODE_SEARCH, "https://unknown.internal/"])

    refused(exchange(grant, params, policies=policies, key=key, now=now), InvalidTargetError)


def test_a_scope_outside_the_policy_is_invalid_scope_and_the_subject_is_known(
    idp: TestIdP, grant: TokenExchangeGrant, policies: PolicySet, key: SigningKey, now: float
) -> None:
    params = form(subject_token(idp, now), scope="code.read code.write")

    outcome = refused(
        exchange(grant, params, policies=policies, key=key, now=now), InvalidScopeError
    )

    assert outcome.facts.subject == ALICE
    assert "code.write" in outcome.error.reason


def test_a_scope_the_subject_token_lacks_is_invalid_scope_when_the_policy_requires_it(
    idp: TestIdP, grant: TokenExchangeGrant, policies: PolicySet, key: SigningKey, now: float
) -> None:
    subject = subject_token(idp, now, scope="code.read")  # no tickets.read
    params = form(subject, audience=TICKETS, scope="tickets.read")

    refused(exchange(grant, params, policies=policies, key=key, now=now), InvalidScopeError)


def test_a_subject_token_expired_at_now_is_invalid_request_after_verification(
    idp: TestIdP, grant: TokenExchangeGrant, policies: PolicySet, key: SigningKey, now: float
) -> None:
    subject = subject_token(idp, now, exp=int(now) + 600)

    outcome = refused(
        exchange(grant, form(subject), policies=policies, key=key, now=now + 600),
        InvalidRequestError,
    )

    assert outcome.error.reason == "subject token has expired"
    assert outcome.facts.subject == ALICE  # verified (on the wall clock) before the decision


def test_an_actor_not_named_by_may_act_is_invalid_request_and_the_actor_is_known(
    idp: TestIdP, grant: TokenExchangeGrant, policies: PolicySet, key: SigningKey, now: float
) -> None:
    subject = subject_token(idp, now, may_act={"sub": "agent-7"})
    actor = subject_token(idp, now, sub="agent-9")
    params = form(subject, actor_token=actor, actor_token_type=ACCESS_TOKEN_TYPE)

    outcome = refused(
        exchange(grant, params, policies=policies, key=key, now=now), InvalidRequestError
    )

    assert outcome.error.reason == "actor not allowed by may_act"
    assert outcome.facts.subject == ALICE
    assert outcome.facts.actor == "agent-9"


def test_an_actor_of_another_issuer_than_may_act_names_is_invalid_request(
    idp: TestIdP, grant: TokenExchangeGrant, policies: PolicySet, key: SigningKey, now: float
) -> None:
    subject = subject_token(idp, now, may_act={"sub": "agent-7", "iss": "https://other.example"})
    actor = subject_token(idp, now, sub="agent-7")
    params = form(subject, actor_token=actor, actor_token_type=ACCESS_TOKEN_TYPE)

    outcome = exchange(grant, params, policies=policies, key=key, now=now)

    assert refused(outcome, InvalidRequestError).error.reason == "actor not allowed by may_act"


def test_an_invalid_actor_token_is_invalid_request_with_the_subject_known(
    idp: TestIdP, grant: TokenExchangeGrant, policies: PolicySet, key: SigningKey, now: float
) -> None:
    actor = subject_token(idp, now, sub="agent-7", aud="https://someone-else.example")
    params = form(subject_token(idp, now), actor_token=actor, actor_token_type=ACCESS_TOKEN_TYPE)

    outcome = refused(
        exchange(grant, params, policies=policies, key=key, now=now), InvalidRequestError
    )

    assert outcome.facts.subject == ALICE
    assert outcome.facts.actor is None
    assert outcome.error.reason.startswith("actor token")


def test_a_malformed_prior_act_chain_refuses_after_the_decision(
    idp: TestIdP, grant: TokenExchangeGrant, policies: PolicySet, key: SigningKey, now: float
) -> None:
    subject = subject_token(idp, now, act={"iss": idp.issuer})  # an act without sub

    outcome = refused(
        exchange(grant, form(subject), policies=policies, key=key, now=now), InvalidRequestError
    )

    assert outcome.facts.subject == ALICE


def test_a_refusal_never_describes_the_reason_to_the_client(
    idp: TestIdP, grant: TokenExchangeGrant, policies: PolicySet, key: SigningKey, now: float
) -> None:
    params = form(subject_token(idp, now), scope="code.read secret-scope-name")

    outcome = refused(
        exchange(grant, params, policies=policies, key=key, now=now), InvalidScopeError
    )

    assert "secret-scope-name" in outcome.error.reason
    assert "secret-scope-name" not in outcome.error.description


# --- the minted-token cache ----------------------------------------------------------------------


@dataclasses.dataclass
class Repeated:
    """One request (a subject token of the test IdP issued at ``now``), sent to the same grant
    as often as a test likes."""

    grant: TokenExchangeGrant
    params: FormParams
    key: SigningKey
    now: float

    def send(
        self, policies: PolicySet, *, later: float = 0, key: SigningKey | None = None
    ) -> Granted:
        """Granted, ``later`` seconds after ``now``, signed with ``key`` (else the test's)."""
        outcome = exchange(
            self.grant, self.params, policies=policies, key=key or self.key, now=self.now + later
        )
        return granted(outcome)


@pytest.fixture
def repeated(idp: TestIdP, grant: TokenExchangeGrant, key: SigningKey, now: float) -> Repeated:
    return Repeated(grant, form(subject_token(idp, now)), key, now)


def test_an_identical_request_reuses_the_minted_token_while_fresh(
    repeated: Repeated, policies: PolicySet
) -> None:
    first = repeated.send(policies)

    second = repeated.send(policies, later=10)

    assert second.reused is True
    assert second.jti == first.jti
    assert second.response.access_token == first.response.access_token
    assert second.expires_at == first.expires_at
    assert second.response.expires_in == 110  # what is left of it, not the full ttl


def test_no_reuse_once_the_policy_object_changes_even_with_equal_values(
    repeated: Repeated, policies: PolicySet, code_search: Policy
) -> None:
    first = repeated.send(policies)
    # A reload that read a new version of the policy: a new object, equal in value.
    reloaded = dataclasses.replace(code_search)
    assert reloaded == code_search
    changed = PolicySet([reloaded if p is code_search else p for p in policies])

    second = repeated.send(changed, later=10)

    assert second.reused is False
    assert second.jti != first.jti


def test_a_change_to_an_unrelated_policy_does_not_stop_reuse(
    repeated: Repeated, policies: PolicySet, code_search: Policy
) -> None:
    first = repeated.send(policies)
    changed = PolicySet(
        [p if p is code_search else dataclasses.replace(p, ttl=30) for p in policies]
    )

    second = repeated.send(changed, later=10)

    assert (second.reused, second.jti) == (True, first.jti)


def test_a_policy_that_forbids_reuse_mints_every_time(
    repeated: Repeated, code_search: Policy
) -> None:
    policies = PolicySet([dataclasses.replace(code_search, reuse_tokens=False)])
    first = repeated.send(policies)

    second = repeated.send(policies, later=10)

    assert second.reused is False
    assert second.jti != first.jti


def test_no_reuse_after_the_signing_key_changes(
    repeated: Repeated, policies: PolicySet, now: float
) -> None:
    repeated.send(policies)
    rotated = new_signing_key(now)

    second = repeated.send(policies, later=10, key=rotated)

    assert second.reused is False
    assert second.kid == rotated.kid
    verify_minted(second.response.access_token, rotated, leeway=10)


def test_no_reuse_once_less_than_min_remaining_of_the_lifetime_is_left(
    repeated: Repeated, policies: PolicySet
) -> None:
    first = repeated.send(policies)

    at_half = repeated.send(policies, later=60)
    past_half = repeated.send(policies, later=61)

    assert (at_half.reused, at_half.jti) == (True, first.jti)  # 60 of 120 s left: still half
    assert past_half.reused is False


def test_a_different_request_is_never_answered_from_the_cache(
    idp: TestIdP, grant: TokenExchangeGrant, policies: PolicySet, key: SigningKey, now: float
) -> None:
    subject = subject_token(idp, now)
    granted(exchange(grant, form(subject), policies=policies, key=key, now=now))

    other_scope = form(subject, scope="code.read code.search")
    other_client = form(subject, audience=TICKETS)
    with_scope = granted(exchange(grant, other_scope, policies=policies, key=key, now=now))
    by_other = exchange(grant, other_client, policies=policies, key=key, now=now, client_id="other")

    assert with_scope.reused is False
    assert granted(by_other).reused is False


def test_a_verified_subject_token_is_taken_from_the_subject_cache(
    idp: TestIdP, issuers: InMemoryIssuers, policies: PolicySet, key: SigningKey, now: float
) -> None:
    cache = SubjectTokenCache(issuers, max_entries=10)
    grant = make_grant(issuers, subject_cache=cache)
    params = form(subject_token(idp, now))

    granted(exchange(grant, params, policies=policies, key=key, now=now))
    granted(exchange(grant, params, policies=policies, key=key, now=now + 1))

    assert (cache.stats.hits, cache.stats.misses) == (1, 1)


def test_a_cached_subject_token_is_refused_once_its_issuer_drops_the_key(
    idp: TestIdP, issuers: InMemoryIssuers, policies: PolicySet, key: SigningKey, now: float
) -> None:
    grant = make_grant(issuers, subject_cache=SubjectTokenCache(issuers, max_entries=10))
    params = form(subject_token(idp, now))  # signed with rsa-1
    granted(exchange(grant, params, policies=policies, key=key, now=now))

    trusted = issuers.find_issuer(idp.issuer)
    assert trusted is not None
    del trusted.keys["rsa-1"]

    refused(exchange(grant, params, policies=policies, key=key, now=now + 1), InvalidRequestError)


# --- evaluate(), the decision alone (shared with `sidecar policy explain`) ----------------------


def verified(subject: str = ALICE, now: float = 0.0, **claims: Any) -> VerifiedToken:
    """A token as verification returns it: no signature involved."""
    all_claims = {"iss": TestIdP.issuer, "sub": subject, "exp": int(now) + 600, **claims}
    return VerifiedToken(
        issuer=TestIdP.issuer,
        subject=subject,
        claims=all_claims,
        scopes=frozenset(str(all_claims.get("scope", "")).split()),
        expires_at=int(now) + 600,
        fingerprint="0123456789abcdef",
    )


def test_evaluate_decides_over_an_already_verified_subject(
    issuers: InMemoryIssuers, policies: PolicySet, code_search: Policy, now: float
) -> None:
    grant = make_grant(issuers)

    decision = grant.evaluate(
        CLIENT, (CODE_SEARCH,), None, verified(now=now), None, policies=policies, now=int(now)
    )

    assert decision == Decision(
        audiences=(CODE_SEARCH,),
        scopes=("code.read",),
        lifetime=120,
        copy_claims=("email",),
        policies=(code_search,),
    )


def test_evaluate_caps_the_lifetime_at_the_max_ttl_and_the_subjects_expiry(
    issuers: InMemoryIssuers, policies: PolicySet, now: float
) -> None:
    subject = verified(now=now)

    short = make_grant(issuers, max_ttl=45).evaluate(
        CLIENT, (CODE_SEARCH,), None, subject, None, policies=policies, now=int(now)
    )
    late = make_grant(issuers).evaluate(
        CLIENT, (CODE_SEARCH,), None, subject, None, policies=policies, now=int(now) + 590
    )

    assert (short.lifetime, late.lifetime) == (45, 10)


def test_evaluate_refuses_a_target_without_a_policy(
    issuers: InMemoryIssuers, policies: PolicySet, now: float
) -> None:
    with pytest.raises(InvalidTargetError):
        make_grant(issuers).evaluate(
            CLIENT,
            ("https://nowhere/",),
            None,
            verified(now=now),
            None,
            policies=policies,
            now=int(now),
        )


def test_evaluate_refuses_a_scope_outside_the_policy(
    issuers: InMemoryIssuers, policies: PolicySet, now: float
) -> None:
    with pytest.raises(InvalidScopeError):
        make_grant(issuers).evaluate(
            CLIENT,
            (CODE_SEARCH,),
            ("admin",),
            verified(now=now),
            None,
            policies=policies,
            now=int(now),
        )


def test_evaluate_checks_may_act_before_any_policy(issuers: InMemoryIssuers, now: float) -> None:
    subject = verified(now=now, may_act={"sub": "agent-7"})

    with pytest.raises(InvalidRequestError) as raised:
        # No policy at all: the actor check comes first.
        make_grant(issuers).evaluate(
            CLIENT,
            (CODE_SEARCH,),
            None,
            subject,
            verified("agent-9", now=now),
            policies=PolicySet([]),
            now=int(now),
        )

    assert raised.value.reason == "actor not allowed by may_act"


def test_evaluate_and_exchange_agree(
    idp: TestIdP, grant: TokenExchangeGrant, policies: PolicySet, key: SigningKey, now: float
) -> None:
    subject = subject_token(idp, now)
    params = form(subject, audience=[CODE_SEARCH, WIKI], scope="code.read")

    outcome = granted(exchange(grant, params, policies=policies, key=key, now=now))
    decision = grant.evaluate(
        CLIENT,
        (CODE_SEARCH, WIKI),
        ("code.read",),
        grant.verify(subject, now)[0],
        None,
        policies=policies,
        now=int(now),
    )

    assert outcome.response.expires_in == decision.lifetime
    assert outcome.response.scope == " ".join(decision.scopes)


# --- the protocol core loads no I/O library -----------------------------------------------------

IO_LIBRARIES = (
    "sqlalchemy",
    "flask",
    "werkzeug",
    "granian",
    "gunicorn",
    "requests",
    "psycopg",
    "yaml",
    "pydantic",
)


def test_importing_the_grant_loads_no_database_web_or_config_library() -> None:
    """docs/architecture.md: ``sidecar.exchange`` is plain functions over plain data. Checked in a
    fresh interpreter, since this test process has every library loaded already."""
    code = (
        "import sys, sidecar.exchange.grant; "
        "print(sorted(m for m in sys.modules "
        f"if m.split('.')[0] in {set(IO_LIBRARIES)!r}))"
    )

    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )

    assert result.stdout.strip() == "[]"
