"""The exchange caches end to end: the real app over real HTTP on loopback, real signing keys in a
real SQLite database, the real IdP JWKS, and a controlled service clock.

An identical request gets the token minted before (audited again, as a reuse); any difference in
the request, a policy change, a new signing key, an IdP key change, a client gone, the size bound
or the lifetime left stops reuse; ``caches.*.enabled: false`` turns it off; /metrics counts it.

The tests that need only HTTP and the audit rows also run against ``sidecar serve`` (granian, its
default workers), each over one kept-alive connection: the caches are per worker, and a gateway
keeps its connection. Those that need the service clock or the service's internals (a policy,
key or cache changed from the test) run in-process only.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import jwt
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt import PyJWKClient
from prometheus_client.parser import text_string_to_metric_families

from sidecar.config import Settings, settings_from_mapping
from sidecar.exchange.policy import Condition
from sidecar.services import Services
from sidecar.store.models import AuditEventRow
from sidecar.web.app import create_app
from tests.conftest import (
    ACCESS_TOKEN_TYPE,
    CODE_SEARCH,
    GATEWAY_SECRET,
    JWT_TOKEN_TYPE,
    TICKETS,
    ConfigEdit,
    FakeClock,
    Gateway,
    LiveServer,
    TestIdP,
    audit_rows,
    make_services,
)
from tests.functional.http.helpers import assert_oauth_error, jwks_client, verify_as_upstream

REUSED = "reused a minted token"
SECOND_CLIENT = "gateway-2"
SECOND_SECRET = "second-gateway-secret-" + "z" * 24
KEYS_REFRESH = 10.0  # keys.refresh_interval (the default)


def with_second_client(config: dict[str, Any]) -> dict[str, Any]:
    """The base config plus a second client with the same grant on code-search."""
    config["clients"].append({"client_id": SECOND_CLIENT, "client_secret": SECOND_SECRET})
    config["policies"].append(
        {
            "client_id": SECOND_CLIENT,
            "audience": CODE_SEARCH,
            "scopes": ["code.read", "code.search"],
            "default_scopes": ["code.read"],
            "ttl": 120,
            "copy_claims": ["email"],
        }
    )
    return config


@pytest.fixture(scope="module")
def edit_config() -> ConfigEdit:
    return with_second_client


@pytest.fixture(scope="module")
def gateway_keep_alive() -> bool:
    return True


@pytest.fixture
def services(clocked_services: Services) -> Services:
    return clocked_services


def subject_token(idp: TestIdP, clock: FakeClock, **claims: Any) -> str:
    # PyJWT checks exp against the real time, the grant against the service clock: valid for
    # both, and for longer than any clock advance below.
    return idp.token(exp=int(max(clock.now, time.time())) + 900, **claims)


def fresh_subject(gateway: Gateway, **claims: Any) -> str:
    # On either target, valid for 900 s (in-process, the service clock stands still meanwhile).
    return gateway.idp.token(exp=int(time.time()) + 900, **claims)


def granted(response: requests.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def access_token(response: requests.Response) -> str:
    token: str = granted(response)["access_token"]
    return token


def claims_of(token: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


def kid_of(token: str) -> str:
    kid: str = jwt.get_unverified_header(token)["kid"]
    return kid


def granted_rows(services: Services) -> list[AuditEventRow]:
    return [row for row in audit_rows(services) if row.decision == "granted"]


def granted_rows_since(gateway: Gateway, after_id: int, expected: int) -> list[AuditEventRow]:
    """The grants among the ``expected`` audit rows the test's requests wrote after
    ``after_id``."""
    rows = gateway.audit_rows(after_id=after_id, expected=expected)
    return [row for row in rows if row.decision == "granted"]


def cache_lookups(server: LiveServer | Gateway) -> dict[tuple[str, str], float]:
    """``sidecar_cache_lookups_total`` by (cache, result), as GET /metrics reports it."""
    response = requests.get(f"{server.url}/metrics", timeout=10)
    assert response.status_code == 200
    counts: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == "sidecar_cache_lookups_total":
                counts[(sample.labels["cache"], sample.labels["result"])] = sample.value
    return counts


# --- reuse --------------------------------------------------------------------------------------


def test_an_identical_request_gets_the_same_token_and_both_grants_are_audited(
    server: LiveServer, services: Services, idp: TestIdP, clock: FakeClock
) -> None:
    subject = subject_token(idp, clock, email="alice@example.com")

    first = granted(server.exchange(subject, scope="code.read code.search"))
    clock.advance(10)
    second = granted(server.exchange(subject, scope="code.read code.search"))
    third = granted(server.exchange(subject, scope="code.read code.search"))

    assert second["access_token"] == first["access_token"] == third["access_token"]
    assert first["expires_in"] == 120
    assert second["expires_in"] == third["expires_in"] == 110  # what is left, never more
    for body in (second, third):
        assert body["scope"] == first["scope"] == "code.read code.search"
        assert body["issued_token_type"] == ACCESS_TOKEN_TYPE
        assert body["token_type"] == "Bearer"

    # The reused token is a real, valid token of this issuer, expiring when it says.
    claims = verify_as_upstream(jwks_client(server.url), second["access_token"])
    assert claims["exp"] == int(clock.now) + second["expires_in"]

    rows = granted_rows(services)
    assert [row.reason for row in rows] == [None, REUSED, REUSED]
    assert {row.jti for row in rows} == {claims["jti"]}
    assert {row.kid for row in rows} == {kid_of(first["access_token"])}
    assert {row.expires_at for row in rows} == {claims["exp"]}
    assert {row.client_id for row in rows} == {"gateway"}
    assert {row.subject for row in rows} == {"alice@example.com"}
    assert len({row.subject_token_sha256 for row in rows}) == 1
    assert [row.scope for row in rows] == ["code.read code.search"] * 3
    assert [json.loads(row.audiences or "[]") for row in rows] == [[CODE_SEARCH]] * 3
    assert rows[1].at == rows[0].at + 10


def test_another_subject_token_of_the_same_user_gets_its_own_token(gateway: Gateway) -> None:
    start = gateway.last_audit_id()
    first = access_token(gateway.exchange(fresh_subject(gateway)))
    other = access_token(gateway.exchange(fresh_subject(gateway)))  # another jti, same sub

    assert other != first
    assert claims_of(other)["jti"] != claims_of(first)["jti"]
    assert [row.reason for row in granted_rows_since(gateway, start, 2)] == [None, None]


def test_another_client_never_gets_the_token_of_the_first(gateway: Gateway) -> None:
    start = gateway.last_audit_id()
    subject = fresh_subject(gateway)

    mine = access_token(gateway.exchange(subject))
    theirs = access_token(gateway.exchange(subject, auth=(SECOND_CLIENT, SECOND_SECRET)))

    assert theirs != mine
    assert claims_of(mine)["client_id"] == "gateway"
    assert claims_of(theirs)["client_id"] == SECOND_CLIENT
    # Each client keeps getting its own token back.
    assert access_token(gateway.exchange(subject)) == mine
    assert access_token(gateway.exchange(subject, auth=(SECOND_CLIENT, SECOND_SECRET))) == theirs
    rows = granted_rows_since(gateway, start, 4)
    assert [(row.client_id, row.reason) for row in rows] == [
        ("gateway", None),
        (SECOND_CLIENT, None),
        ("gateway", REUSED),
        (SECOND_CLIENT, REUSED),
    ]


def test_a_client_that_fails_authentication_gets_no_cached_token(gateway: Gateway) -> None:
    subject = fresh_subject(gateway)
    mine = access_token(gateway.exchange(subject))

    response = gateway.exchange(subject, auth=("gateway", "wrong-" + GATEWAY_SECRET))

    assert_oauth_error(response, 401, "invalid_client", mine, subject)
    assert access_token(gateway.exchange(subject)) == mine


def test_another_audience_never_reuses(gateway: Gateway) -> None:
    subject = fresh_subject(gateway, scope="code.read tickets.read")

    code = access_token(gateway.exchange(subject, audience=CODE_SEARCH))
    tickets = access_token(gateway.exchange(subject, audience=TICKETS))

    assert tickets != code
    assert claims_of(code)["aud"] == CODE_SEARCH
    assert claims_of(tickets)["aud"] == TICKETS
    assert access_token(gateway.exchange(subject, audience=TICKETS)) == tickets
    assert access_token(gateway.exchange(subject, audience=CODE_SEARCH)) == code


def test_another_scope_never_reuses(gateway: Gateway) -> None:
    subject = fresh_subject(gateway)

    read = granted(gateway.exchange(subject, scope="code.read"))
    both = granted(gateway.exchange(subject, scope="code.read code.search"))
    search = granted(gateway.exchange(subject, scope="code.search"))

    tokens = [read["access_token"], both["access_token"], search["access_token"]]
    assert len(set(tokens)) == 3
    assert [read["scope"], both["scope"], search["scope"]] == [
        "code.read",
        "code.read code.search",
        "code.search",
    ]
    assert [claims_of(t)["scope"] for t in tokens] == [
        "code.read",
        "code.read code.search",
        "code.search",
    ]
    assert access_token(gateway.exchange(subject, scope="code.search")) == tokens[2]
    assert access_token(gateway.exchange(subject, scope="code.read")) == tokens[0]


def test_another_requested_token_type_never_reuses(gateway: Gateway) -> None:
    subject = fresh_subject(gateway)

    as_access_token = granted(gateway.exchange(subject))
    as_jwt = granted(gateway.exchange(subject, requested_token_type=JWT_TOKEN_TYPE))

    assert as_jwt["access_token"] != as_access_token["access_token"]
    assert as_jwt["issued_token_type"] == JWT_TOKEN_TYPE
    assert as_access_token["issued_token_type"] == ACCESS_TOKEN_TYPE
    again = granted(gateway.exchange(subject, requested_token_type=JWT_TOKEN_TYPE))
    assert again["access_token"] == as_jwt["access_token"]
    assert again["issued_token_type"] == JWT_TOKEN_TYPE


def test_another_actor_token_never_reuses(gateway: Gateway) -> None:
    start = gateway.last_audit_id()
    subject = fresh_subject(gateway)
    agent_a = fresh_subject(gateway, sub="agent-a", scope="")
    agent_b = fresh_subject(gateway, sub="agent-b", scope="")

    def with_actor(actor: str | None) -> str:
        if actor is None:
            return access_token(gateway.exchange(subject))
        return access_token(
            gateway.exchange(subject, actor_token=actor, actor_token_type=ACCESS_TOKEN_TYPE)
        )

    by_a, by_b, by_none = with_actor(agent_a), with_actor(agent_b), with_actor(None)

    assert len({by_a, by_b, by_none}) == 3
    assert claims_of(by_a)["act"]["sub"] == "agent-a"
    assert claims_of(by_b)["act"]["sub"] == "agent-b"
    assert claims_of(by_none)["act"] == {"sub": "gateway"}
    assert with_actor(agent_b) == by_b
    assert with_actor(agent_a) == by_a
    assert with_actor(None) == by_none
    assert [row.actor for row in granted_rows_since(gateway, start, 6)] == [
        "agent-a",
        "agent-b",
        None,
        "agent-b",
        "agent-a",
        None,
    ]


def test_an_actor_no_longer_allowed_by_may_act_is_refused_even_after_a_grant(
    gateway: Gateway,
) -> None:
    # may_act is checked on every request, before the cache: a refusal is never cached away.
    subject = fresh_subject(gateway, may_act={"sub": "agent-a"})
    agent_a = fresh_subject(gateway, sub="agent-a")
    agent_b = fresh_subject(gateway, sub="agent-b")

    granted(gateway.exchange(subject, actor_token=agent_a, actor_token_type=ACCESS_TOKEN_TYPE))
    response = gateway.exchange(subject, actor_token=agent_b, actor_token_type=ACCESS_TOKEN_TYPE)

    assert_oauth_error(response, 400, "invalid_request", subject, agent_b)


# --- what stops reuse: the policy -----------------------------------------------------------


def change_policy(services: Services, client_id: str, audience: str, **changes: Any) -> None:
    """Update one policy in the database, as the admin API does, and make this worker see it."""
    current = services.policies.get().find(client_id, audience)
    assert current is not None
    stored = services.policy_store.get(current.name)
    assert stored is not None
    services.policy_store.put(
        dataclasses.replace(stored.policy, **changes),
        actor="test",
        if_version=stored.version,
        create=False,
    )
    services.policies.invalidate()


@pytest.mark.parametrize(
    "changes",
    [
        {"ttl": 90},
        {"scopes": frozenset({"code.read", "code.search", "code.write"})},
        {"default_scopes": frozenset({"code.read", "code.search"})},
        {"copy_claims": ()},
        {"conditions": (Condition("sub", "equals", ("alice@example.com",)),)},
    ],
    ids=["ttl", "scopes", "default-scopes", "copy-claims", "conditions"],
)
def test_a_changed_policy_stops_reuse(
    server: LiveServer,
    services: Services,
    idp: TestIdP,
    clock: FakeClock,
    changes: dict[str, Any],
) -> None:
    subject = subject_token(idp, clock, email="alice@example.com")
    before = granted(server.exchange(subject, scope="code.read"))
    assert access_token(server.exchange(subject, scope="code.read")) == before["access_token"]

    change_policy(services, "gateway", CODE_SEARCH, **changes)
    after = granted(server.exchange(subject, scope="code.read"))

    assert after["access_token"] != before["access_token"]
    assert claims_of(after["access_token"])["jti"] != claims_of(before["access_token"])["jti"]
    assert after["expires_in"] == changes.get("ttl", 120)
    assert ("email" in claims_of(after["access_token"])) == ("copy_claims" not in changes)
    # The token minted under the new policy is the one reused from now on.
    assert access_token(server.exchange(subject, scope="code.read")) == after["access_token"]
    assert [row.reason for row in granted_rows(services)] == [None, REUSED, None, REUSED]


def test_a_policy_changed_back_does_not_bring_the_old_token_back(
    server: LiveServer, services: Services, idp: TestIdP, clock: FakeClock
) -> None:
    subject = subject_token(idp, clock)
    original = access_token(server.exchange(subject))

    change_policy(services, "gateway", CODE_SEARCH, ttl=90)
    changed = access_token(server.exchange(subject))
    change_policy(services, "gateway", CODE_SEARCH, ttl=120)
    restored = access_token(server.exchange(subject))

    assert len({original, changed, restored}) == 3
    assert claims_of(restored)["exp"] - claims_of(restored)["iat"] == 120


def test_a_disabled_policy_refuses_the_next_identical_request(
    server: LiveServer, services: Services, idp: TestIdP, clock: FakeClock
) -> None:
    subject = subject_token(idp, clock)
    token = access_token(server.exchange(subject))
    assert access_token(server.exchange(subject)) == token

    change_policy(services, "gateway", CODE_SEARCH, enabled=False)
    response = server.exchange(subject)

    assert_oauth_error(response, 400, "invalid_target", token, subject)
    denied = [row for row in audit_rows(services) if row.decision == "denied"]
    assert [(row.error, row.jti, row.kid) for row in denied] == [("invalid_target", None, None)]
    assert_oauth_error(server.exchange(subject), 400, "invalid_target", token, subject)


def test_a_deleted_policy_refuses_the_next_identical_request(
    server: LiveServer, services: Services, idp: TestIdP, clock: FakeClock
) -> None:
    subject = subject_token(idp, clock)
    token = access_token(server.exchange(subject))

    remaining = [
        p for p in services.policies.get() if (p.client_id, p.audience) != ("gateway", CODE_SEARCH)
    ]
    services.policy_store.apply(remaining, actor="test", prune=True)
    services.policies.invalidate()

    assert_oauth_error(server.exchange(subject), 400, "invalid_target", token, subject)


def test_a_policy_change_reached_by_the_refresh_interval_stops_reuse(
    server: LiveServer, services: Services, settings: Settings, idp: TestIdP, clock: FakeClock
) -> None:
    # No invalidate(): the worker sees the change when its policy_refresh_interval elapses.
    subject = subject_token(idp, clock)
    token = access_token(server.exchange(subject))
    policy = services.policies.get().find("gateway", CODE_SEARCH)
    assert policy is not None
    stored = services.policy_store.get(policy.name)
    assert stored is not None
    services.policy_store.put(
        dataclasses.replace(stored.policy, ttl=100),
        actor="test",
        if_version=stored.version,
        create=False,
    )

    assert access_token(server.exchange(subject)) == token  # not seen yet by this worker
    clock.advance(settings.policy_refresh_interval)
    fresh = granted(server.exchange(subject))

    assert fresh["access_token"] != token
    assert fresh["expires_in"] == 100


def test_a_change_to_another_policy_keeps_reuse(
    server: LiveServer, services: Services, idp: TestIdP, clock: FakeClock
) -> None:
    subject = subject_token(idp, clock)
    token = access_token(server.exchange(subject))

    change_policy(services, "gateway", TICKETS, ttl=30)

    assert access_token(server.exchange(subject)) == token


# --- what stops reuse: the signing key ------------------------------------------------------


@pytest.mark.parametrize("seen", ["invalidated", "after-refresh-interval"])
def test_a_rotation_to_a_new_signing_key_stops_reuse(
    server: LiveServer, services: Services, idp: TestIdP, clock: FakeClock, seen: str
) -> None:
    subject = subject_token(idp, clock)
    old = access_token(server.exchange(subject))
    old_kid = kid_of(old)

    new_key = services.keys.rotate(immediate=True)
    if seen == "invalidated":
        services.keyring.invalidate()
    else:
        clock.advance(KEYS_REFRESH)
    fresh = access_token(server.exchange(subject))

    assert new_key.kid != old_kid
    assert fresh != old
    assert kid_of(fresh) == new_key.kid == services.signing_key().kid
    assert access_token(server.exchange(subject)) == fresh  # reused again, under the new key
    rows = granted_rows(services)
    assert [(row.kid, row.reason) for row in rows] == [
        (old_kid, None),
        (new_key.kid, None),
        (new_key.kid, REUSED),
    ]
    # Both verify against the published JWKS (the old key is kept for retain_after).
    jwks = PyJWKClient(f"{server.url}/.well-known/jwks.json", cache_keys=False)
    for token in (old, fresh):
        jwt.decode(
            token,
            jwks.get_signing_key_from_jwt(token),
            algorithms=["ES256"],
            audience=CODE_SEARCH,
            leeway=60,  # iat is on the service clock, which may be ahead of the real time
        )


def test_a_retired_signing_key_stops_reuse(
    server: LiveServer, services: Services, idp: TestIdP, clock: FakeClock
) -> None:
    subject = subject_token(idp, clock)
    old = access_token(server.exchange(subject))
    old_kid = kid_of(old)

    assert services.keys.retire(old_kid)
    services.keyring.invalidate()
    fresh = access_token(server.exchange(subject))

    assert fresh != old
    assert kid_of(fresh) != old_kid
    assert kid_of(fresh) == services.signing_key().kid


def test_a_rotation_not_yet_active_keeps_reuse(
    server: LiveServer, services: Services, idp: TestIdP, clock: FakeClock
) -> None:
    subject = subject_token(idp, clock)
    token = access_token(server.exchange(subject))

    upcoming = services.keys.rotate()  # published ahead, signs only after publish_ahead
    services.keyring.invalidate()

    assert upcoming.kid != kid_of(token)
    assert access_token(server.exchange(subject)) == token


# --- what stops reuse: the IdP's keys -------------------------------------------------------


@pytest.fixture
def fast_jwks_config(config: dict[str, Any]) -> dict[str, Any]:
    config["trusted_issuers"][0].update(refresh_interval="1s", min_refetch_interval="1s")
    return config


@pytest.mark.parametrize("change", ["replaced", "removed"])
def test_an_idp_key_change_refuses_a_cached_subject_token(
    fast_jwks_config: dict[str, Any],
    request: pytest.FixtureRequest,
    idp: TestIdP,
    clock: FakeClock,
    change: str,
) -> None:
    server: LiveServer = request.getfixturevalue("server")
    subject = subject_token(idp, clock)
    token = access_token(server.exchange(subject))
    assert access_token(server.exchange(subject)) == token

    if change == "replaced":  # the same kid, another key
        replacement = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        idp.keys["rsa-1"] = (replacement, "RS256")
    else:
        del idp.keys["rsa-1"]
    idp.write_jwks()
    clock.advance(2)  # past the issuer's refresh_interval: the JWKS is re-read

    # The re-read happens in the background; until it lands the old key set still holds.
    deadline = time.monotonic() + 5
    while (response := server.exchange(subject)).status_code == 200:
        assert response.json()["access_token"] == token
        assert time.monotonic() < deadline, "the IdP's key change was never seen"
        time.sleep(0.02)

    assert_oauth_error(response, 400, "invalid_request", token, subject)
    # From then on the cached verification is gone for good.
    for _ in range(3):
        assert_oauth_error(server.exchange(subject), 400, "invalid_request", token, subject)
    if change == "replaced":
        assert access_token(server.exchange(idp.token())) != token


# --- what stops reuse: the client leaving the config ----------------------------------------


def test_a_client_removed_from_the_config_gets_invalid_client_and_no_token(
    config: dict[str, Any], idp: TestIdP, clock: FakeClock
) -> None:
    subject = subject_token(idp, clock)
    before = make_services(settings_from_mapping(config, env={}), clock=clock)
    server = LiveServer(create_app(before.settings, before))
    try:
        token = access_token(server.exchange(subject, auth=(SECOND_CLIENT, SECOND_SECRET)))
        again = server.exchange(subject, auth=(SECOND_CLIENT, SECOND_SECRET))
        assert access_token(again) == token
    finally:
        server.stop()
        before.close()

    # The same database; the client (and its policy) gone from the config.
    config["clients"] = [c for c in config["clients"] if c["client_id"] != SECOND_CLIENT]
    config["policies"] = [p for p in config["policies"] if p["client_id"] != SECOND_CLIENT]
    after = make_services(settings_from_mapping(config, env={}), clock=clock)
    server = LiveServer(create_app(after.settings, after))
    try:
        response = server.exchange(subject, auth=(SECOND_CLIENT, SECOND_SECRET))
        assert_oauth_error(response, 401, "invalid_client", token, subject, SECOND_SECRET)
        assert "access_token" not in response.text
        # The clients still configured are served as before.
        assert claims_of(access_token(server.exchange(subject)))["client_id"] == "gateway"
        rows = audit_rows(after)
    finally:
        server.stop()
        after.close()

    assert [(row.client_id, row.reason) for row in rows[:2]] == [
        (SECOND_CLIENT, None),
        (SECOND_CLIENT, REUSED),
    ]
    refused = rows[2]
    assert (refused.decision, refused.error) == ("denied", "invalid_client")
    assert (refused.jti, refused.kid, refused.scope, refused.expires_at) == (None,) * 4
    assert {row.jti for row in rows[:2]} == {claims_of(token)["jti"]}


# --- the size bound and the lifetime ------------------------------------------------------------


@pytest.fixture
def one_entry_config(config: dict[str, Any]) -> dict[str, Any]:
    config["caches"] = {
        "subject_tokens": {"max_entries": 1},
        "minted_tokens": {"max_entries": 1},
    }
    return config


def test_with_one_entry_alternating_requests_never_reuse(
    one_entry_config: dict[str, Any],
    request: pytest.FixtureRequest,
    idp: TestIdP,
    clock: FakeClock,
) -> None:
    server: LiveServer = request.getfixturevalue("server")
    services: Services = request.getfixturevalue("services")
    first, second = subject_token(idp, clock), subject_token(idp, clock)

    tokens = [access_token(server.exchange(s)) for s in (first, second, first, second)]

    assert len(set(tokens)) == 4
    assert [row.reason for row in granted_rows(services)] == [None] * 4
    assert services.grant.minted_cache is not None
    assert services.grant.subject_cache is not None
    assert len(services.grant.minted_cache.entries) == 1
    assert len(services.grant.subject_cache.entries) == 1
    # The one entry kept is the last one.
    assert access_token(server.exchange(second)) == tokens[3]
    assert cache_lookups(server)[("subject_tokens", "hit")] == 1


@pytest.mark.parametrize(
    ("min_remaining", "reused_until", "fresh_at"),
    [(None, 59, 61), (0.5, 59, 61), (0.9, 11, 13), (0.25, 89, 91)],
    ids=["default", "0.5", "0.9", "0.25"],
)
def test_a_token_is_reused_only_while_min_remaining_of_it_is_left(
    config: dict[str, Any],
    request: pytest.FixtureRequest,
    idp: TestIdP,
    clock: FakeClock,
    min_remaining: float | None,
    reused_until: int,
    fresh_at: int,
) -> None:
    if min_remaining is not None:
        config["caches"] = {"minted_tokens": {"min_remaining": min_remaining}}
    server: LiveServer = request.getfixturevalue("server")
    services: Services = request.getfixturevalue("services")
    subject = subject_token(idp, clock)
    start = clock.now
    token = access_token(server.exchange(subject))

    clock.now = start + reused_until
    reused = granted(server.exchange(subject))
    clock.now = start + fresh_at
    fresh = granted(server.exchange(subject))

    assert reused["access_token"] == token
    assert reused["expires_in"] == 120 - reused_until
    assert fresh["access_token"] != token
    assert fresh["expires_in"] == 120
    assert claims_of(fresh["access_token"])["iat"] == int(start) + fresh_at
    assert [row.reason for row in granted_rows(services)] == [None, REUSED, None]


def test_a_token_capped_by_the_subject_token_is_reused_only_within_it(
    server: LiveServer, services: Services, idp: TestIdP, clock: FakeClock
) -> None:
    # The subject token expires in 100 s: so does the minted token, and half of that is 50 s.
    exp = int(clock.now) + 100
    subject = idp.token(exp=exp)
    start = clock.now
    first = granted(server.exchange(subject))
    assert first["expires_in"] == 100

    clock.now = start + 49
    assert granted(server.exchange(subject))["access_token"] == first["access_token"]
    clock.now = start + 51
    fresh = granted(server.exchange(subject))

    assert fresh["access_token"] != first["access_token"]
    assert claims_of(fresh["access_token"])["exp"] == exp  # never beyond the subject token


def test_a_subject_token_expired_on_the_service_clock_is_refused_not_served_from_cache(
    server: LiveServer, idp: TestIdP, clock: FakeClock
) -> None:
    subject = subject_token(idp, clock)  # exp 900 s from now
    token = access_token(server.exchange(subject))

    clock.advance(901)
    response = server.exchange(subject)

    assert_oauth_error(response, 400, "invalid_request", token, subject)


# --- the caches turned off --------------------------------------------------------------------


@pytest.mark.parametrize(
    "caches",
    [
        {"subject_tokens": {"enabled": False}, "minted_tokens": {"enabled": False}},
        {"minted_tokens": {"enabled": False}},
    ],
    ids=["both-off", "minted-off"],
)
def test_with_the_minted_token_cache_off_every_exchange_mints(
    config: dict[str, Any],
    request: pytest.FixtureRequest,
    idp: TestIdP,
    clock: FakeClock,
    caches: dict[str, Any],
) -> None:
    config["caches"] = caches
    server: LiveServer = request.getfixturevalue("server")
    services: Services = request.getfixturevalue("services")
    subject = subject_token(idp, clock)

    tokens = [access_token(server.exchange(subject)) for _ in range(3)]

    assert len(set(tokens)) == 3
    assert len({claims_of(token)["jti"] for token in tokens}) == 3
    assert [row.reason for row in granted_rows(services)] == [None] * 3
    assert services.grant.minted_cache is None
    lookups = cache_lookups(server)
    assert ("minted_tokens", "hit") not in lookups
    assert ("minted_tokens", "miss") not in lookups
    if caches.get("subject_tokens", {}).get("enabled", True):
        assert services.grant.subject_cache is not None
        assert lookups[("subject_tokens", "miss")] == 1
        assert lookups[("subject_tokens", "hit")] == 2
    else:
        assert services.grant.subject_cache is None
        assert lookups == {}


def test_with_only_the_subject_token_cache_off_minted_tokens_are_still_reused(
    config: dict[str, Any], request: pytest.FixtureRequest, idp: TestIdP, clock: FakeClock
) -> None:
    config["caches"] = {"subject_tokens": {"enabled": False}}
    server: LiveServer = request.getfixturevalue("server")
    services: Services = request.getfixturevalue("services")
    subject = subject_token(idp, clock)

    first = access_token(server.exchange(subject))
    assert access_token(server.exchange(subject)) == first
    assert services.grant.subject_cache is None
    assert cache_lookups(server) == {("minted_tokens", "miss"): 1, ("minted_tokens", "hit"): 1}


# --- /metrics -----------------------------------------------------------------------------------


def test_metrics_count_the_hits_and_misses_of_both_caches(gateway: Gateway) -> None:
    keys = [
        ("subject_tokens", "hit"),
        ("subject_tokens", "miss"),
        ("minted_tokens", "hit"),
        ("minted_tokens", "miss"),
    ]

    def counts() -> dict[tuple[str, str], float]:
        counted = cache_lookups(gateway)
        return {key: counted.get(key, 0.0) for key in keys}

    # Under sidecar serve, the module's earlier tests were counted too: this test's lookups are
    # the increase from here.
    start = counts()
    if gateway.target == "in-process":
        assert set(start.values()) == {0.0}  # a new service

    def lookups() -> dict[tuple[str, str], float]:
        now = counts()
        return {key: now[key] - start[key] for key in keys}

    assert set(lookups().values()) == {0.0}
    subject = fresh_subject(gateway, scope="code.read tickets.read")

    granted(gateway.exchange(subject))
    assert lookups() == {
        ("subject_tokens", "hit"): 0,
        ("subject_tokens", "miss"): 1,
        ("minted_tokens", "hit"): 0,
        ("minted_tokens", "miss"): 1,
    }

    granted(gateway.exchange(subject))
    granted(gateway.exchange(subject))
    assert lookups() == {
        ("subject_tokens", "hit"): 2,
        ("subject_tokens", "miss"): 1,
        ("minted_tokens", "hit"): 2,
        ("minted_tokens", "miss"): 1,
    }

    # The same subject token for another audience: a verified-token hit, a minted-token miss.
    granted(gateway.exchange(subject, audience=TICKETS))
    # An actor token: one more lookup of the subject cache (a miss), a minted-token miss.
    actor = fresh_subject(gateway, sub="agent-a")
    granted(gateway.exchange(subject, actor_token=actor, actor_token_type=ACCESS_TOKEN_TYPE))
    assert lookups() == {
        ("subject_tokens", "hit"): 4,
        ("subject_tokens", "miss"): 2,
        ("minted_tokens", "hit"): 2,
        ("minted_tokens", "miss"): 3,
    }

    # A refusal after verification (scope not allowed) looks up the subject cache only.
    response = gateway.exchange(subject, scope="code.write")
    assert response.status_code == 400
    assert lookups()[("subject_tokens", "hit")] == 5
    assert lookups()[("minted_tokens", "miss")] == 3


def test_a_policy_with_reuse_tokens_false_mints_every_time(
    server: LiveServer, services: Services, idp: TestIdP, clock: FakeClock
) -> None:
    subject = subject_token(idp, clock)
    token = access_token(server.exchange(subject))
    assert access_token(server.exchange(subject)) == token  # reuse allowed by default

    change_policy(services, "gateway", CODE_SEARCH, reuse_tokens=False)
    tokens = {access_token(server.exchange(subject)) for _ in range(3)}

    assert len(tokens) == 3  # a fresh token (and jti) each time
    assert token not in tokens
    reasons = [row.reason for row in audit_rows(services) if row.decision == "granted"]
    assert reasons == [None, "reused a minted token", None, None, None]

    change_policy(services, "gateway", CODE_SEARCH, reuse_tokens=True)
    again = access_token(server.exchange(subject))
    assert access_token(server.exchange(subject)) == again
