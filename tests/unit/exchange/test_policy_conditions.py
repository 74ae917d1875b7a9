"""Subject conditions, the issuer filter, audience normalisation and overlap detection of the
exchange policies (issue 5): pure functions over plain data, no app, no database."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.errors import InvalidTargetError
from sidecar.exchange.policy import (
    Condition,
    Policy,
    PolicySet,
    could_overlap,
    decide,
    normalize_audience,
)
from sidecar.exchange.subject import VerifiedToken
from tests.unit.support import gateway_policy

NOW = 1_700_000_000
IDP = "https://idp.test.example"
OTHER_IDP = "https://other-idp.test.example"
CODE = "https://code-search.internal/mcp"


def subject(issuer: str = IDP, **claims: Any) -> VerifiedToken:
    return VerifiedToken(
        issuer=issuer,
        subject="alice@example.com",
        claims={"iss": issuer, "sub": "alice@example.com", "exp": NOW + 600, **claims},
        scopes=frozenset({"code.read"}),
        expires_at=NOW + 600,
        fingerprint="0123456789abcdef",
    )


def equals(claim: str, value: Any) -> Condition:
    return Condition(claim, "equals", (value,))


def one_of(claim: str, *values: Any) -> Condition:
    return Condition(claim, "one_of", values)


def contains(claim: str, value: Any) -> Condition:
    return Condition(claim, "contains", (value,))


def refusal_of(*policies: Policy, token: VerifiedToken, target: str = CODE) -> str:
    """The reason decide() gives for refusing; the client only ever sees invalid_target."""
    with pytest.raises(InvalidTargetError) as caught:
        decide("gateway", (target,), None, token, PolicySet(policies), max_ttl=300, now=NOW)
    assert caught.value.error == "invalid_target"
    return str(caught.value.reason)


# --- each condition type ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("condition", "claims", "holds"),
    [
        # equals
        (equals("tenant", "acme"), {"tenant": "acme"}, True),
        (equals("tenant", "acme"), {"tenant": "globex"}, False),
        (equals("tenant", "acme"), {"tenant": "ACME"}, False),
        (equals("tenant", "acme"), {"tenant": ["acme"]}, False),
        (equals("tenant", "acme"), {"tenant": {"acme": True}}, False),
        (equals("mfa", True), {"mfa": True}, True),
        (equals("mfa", True), {"mfa": 1}, False),
        (equals("level", 1), {"level": True}, False),
        (equals("level", 1), {"level": "1"}, False),
        (equals("level", "1"), {"level": 1}, False),
        (equals("level", 1), {"level": 1}, True),
        (equals("level", 1), {"level": 1.0}, False),
        # one_of
        (one_of("tenant", "acme", "globex"), {"tenant": "globex"}, True),
        (one_of("tenant", "acme", "globex"), {"tenant": "initech"}, False),
        (one_of("tenant", "acme", "globex"), {"tenant": ["acme"]}, False),
        (one_of("level", 1, 2), {"level": 2}, True),
        (one_of("level", 1, 2), {"level": True}, False),
        (one_of("level", 1, 2), {"level": "2"}, False),
        (one_of("flag", True), {"flag": 1}, False),
        # contains on a list
        (contains("groups", "eng"), {"groups": ["sales", "eng"]}, True),
        (contains("groups", "eng"), {"groups": ["sales"]}, False),
        (contains("groups", "eng"), {"groups": []}, False),
        (contains("groups", "eng"), {"groups": ["engineering"]}, False),
        (contains("groups", "eng"), {"groups": [["eng"]]}, False),
        (contains("ids", 1), {"ids": [True, "1"]}, False),
        (contains("ids", 1), {"ids": [2, 1]}, True),
        # contains on a space-separated string
        (contains("roles", "eng"), {"roles": "sales eng ops"}, True),
        (contains("roles", "eng"), {"roles": "eng"}, True),
        (contains("roles", "eng"), {"roles": "engineering sales"}, False),
        (contains("roles", "eng"), {"roles": "sales,eng"}, False),
        (contains("roles", "ENG"), {"roles": "sales eng"}, False),
        (contains("roles", 1), {"roles": "1 2"}, False),
        # contains on something that is neither
        (contains("groups", "eng"), {"groups": {"eng": True}}, False),
        (contains("groups", 1), {"groups": 1}, False),
    ],
)
def test_condition_holds_only_for_a_matching_claim_of_the_same_type(
    condition: Condition, claims: dict[str, Any], holds: bool
) -> None:
    assert condition.holds(claims) is holds


@pytest.mark.parametrize(
    "condition",
    [equals("tenant", "acme"), one_of("tenant", "acme"), contains("groups", "eng")],
    ids=["equals", "one_of", "contains"],
)
def test_a_missing_claim_fails_every_condition(condition: Condition) -> None:
    assert condition.holds({"sub": "alice", "other": "acme eng"}) is False


@pytest.mark.parametrize(
    "condition",
    [equals("tenant", "acme"), one_of("tenant", "acme"), contains("tenant", "acme")],
    ids=["equals", "one_of", "contains"],
)
def test_a_null_claim_fails_every_condition(condition: Condition) -> None:
    assert condition.holds({"tenant": None}) is False


def test_condition_describes_itself_for_the_refusal_reason() -> None:
    assert equals("tenant", "acme").describe() == "tenant equals 'acme'"
    assert one_of("tenant", "acme", "globex").describe() == "tenant one_of ['acme', 'globex']"
    assert contains("groups", "eng").describe() == "groups contains 'eng'"
    assert equals("mfa", True).describe() == "mfa equals true"


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (equals("mfa", True), equals("mfa", 1)),
        (equals("level", 0), equals("level", False)),
        (one_of("level", 1, 2), one_of("level", True, 2)),
        (contains("ids", 1), contains("ids", True)),
    ],
)
def test_conditions_on_values_of_different_types_are_different_conditions(
    a: Condition, b: Condition
) -> None:
    # They hold for different claims, so a policy changed from one to the other has changed.
    assert a != b
    assert gateway_policy(conditions=(a,)) != gateway_policy(conditions=(b,))
    assert equals("mfa", True) == equals("mfa", True)
    assert hash(one_of("level", 1, 2)) == hash(one_of("level", 1, 2))


# --- conditions and the issuer filter in a decision ---------------------------------------------


def test_policy_with_a_holding_condition_grants() -> None:
    conditional = gateway_policy(name="eng code search", conditions=(contains("groups", "eng"),))
    decision = decide(
        "gateway",
        (CODE,),
        None,
        subject(groups=["eng"]),
        PolicySet([conditional]),
        max_ttl=300,
        now=NOW,
    )
    assert decision.policies == (conditional,)
    assert decision.scopes == ("code.read",)


def test_failed_condition_refusal_names_the_policy_and_the_condition() -> None:
    conditional = gateway_policy(name="eng code search", conditions=(contains("groups", "eng"),))

    reason = refusal_of(conditional, token=subject(groups=["sales"]))

    assert reason == "policy eng code search: condition failed: groups contains 'eng'"


def test_every_condition_must_hold() -> None:
    both = gateway_policy(
        name="acme eng",
        conditions=(contains("groups", "eng"), equals("tenant", "acme")),
    )

    reason = refusal_of(both, token=subject(groups=["eng"], tenant="globex"))

    assert reason == "policy acme eng: condition failed: tenant equals 'acme'"
    assert "groups" not in reason  # the condition that held is not blamed


def test_typed_equality_holds_in_a_decision() -> None:
    mfa = gateway_policy(name="mfa only", conditions=(equals("mfa", True),))
    assert "mfa equals true" in refusal_of(mfa, token=subject(mfa=1))
    assert "mfa equals true" in refusal_of(mfa, token=subject(mfa="true"))
    assert "mfa equals true" in refusal_of(mfa, token=subject())


def test_issuer_filter_refuses_a_subject_of_another_issuer() -> None:
    filtered = gateway_policy(name="idp users", issuer=IDP)

    reason = refusal_of(filtered, token=subject(issuer=OTHER_IDP))

    assert reason == f"policy idp users: subject issuer is not {IDP}"


def test_issuer_filter_accepts_a_subject_of_that_issuer() -> None:
    filtered = gateway_policy(name="idp users", issuer=IDP)
    decision = decide(
        "gateway", (CODE,), None, subject(), PolicySet([filtered]), max_ttl=300, now=NOW
    )
    assert decision.policies == (filtered,)


def test_issuer_filter_compares_exactly() -> None:
    filtered = gateway_policy(name="idp users", issuer=IDP)
    for near_miss in (IDP + "/", IDP.upper(), IDP.replace("https", "http")):
        assert "subject issuer is not" in refusal_of(filtered, token=subject(issuer=near_miss))


def test_disabled_refusal_names_the_policy() -> None:
    assert (
        refusal_of(gateway_policy(name="off", enabled=False), token=subject())
        == "policy off: disabled"
    )


def test_exclusive_policies_pick_the_one_whose_conditions_hold() -> None:
    acme = gateway_policy(name="acme", conditions=(equals("tenant", "acme"),), ttl=60)
    globex = gateway_policy(
        name="globex",
        conditions=(equals("tenant", "globex"),),
        scopes={"code.read"},
        default_scopes={"code.read"},
        ttl=30,
    )
    policies = PolicySet([acme, globex])

    for tenant, chosen, ttl in (("acme", acme, 60), ("globex", globex, 30)):
        decision = decide(
            "gateway", (CODE,), None, subject(tenant=tenant), policies, max_ttl=300, now=NOW
        )
        assert decision.policies == (chosen,)
        assert decision.lifetime == ttl


def test_refusal_by_several_candidates_names_each_policy_and_its_failed_rule() -> None:
    acme = gateway_policy(name="acme", conditions=(equals("tenant", "acme"),))
    globex = gateway_policy(
        name="globex", issuer=OTHER_IDP, conditions=(equals("tenant", "globex"),)
    )

    reason = refusal_of(acme, globex, token=subject(tenant="initech"))

    assert "policy acme: condition failed: tenant equals 'acme'" in reason
    assert f"policy globex: subject issuer is not {OTHER_IDP}" in reason


def test_several_matching_policies_fail_closed() -> None:
    # Validation refuses such a set; if one ever reached decide(), it must not pick one.
    first = gateway_policy(name="first", conditions=(contains("groups", "eng"),))
    second = gateway_policy(name="second", conditions=(equals("tenant", "acme"),))

    reason = refusal_of(first, second, token=subject(groups=["eng"], tenant="acme"))

    assert "ambiguous" in reason
    assert "policies match: first, second" in reason


def test_no_candidate_reason_is_generic() -> None:
    assert refusal_of(gateway_policy(), token=subject(), target="https://wiki.internal/mcp") == (
        "no policy for the client and target"
    )


# --- audience normalisation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("audience", "normalised"),
    [
        # scheme and host case, default port
        ("HTTPS://Code-Search.INTERNAL/mcp", "https://code-search.internal/mcp"),
        ("https://code-search.internal:443/mcp", "https://code-search.internal/mcp"),
        ("HTTP://Example.COM:80/x", "http://example.com/x"),
        ("https://example.com:443", "https://example.com"),
        ("https://[ABCD::1]:443/x", "https://[abcd::1]/x"),
        # a port that is not the scheme's default stays
        ("https://example.com:8443/x", "https://example.com:8443/x"),
        ("http://example.com:443/x", "http://example.com:443/x"),
        ("https://example.com:80/x", "https://example.com:80/x"),
        # path, query, fragment and trailing slash are kept byte for byte
        ("https://example.com/MCP", "https://example.com/MCP"),
        ("https://example.com/mcp/", "https://example.com/mcp/"),
        ("https://example.com/a%2Fb", "https://example.com/a%2Fb"),
        ("https://example.com/%7Euser", "https://example.com/%7Euser"),
        ("https://example.com/x?Q=A", "https://example.com/x?Q=A"),
        ("https://example.com/x?", "https://example.com/x?"),
        ("https://example.com/x#Frag", "https://example.com/x#Frag"),
        ("https://example.com/./x/../y", "https://example.com/./x/../y"),
        # userinfo is not lowercased
        ("https://User:PW@HOST.example/x", "https://User:PW@host.example/x"),
        # not a URI with an authority: compared exactly
        ("code-search", "code-search"),
        ("Code-Search", "Code-Search"),
        ("urn:Example:Upstream", "urn:Example:Upstream"),
        # not parseable as a port: left alone rather than guessed at
        ("https://example.com:99999/x", "https://example.com:99999/x"),
        ("https://example.com:https/x", "https://example.com:https/x"),
    ],
)
def test_normalize_audience_lowercases_scheme_and_host_and_drops_a_default_port_only(
    audience: str, normalised: str
) -> None:
    assert normalize_audience(audience) == normalised


@pytest.mark.parametrize(
    "audience",
    [
        "https://\u212aelvin.example/mcp",  # KELVIN SIGN: str.lower() would give "kelvin"
        "https://\u0130stanbul.example/mcp",  # LATIN CAPITAL I WITH DOT ABOVE
        "https://B\u00dcCHER.example/mcp",
        "https://\uff23ODE.example/mcp",  # FULLWIDTH C
    ],
)
def test_non_ascii_hosts_are_left_untouched(audience: str) -> None:
    assert normalize_audience(audience) == audience


def test_kelvin_sign_host_does_not_match_an_ascii_k_policy() -> None:
    policies = PolicySet([gateway_policy(audience="https://kelvin.example/mcp")])

    assert policies.candidates("gateway", "https://\u212aelvin.example/mcp") == []
    assert policies.candidates("gateway", "https://KELVIN.example/mcp") != []


def test_policy_set_matches_a_target_differing_only_in_host_case_and_default_port() -> None:
    code = gateway_policy()
    policies = PolicySet([code])

    assert policies.candidates("gateway", "HTTPS://CODE-SEARCH.Internal:443/mcp") == [code]
    assert policies.candidates("gateway", "https://code-search.internal/MCP") == []
    assert policies.candidates("gateway", "https://code-search.internal/mcp/") == []
    assert policies.candidates("gateway", "https://code-search.internal:8443/mcp") == []


def test_policy_audience_written_in_another_case_matches_the_normal_form() -> None:
    code = gateway_policy(audience="HTTPS://Code-Search.Internal:443/mcp")
    assert PolicySet([code]).candidates("gateway", CODE) == [code]


def test_decision_audience_is_the_policys_own_identifier() -> None:
    decision = decide(
        "gateway",
        ("HTTPS://CODE-SEARCH.INTERNAL:443/mcp",),
        None,
        subject(),
        PolicySet([gateway_policy()]),
        max_ttl=300,
        now=NOW,
    )
    assert decision.audiences == (CODE,)


# --- overlap detection --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b"),
    [
        pytest.param({}, {}, id="no-conditions"),
        pytest.param({"issuer": IDP}, {}, id="one-issuer-filter"),
        pytest.param({"issuer": IDP}, {"issuer": IDP}, id="same-issuer"),
        pytest.param(
            {"conditions": (equals("tenant", "acme"),)},
            {"conditions": (equals("tenant", "acme"),)},
            id="same-equals",
        ),
        pytest.param(
            {"conditions": (equals("tenant", "acme"),)},
            {"conditions": (one_of("tenant", "globex", "acme"),)},
            id="equals-within-one_of",
        ),
        pytest.param(
            {"conditions": (one_of("tenant", "acme", "initech"),)},
            {"conditions": (one_of("tenant", "globex", "initech"),)},
            id="intersecting-one_of",
        ),
        pytest.param(
            {"conditions": (equals("tenant", "acme"),)},
            {"conditions": (equals("region", "eu"),)},
            id="different-claims",
        ),
        pytest.param(
            {"conditions": (contains("groups", "eng"),)},
            {"conditions": (contains("groups", "sales"),)},
            id="contains-both-possible",
        ),
        pytest.param(
            {"conditions": (contains("groups", "eng"),)},
            {"conditions": (equals("groups", "sales"),)},
            id="contains-and-equals-conservative",
        ),
        pytest.param(
            {"conditions": (equals("tenant", "acme"),)},
            {},
            id="conditions-on-one-only",
        ),
        pytest.param(
            {"audience": "HTTPS://Code-Search.INTERNAL:443/mcp"},
            {},
            id="audience-equal-after-normalisation",
        ),
    ],
)
def test_policies_that_one_request_could_match_overlap(
    a: dict[str, Any], b: dict[str, Any]
) -> None:
    first, second = gateway_policy(name="first", **a), gateway_policy(name="second", **b)
    assert could_overlap(first, second)
    assert could_overlap(second, first)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        pytest.param({"issuer": IDP}, {"issuer": OTHER_IDP}, id="different-issuers"),
        pytest.param(
            {"conditions": (equals("tenant", "acme"),)},
            {"conditions": (equals("tenant", "globex"),)},
            id="disjoint-equals",
        ),
        pytest.param(
            {"conditions": (one_of("tenant", "acme", "initech"),)},
            {"conditions": (one_of("tenant", "globex", "hooli"),)},
            id="disjoint-one_of",
        ),
        pytest.param(
            {"conditions": (equals("tenant", "acme"),)},
            {"conditions": (one_of("tenant", "globex", "hooli"),)},
            id="equals-outside-one_of",
        ),
        pytest.param(
            {"conditions": (equals("level", 1),)},
            {"conditions": (equals("level", True),)},
            id="typed-values-differ",
        ),
        pytest.param(
            {"conditions": (contains("groups", "eng"), equals("tenant", "acme"))},
            {"conditions": (equals("tenant", "globex"), contains("groups", "eng"))},
            id="one-disjoint-pair-suffices",
        ),
        pytest.param({"enabled": False}, {}, id="first-disabled"),
        pytest.param({}, {"enabled": False}, id="second-disabled"),
        pytest.param({"client_id": "other"}, {}, id="different-clients"),
        pytest.param({"audience": "https://tickets.internal/mcp"}, {}, id="different-audiences"),
        pytest.param({"audience": CODE + "/"}, {}, id="audiences-differ-by-a-slash"),
    ],
)
def test_policies_no_request_could_match_both_do_not_overlap(
    a: dict[str, Any], b: dict[str, Any]
) -> None:
    first, second = gateway_policy(name="first", **a), gateway_policy(name="second", **b)
    assert not could_overlap(first, second)
    assert not could_overlap(second, first)


def test_a_disabled_policy_never_overlaps_even_an_identical_one() -> None:
    enabled = gateway_policy(name="on")
    disabled = gateway_policy(name="off", enabled=False)
    assert not could_overlap(enabled, disabled)
    assert not could_overlap(disabled, gateway_policy(name="off too", enabled=False))
