"""Policy entries and policy sets (sidecar/config/policies.py): ``PolicyConfig`` validated directly,
and ``check_policy_set`` over ``Policy`` objects, the form in which the policy store and the
admin API check a whole set against the settings. Loading policies from a file is tested in
test_loading.py."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from sidecar.config import (
    ConditionConfig,
    PolicyConfig,
    Settings,
    check_policy_set,
    format_validation_error,
    validate_policies,
)
from sidecar.exchange.policy import Condition, Policy
from tests.conftest import CODE_SEARCH, TICKETS

THIRD = "https://third.internal/mcp"
POLICY: dict[str, Any] = {"client_id": "gateway", "audience": CODE_SEARCH, "scopes": ["code.read"]}


def policy_refusal(**values: Any) -> str:
    with pytest.raises(ValidationError) as caught:
        PolicyConfig.model_validate({**POLICY, **values})
    return format_validation_error(caught.value)


def policy(name: str, **values: Any) -> Policy:
    fields: dict[str, Any] = {
        "client_id": "gateway",
        "audience": CODE_SEARCH,
        "scopes": frozenset({"code.read"}),
        "default_scopes": frozenset(),
        "ttl": 60,
        **values,
    }
    return Policy(name=name, **fields)


def set_refusal(policies: list[Policy], settings: Settings) -> str:
    with pytest.raises(ValueError) as caught:  # noqa: PT011 - the message is what is checked
        check_policy_set(policies, settings)
    return str(caught.value)


# --- one policy entry -----------------------------------------------------------------------------


def test_policy_defaults() -> None:
    config = PolicyConfig.model_validate(POLICY)
    assert (config.name, config.issuer, config.subject) == (None, None, {})
    assert (config.default_scopes, config.copy_claims, config.ttl) == ([], [], 120)
    assert (config.enabled, config.require_subject_scopes, config.reuse_tokens) == (
        True,
        False,
        True,
    )


def test_a_policy_becomes_the_policy_the_grant_decides_with() -> None:
    config = PolicyConfig.model_validate(
        {
            **POLICY,
            "scopes": ["code.read", "code.search"],
            "default_scopes": ["code.read"],
            "copy_claims": ["email"],
            "subject": {"tenant": {"equals": "acme"}, "groups": {"contains": "eng"}},
        }
    )

    assert config.to_policy() == Policy(
        name=f"gateway -> {CODE_SEARCH}",
        client_id="gateway",
        audience=CODE_SEARCH,
        scopes=frozenset({"code.read", "code.search"}),
        default_scopes=frozenset({"code.read"}),
        ttl=120,
        copy_claims=("email",),
        conditions=(  # by claim name: the order in the file is not a change
            Condition("groups", "contains", ("eng",)),
            Condition("tenant", "equals", ("acme",)),
        ),
    )


@pytest.mark.parametrize("name", ["a/history", "a/disable", "team/x/history"])
def test_a_name_ending_like_an_admin_sub_resource_is_refused(name: str) -> None:
    assert policy_refusal(name=name) == (
        "a policy name must not end with /history, /disable, /enable, /rollback (admin API paths)"
    )


@pytest.mark.parametrize("audience", ["https://api.internal/history", "https://x.internal/disable"])
def test_a_default_name_ending_like_a_sub_resource_needs_a_name(audience: str) -> None:
    # The default name is "CLIENT -> AUDIENCE": an audience ending so needs a name of its own.
    assert "must not end with /history, /disable" in policy_refusal(audience=audience)
    assert PolicyConfig.model_validate({**POLICY, "audience": audience, "name": "api"})


@pytest.mark.parametrize("name", ["history", "a/history/b", "a/histories", "disable-later"])
def test_a_name_that_only_mentions_a_sub_resource_is_accepted(name: str) -> None:
    assert PolicyConfig.model_validate({**POLICY, "name": name}).to_policy().name == name


def test_a_name_of_255_characters_fits_its_column() -> None:
    assert PolicyConfig.model_validate({**POLICY, "name": "n" * 255}).name == "n" * 255


def test_a_name_too_long_for_its_column_is_refused() -> None:
    assert policy_refusal(name="n" * 256).startswith("name: ")


def test_an_empty_name_is_refused() -> None:
    assert policy_refusal(name="").startswith("name: ")


def test_an_audience_over_2048_characters_is_refused() -> None:
    audience = "https://api.internal/" + "a" * 2048
    assert policy_refusal(audience=audience, name="long").startswith("audience: ")


@pytest.mark.parametrize(
    ("scopes", "message"),
    [
        (["two words"], "'two words' is not a valid scope token (RFC 6749 §3.3)"),
        (["code.*"], "'code.*' is an omnibus scope; list the scopes explicitly"),
        (["ADMIN:*"], "'ADMIN:*' is an omnibus scope"),
        (["code.read", "code.read"], "lists a scope twice"),
    ],
)
def test_each_scope_rule_has_its_own_message(scopes: list[str], message: str) -> None:
    assert message in policy_refusal(scopes=scopes)


def test_default_scopes_obey_the_scope_rules_too() -> None:
    message = policy_refusal(scopes=["code.read"], default_scopes=["all"])
    assert message.startswith("default_scopes: ")
    assert "omnibus" in message


def test_a_ttl_under_a_second_is_refused() -> None:
    assert policy_refusal(ttl=0).startswith("ttl: ")


# --- subject conditions ---------------------------------------------------------------------------


def test_one_of_is_a_set_whatever_the_order_and_repeats() -> None:
    first = ConditionConfig(one_of=["globex", "acme", "globex"]).to_condition("tenant")
    second = ConditionConfig(one_of=["acme", "globex"]).to_condition("tenant")
    assert first == second == Condition("tenant", "one_of", ("acme", "globex"))


def test_one_of_with_values_of_several_types_is_ordered_by_type_then_value() -> None:
    condition = ConditionConfig(one_of=["2", 2, True, "1"]).to_condition("level")
    assert condition.values == (True, 2, "1", "2")


def test_equals_and_contains_hold_one_value() -> None:
    assert ConditionConfig(equals=False).to_condition("mfa") == Condition("mfa", "equals", (False,))
    assert ConditionConfig(contains="eng").to_condition("groups") == Condition(
        "groups", "contains", ("eng",)
    )


def test_an_empty_contains_is_refused() -> None:
    with pytest.raises(ValidationError, match="contains must not be empty"):
        ConditionConfig(contains="")


# --- a policy set against the settings ------------------------------------------------------------


def test_the_configured_policies_pass_as_a_set(settings: Settings) -> None:
    check_policy_set([config.to_policy() for config in settings.policies], settings)
    check_policy_set([], settings)


def test_a_policy_for_an_unknown_client_is_refused_naming_it(settings: Settings) -> None:
    message = set_refusal([policy("p", client_id="nobody")], settings)
    assert message == "policy \"p\": client_id 'nobody' is not one of the configured clients"


def test_a_policy_for_an_untrusted_issuer_is_refused_naming_it(settings: Settings) -> None:
    message = set_refusal([policy("p", issuer="https://idp.evil.example")], settings)
    assert message == (
        "policy \"p\": issuer 'https://idp.evil.example' is not one of the trusted_issuers"
    )


def test_a_ttl_up_to_max_ttl_is_accepted(settings: Settings) -> None:
    check_policy_set([policy("p", ttl=settings.tokens.max_ttl)], settings)


def test_a_ttl_over_max_ttl_is_refused_naming_the_policy(settings: Settings) -> None:
    ttl = settings.tokens.max_ttl + 1
    message = set_refusal([policy("ok", audience=TICKETS), policy("p", ttl=ttl)], settings)
    assert message == f'policy "p": ttl {ttl} exceeds tokens.max_ttl ({ttl - 1})'


def test_a_name_used_twice_is_refused_naming_both_positions(settings: Settings) -> None:
    configs = [
        PolicyConfig.model_validate({**POLICY, "name": "p"}),
        PolicyConfig.model_validate({**POLICY, "name": "other", "audience": TICKETS}),
        PolicyConfig.model_validate({**POLICY, "name": "p", "audience": THIRD}),
    ]
    with pytest.raises(ValueError, match="already used") as refused:
        validate_policies(configs, settings)
    assert str(refused.value).startswith(
        'policy "p" (policies[2]): the name is already used by the policy at policies[0]'
    )


def test_two_enabled_policies_for_one_request_are_refused_naming_both(
    settings: Settings,
) -> None:
    message = set_refusal([policy("a"), policy("b", scopes=frozenset({"code.search"}))], settings)
    assert message.startswith('policy "b" could match the same requests as policy "a": ')
    assert "disable one" in message


def test_a_disabled_policy_overlaps_nothing(settings: Settings) -> None:
    check_policy_set([policy("a"), policy("b", enabled=False)], settings)


def test_policies_exclusive_by_a_condition_may_share_a_target(settings: Settings) -> None:
    check_policy_set(
        [
            policy("acme", conditions=(Condition("tenant", "equals", ("acme",)),)),
            policy("globex", conditions=(Condition("tenant", "equals", ("globex",)),)),
        ],
        settings,
    )


def test_the_same_target_for_two_clients_is_no_overlap(settings: Settings) -> None:
    check_policy_set([policy("a"), policy("b", client_id="jwt-gateway")], settings)


def test_validate_policies_checks_the_entries_as_a_set(settings: Settings) -> None:
    configs = [
        PolicyConfig.model_validate({**POLICY, "name": "a"}),
        PolicyConfig.model_validate({**POLICY, "name": "b"}),
    ]
    with pytest.raises(ValueError, match=r'^policy "b" \(policies\[1\]\) could match the same '):
        validate_policies(configs, settings)
