"""The policy decision: which targets, which scopes, how long (docs/design.md §2 steps 3 and 4)."""

from __future__ import annotations

import pytest

from sidecar.errors import InvalidRequestError, InvalidScopeError, InvalidTargetError
from sidecar.exchange.policy import Decision, Policy, PolicySet, decide
from sidecar.exchange.subject import VerifiedToken
from tests.unit.support import gateway_policy

NOW = 1_700_000_000
CODE = "https://code-search.internal/mcp"
TICKETS = "https://tickets.internal/mcp"
WIKI = "https://wiki.internal/mcp"


def subject(*, scopes: tuple[str, ...] = ("code.read",), expires_in: int = 3600) -> VerifiedToken:
    return VerifiedToken(
        issuer="https://idp.test.example",
        subject="alice@example.com",
        claims={"sub": "alice@example.com", "exp": NOW + expires_in},
        scopes=frozenset(scopes),
        expires_at=NOW + expires_in,
        fingerprint="0123456789abcdef",
    )


def run(
    *policies: Policy,
    targets: tuple[str, ...] = (CODE,),
    scopes: tuple[str, ...] | None = None,
    token: VerifiedToken | None = None,
    client_id: str = "gateway",
    max_ttl: int = 300,
) -> Decision:
    return decide(
        client_id,
        targets,
        scopes,
        token or subject(),
        PolicySet(policies),
        max_ttl=max_ttl,
        now=NOW,
    )


# --- targets ------------------------------------------------------------------------------------


def test_allowed_target_gets_a_decision() -> None:
    decision = run(gateway_policy())

    assert decision.audiences == (CODE,)
    assert decision.scopes == ("code.read",)
    assert decision.lifetime == 120
    assert decision.policies == (gateway_policy(),)


def test_no_policy_for_the_target_is_invalid_target() -> None:
    with pytest.raises(InvalidTargetError) as caught:
        run(gateway_policy(), targets=(WIKI,))
    assert caught.value.error == "invalid_target"


def test_no_policy_for_the_client_is_invalid_target() -> None:
    with pytest.raises(InvalidTargetError):
        run(gateway_policy(), client_id="other-gateway")


def test_no_policies_at_all_is_invalid_target() -> None:
    with pytest.raises(InvalidTargetError):
        run()


def test_disabled_policy_is_invalid_target() -> None:
    with pytest.raises(InvalidTargetError) as caught:
        run(gateway_policy(enabled=False))
    assert caught.value.error == "invalid_target"
    assert "disabled" in caught.value.reason


def test_target_must_match_exactly() -> None:
    for near_miss in (CODE + "/", CODE.upper(), CODE.removesuffix("/mcp")):
        with pytest.raises(InvalidTargetError):
            run(gateway_policy(), targets=(near_miss,))


def test_one_forbidden_target_refuses_the_whole_request() -> None:
    with pytest.raises(InvalidTargetError):
        run(gateway_policy(CODE), targets=(CODE, WIKI))


def test_one_disabled_target_refuses_the_whole_request() -> None:
    with pytest.raises(InvalidTargetError):
        run(gateway_policy(CODE), gateway_policy(TICKETS, enabled=False), targets=(CODE, TICKETS))


def test_several_allowed_targets_are_all_audiences() -> None:
    decision = run(gateway_policy(CODE), gateway_policy(TICKETS), targets=(CODE, TICKETS))
    assert decision.audiences == (CODE, TICKETS)


def test_policy_set_finds_by_client_and_audience() -> None:
    policies = PolicySet([gateway_policy(CODE), gateway_policy(TICKETS, client_id="other")])

    assert len(policies) == 2
    assert policies.find("gateway", CODE) == gateway_policy(CODE)
    assert policies.find("other", TICKETS) is not None
    assert policies.find("gateway", TICKETS) is None
    assert {p.audience for p in policies} == {CODE, TICKETS}


# --- scopes -------------------------------------------------------------------------------------


def test_requested_scopes_within_the_policy_are_granted() -> None:
    decision = run(gateway_policy(), scopes=("code.search", "code.read"))
    assert decision.scopes == ("code.read", "code.search")


def test_requested_scope_outside_the_policy_is_invalid_scope() -> None:
    with pytest.raises(InvalidScopeError) as caught:
        run(gateway_policy(), scopes=("code.read", "code.write"))
    assert caught.value.error == "invalid_scope"


def test_requested_scopes_may_exceed_the_defaults_but_not_the_policy() -> None:
    assert run(gateway_policy(), scopes=("code.search",)).scopes == ("code.search",)


def test_no_scope_requested_grants_the_policy_defaults() -> None:
    decision = run(gateway_policy(default_scopes={"code.read", "code.search"}))
    assert decision.scopes == ("code.read", "code.search")


def test_no_scope_requested_and_no_defaults_is_invalid_scope() -> None:
    with pytest.raises(InvalidScopeError) as caught:
        run(gateway_policy(default_scopes=set()))
    assert caught.value.error == "invalid_scope"


