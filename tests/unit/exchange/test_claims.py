"""The minted token's claims: RFC 9068 §2.2 and the RFC 8693 §4.1 ``act`` chain."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from sidecar.errors import InvalidRequestError
from sidecar.exchange.claims import MAX_ACT_DEPTH, RESERVED_CLAIMS, build_claims, check_may_act
from sidecar.exchange.policy import Decision
from sidecar.exchange.subject import VerifiedToken

NOW = 1_700_000_000
ISSUER = "https://sidecar.test.example"
IDP = "https://idp.test.example"
CODE = "https://code-search.internal/mcp"
TICKETS = "https://tickets.internal/mcp"


def token(sub: str = "alice@example.com", iss: str = IDP, **extra: Any) -> VerifiedToken:
    claims = {"iss": iss, "sub": sub, "aud": "https://gateway.test.example", "exp": NOW + 600}
    claims.update(extra)
    return VerifiedToken(
        issuer=iss,
        subject=sub,
        claims=claims,
        scopes=frozenset(),
        expires_at=NOW + 600,
        fingerprint="0123456789abcdef",
    )


def decision(
    audiences: tuple[str, ...] = (CODE,),
    scopes: tuple[str, ...] = ("code.read", "code.search"),
    lifetime: int = 120,
    copy_claims: tuple[str, ...] = (),
) -> Decision:
    return Decision(
        audiences=audiences,
        scopes=scopes,
        lifetime=lifetime,
        copy_claims=copy_claims,
        policies=(),
    )


def build(
    subject: VerifiedToken | None = None,
    actor: VerifiedToken | None = None,
    **decision_fields: Any,
) -> dict[str, Any]:
    return build_claims(
        issuer=ISSUER,
        client_id="gateway",
        subject=subject or token(),
        actor=actor,
        decision=decision(**decision_fields),
        now=NOW,
        jti="jti-123",
    )


def chain(depth: int) -> dict[str, Any]:
    """An ``act`` claim nested ``depth`` levels deep."""
    act: dict[str, Any] = {"sub": f"actor-{depth}"}
    for level in range(depth - 1, 0, -1):
        act = {"sub": f"actor-{level}", "act": act}
    return act


def test_rfc9068_claims_are_set() -> None:
    claims = build()

    assert claims == {
        "iss": ISSUER,
        "sub": "alice@example.com",
        "aud": CODE,
        "client_id": "gateway",
        "scope": "code.read code.search",
        "iat": NOW,
        "exp": NOW + 120,
        "jti": "jti-123",
        "act": {"sub": "gateway"},
    }


def test_single_audience_is_a_string() -> None:
    assert build(audiences=(CODE,))["aud"] == CODE


def test_several_audiences_are_a_list_in_order() -> None:
    assert build(audiences=(TICKETS, CODE))["aud"] == [TICKETS, CODE]


def test_scope_is_space_separated() -> None:
    assert build(scopes=("a", "b", "c"))["scope"] == "a b c"


def test_only_allow_listed_claims_are_copied() -> None:
    subject = token(email="alice@example.com", groups=["eng"], name="Alice", tenant="t1")

    claims = build(subject, copy_claims=("email", "groups"))

    assert claims["email"] == "alice@example.com"
    assert claims["groups"] == ["eng"]
    assert "name" not in claims
    assert "tenant" not in claims


def test_allow_listed_claim_absent_from_the_subject_is_not_invented() -> None:
    assert "email" not in build(token(), copy_claims=("email",))


def test_nothing_is_copied_without_an_allowlist() -> None:
    claims = build(token(email="alice@example.com", scope="admin", cnf={"jkt": "x"}))
    assert set(claims) == {"iss", "sub", "aud", "client_id", "scope", "iat", "exp", "jti", "act"}


def test_copied_claims_never_override_the_sidecars_own() -> None:
    # Even if a reserved name reached the allowlist, the sidecar's values win.
    subject = token(iss=IDP, aud="https://gateway.test.example", scope="everything")
    claims = build(subject, copy_claims=("iss", "aud", "scope", "exp", "act"))

    assert claims["iss"] == ISSUER
    assert claims["aud"] == CODE
    assert claims["scope"] == "code.read code.search"
    assert claims["exp"] == NOW + 120
    assert claims["act"] == {"sub": "gateway"}


def test_reserved_claims_include_the_authority_bearing_ones() -> None:
    expected = {"iss", "sub", "aud", "exp", "iat", "nbf", "jti", "scope", "scp", "client_id"}
    assert expected | {"act", "may_act", "cnf"} <= RESERVED_CLAIMS


# --- act ----------------------------------------------------------------------------------------


def test_act_names_the_client_when_there_is_no_actor_token() -> None:
    assert build()["act"] == {"sub": "gateway"}


def test_act_names_the_actor_tokens_subject_and_issuer() -> None:
    actor = token(sub="agent-7", iss="https://agents.test.example")
    assert build(actor=actor)["act"] == {"sub": "agent-7", "iss": "https://agents.test.example"}


def test_prior_act_chain_is_nested_inside_the_new_actor() -> None:
    subject = token(act={"sub": "first-hop", "iss": IDP, "act": {"sub": "origin"}})

    assert build(subject)["act"] == {
        "sub": "gateway",
        "act": {"sub": "first-hop", "iss": IDP, "act": {"sub": "origin"}},
    }


def test_prior_act_chain_is_sanitised_to_identity_members() -> None:
    subject = token(
        act={
            "sub": "first-hop",
            "client_id": "svc",
            "scope": "admin",
            "roles": ["root"],
            "iss": 42,  # not a string: dropped
            "act": {"sub": "origin", "exp": 1, "may_act": {"sub": "x"}},
        }
    )

    assert build(subject)["act"] == {
        "sub": "gateway",
        "act": {"sub": "first-hop", "client_id": "svc", "act": {"sub": "origin"}},
    }


def test_act_chain_up_to_the_depth_cap_is_accepted() -> None:
    # The new actor is level 1; the subject's chain fills the levels below it.
    act = build(token(act=chain(MAX_ACT_DEPTH - 1)))["act"]

    depth = 0
    node: Mapping[str, Any] | None = act
    while node is not None:
        depth += 1
        node = node.get("act")
    assert depth == MAX_ACT_DEPTH


def test_act_chain_beyond_the_depth_cap_is_invalid_request() -> None:
    with pytest.raises(InvalidRequestError) as caught:
        build(token(act=chain(MAX_ACT_DEPTH)))
    assert caught.value.error == "invalid_request"
    assert "too deep" in caught.value.reason


@pytest.mark.parametrize(
    "act",
    [
        "gateway",
        ["gateway"],
        {},
        {"sub": 7},
        {"iss": IDP},
        {"sub": "first-hop", "act": "origin"},
        {"sub": "first-hop", "act": {"client_id": "no-sub"}},
        None,
    ],
)
def test_malformed_act_is_invalid_request(act: Any) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        build(token(act=act))
    assert caught.value.error == "invalid_request"


# --- may_act ------------------------------------------------------------------------------------


def test_without_may_act_any_actor_is_allowed() -> None:
    check_may_act(token(), token(sub="agent-7"))


def test_may_act_naming_the_actor_allows_it() -> None:
    subject = token(may_act={"sub": "agent-7"})
    check_may_act(subject, token(sub="agent-7"))


def test_may_act_naming_the_actor_and_its_issuer_allows_it() -> None:
    subject = token(may_act={"sub": "agent-7", "iss": "https://agents.test.example"})
    check_may_act(subject, token(sub="agent-7", iss="https://agents.test.example"))


def test_may_act_naming_another_party_refuses_the_actor() -> None:
    subject = token(may_act={"sub": "agent-7"})
    with pytest.raises(InvalidRequestError) as caught:
        check_may_act(subject, token(sub="agent-8"))
    assert caught.value.error == "invalid_request"


def test_may_act_with_another_issuer_refuses_the_actor() -> None:
    subject = token(may_act={"sub": "agent-7", "iss": "https://agents.test.example"})
    with pytest.raises(InvalidRequestError):
        check_may_act(subject, token(sub="agent-7", iss=IDP))


@pytest.mark.parametrize("may_act", ["agent-7", ["agent-7"], 1, {}])
def test_malformed_may_act_refuses_the_actor(may_act: Any) -> None:
    with pytest.raises(InvalidRequestError):
        check_may_act(token(may_act=may_act), token(sub="agent-7"))