def test_require_subject_scopes_refuses_a_scope_the_subject_lacks() -> None:
    strict = gateway_policy(require_subject_scopes=True)
    token = subject(scopes=("code.read",))

    assert run(strict, scopes=("code.read",), token=token).scopes == ("code.read",)
    with pytest.raises(InvalidScopeError):
        run(strict, scopes=("code.read", "code.search"), token=token)


def test_require_subject_scopes_narrows_the_defaults_to_the_subjects_scopes() -> None:
    strict = gateway_policy(
        default_scopes={"code.read", "code.search"}, require_subject_scopes=True
    )
    decision = run(strict, token=subject(scopes=("code.search", "unrelated")))
    assert decision.scopes == ("code.search",)


def test_require_subject_scopes_with_no_overlap_is_invalid_scope() -> None:
    strict = gateway_policy(require_subject_scopes=True)
    with pytest.raises(InvalidScopeError):
        run(strict, token=subject(scopes=("tickets.read",)))


def test_subject_scopes_do_not_matter_without_require_subject_scopes() -> None:
    decision = run(gateway_policy(), scopes=("code.search",), token=subject(scopes=()))
    assert decision.scopes == ("code.search",)


def test_scopes_of_several_targets_are_intersected() -> None:
    code = gateway_policy(CODE, scopes={"code.read", "shared.read"}, default_scopes={"shared.read"})
    tickets = gateway_policy(
        TICKETS, scopes={"tickets.read", "shared.read"}, default_scopes={"shared.read"}
    )

    assert run(code, tickets, targets=(CODE, TICKETS)).scopes == ("shared.read",)
    assert run(code, tickets, targets=(CODE, TICKETS), scopes=("shared.read",)).scopes == (
        "shared.read",
    )
    with pytest.raises(InvalidScopeError):
        # Allowed by one target's policy, not the other's.
        run(code, tickets, targets=(CODE, TICKETS), scopes=("code.read",))


def test_defaults_of_several_targets_are_intersected() -> None:
    code = gateway_policy(CODE, scopes={"a", "b"}, default_scopes={"a", "b"})
    tickets = gateway_policy(TICKETS, scopes={"a", "b"}, default_scopes={"b"})
    assert run(code, tickets, targets=(CODE, TICKETS)).scopes == ("b",)


def test_disjoint_defaults_of_several_targets_are_invalid_scope() -> None:
    code = gateway_policy(CODE, scopes={"a"}, default_scopes={"a"})
    tickets = gateway_policy(TICKETS, scopes={"b"}, default_scopes={"b"})
    with pytest.raises(InvalidScopeError):
        run(code, tickets, targets=(CODE, TICKETS))


def test_require_subject_scopes_of_any_target_applies_to_the_request() -> None:
    code = gateway_policy(CODE, scopes={"s"}, default_scopes={"s"})
    tickets = gateway_policy(
        TICKETS, scopes={"s"}, default_scopes={"s"}, require_subject_scopes=True
    )
    with pytest.raises(InvalidScopeError):
        run(code, tickets, targets=(CODE, TICKETS), scopes=("s",), token=subject(scopes=()))


# --- lifetime -----------------------------------------------------------------------------------


def test_lifetime_is_the_policy_ttl_when_it_is_the_smallest() -> None:
    assert run(gateway_policy(ttl=90), max_ttl=300, token=subject(expires_in=3600)).lifetime == 90


def test_lifetime_is_capped_by_the_global_maximum() -> None:
    assert run(gateway_policy(ttl=600), max_ttl=300, token=subject(expires_in=3600)).lifetime == 300


def test_lifetime_never_exceeds_the_subject_tokens_remaining_lifetime() -> None:
    assert run(gateway_policy(ttl=120), max_ttl=300, token=subject(expires_in=45)).lifetime == 45


def test_lifetime_of_several_targets_is_the_smallest_ttl() -> None:
    decision = run(
        gateway_policy(CODE, ttl=120), gateway_policy(TICKETS, ttl=60), targets=(CODE, TICKETS)
    )
    assert decision.lifetime == 60


@pytest.mark.parametrize("expires_in", [0, -1, -3600])
def test_expired_subject_is_invalid_request(expires_in: int) -> None:
    # Within the verification leeway a subject token may already be past its exp: it still
    # cannot be exchanged for a token that outlives it.
    with pytest.raises(InvalidRequestError) as caught:
        run(gateway_policy(), token=subject(expires_in=expires_in))
    assert caught.value.error == "invalid_request"


# --- claims to copy -----------------------------------------------------------------------------


def test_copy_claims_come_from_the_policy() -> None:
    assert run(gateway_policy(copy_claims=("email", "name"))).copy_claims == ("email", "name")


def test_copy_claims_of_several_targets_are_intersected() -> None:
    code = gateway_policy(CODE, copy_claims=("email", "name", "groups"))
    tickets = gateway_policy(TICKETS, copy_claims=("groups", "email"))
    assert run(code, tickets, targets=(CODE, TICKETS)).copy_claims == ("email", "groups")


def test_no_copy_claims_when_any_target_copies_none() -> None:
    code = gateway_policy(CODE, copy_claims=("email",))
    tickets = gateway_policy(TICKETS)
    assert run(code, tickets, targets=(CODE, TICKETS)).copy_claims == ()
