"""The keyring: key states from timestamps, the signing key, the JWKS, rotation, signing."""

from __future__ import annotations

from typing import Any

import jwt
import pytest

from sidecar.keys.keyring import (
    CURRENT,
    GONE,
    NEXT,
    PREVIOUS,
    Keyring,
    RotationPlan,
    SigningKey,
    TokenSigner,
)
from sidecar.keys.material import PrivateKey, generate_private_key
from tests.unit.support import signing_key

T0 = 1_700_000_000.0
HOUR = 3600.0
DAY = 24 * HOUR
PUBLISH_AHEAD = 15 * 60.0
RETAIN_AFTER = 15 * 60.0


@pytest.fixture(scope="module")
def private_keys() -> list[PrivateKey]:
    return [generate_private_key("ES256") for _ in range(4)]


@pytest.fixture
def rotated(private_keys: list[PrivateKey]) -> tuple[SigningKey, SigningKey, SigningKey]:
    """A previous key (retired at T0), the current key, and its published successor."""
    previous = signing_key(
        private_keys[0], activates_at=T0 - DAY, retires_at=T0, removes_at=T0 + RETAIN_AFTER
    )
    current = signing_key(
        private_keys[1],
        activates_at=T0,
        retires_at=T0 + DAY,
        removes_at=T0 + DAY + RETAIN_AFTER,
    )
    upcoming = signing_key(private_keys[2], activates_at=T0 + DAY, created_at=T0 + DAY - 900)
    return previous, current, upcoming


# --- states -------------------------------------------------------------------------------------


def test_a_key_moves_through_next_current_previous_gone(private_keys: list[PrivateKey]) -> None:
    key = signing_key(
        private_keys[0], activates_at=T0, retires_at=T0 + DAY, removes_at=T0 + DAY + 900
    )

    assert key.state(T0 - 1) == NEXT
    assert key.state(T0) == CURRENT
    assert key.state(T0 + DAY - 1) == CURRENT
    assert key.state(T0 + DAY) == PREVIOUS
    assert key.state(T0 + DAY + 899) == PREVIOUS
    assert key.state(T0 + DAY + 900) == GONE
    assert key.state(T0 + 10 * DAY) == GONE


def test_a_key_without_retirement_stays_current(private_keys: list[PrivateKey]) -> None:
    key = signing_key(private_keys[0], activates_at=T0)
    assert key.state(T0 + 1000 * DAY) == CURRENT


def test_signing_key_repr_hides_the_private_key(private_keys: list[PrivateKey]) -> None:
    assert "private_key" not in repr(signing_key(private_keys[0], activates_at=T0))


# --- current, published, jwks -------------------------------------------------------------------


def test_current_is_the_key_that_signs_now(rotated: tuple[SigningKey, ...]) -> None:
    previous, current, upcoming = rotated
    keyring = Keyring([upcoming, current, previous])

    assert keyring.current(T0 - 1) is previous
    assert keyring.current(T0) is current
    assert keyring.current(T0 + DAY - 1) is current
    assert keyring.current(T0 + DAY) is upcoming


def test_upcoming_is_the_published_key_not_yet_signing(rotated: tuple[SigningKey, ...]) -> None:
    _, current, upcoming = rotated
    keyring = Keyring(list(rotated))

    assert keyring.upcoming(T0 + 1) is upcoming
    assert keyring.upcoming(T0 + DAY) is None
    assert Keyring([current]).upcoming(T0) is None


def test_of_two_current_keys_the_one_activated_last_signs(
    private_keys: list[PrivateKey],
) -> None:
    older = signing_key(private_keys[0], activates_at=T0 - HOUR)
    newer = signing_key(private_keys[1], activates_at=T0)
    assert Keyring([newer, older]).current(T0 + 1) is newer
    assert Keyring([older, newer]).current(T0 + 1) is newer


def test_no_current_key_in_an_empty_keyring() -> None:
    keyring = Keyring([])
    assert keyring.current(T0) is None
    assert keyring.published(T0) == []
    assert keyring.jwks(T0) == {"keys": []}


def test_no_current_key_when_the_only_key_is_retired(private_keys: list[PrivateKey]) -> None:
    retired = signing_key(
        private_keys[0], activates_at=T0 - DAY, retires_at=T0 - 1, removes_at=T0 + 900
    )
    assert Keyring([retired]).current(T0) is None


def test_published_keys_are_next_current_and_previous(rotated: tuple[SigningKey, ...]) -> None:
    previous, current, upcoming = rotated
    keyring = Keyring(list(rotated))

    assert {k.kid for k in keyring.published(T0 + 1)} == {previous.kid, current.kid, upcoming.kid}
    # Once the previous key's retention has passed it is no longer published.
    later = T0 + RETAIN_AFTER
    assert {k.kid for k in keyring.published(later)} == {current.kid, upcoming.kid}


def test_jwks_holds_the_public_jwks_of_published_keys(rotated: tuple[SigningKey, ...]) -> None:
    _, current, upcoming = rotated
    jwks = Keyring(list(rotated)).jwks(T0 + RETAIN_AFTER)

    assert jwks == {"keys": [current.public_jwk, upcoming.public_jwk]}
    for jwk in jwks["keys"]:
        assert "d" not in jwk
        assert jwk["use"] == "sig"


def test_find_by_kid(rotated: tuple[SigningKey, ...]) -> None:
    keyring = Keyring(list(rotated))
    assert keyring.find(rotated[1].kid) is rotated[1]
    assert keyring.find("unknown") is None


# --- rotation -----------------------------------------------------------------------------------


def test_rotation_is_due_publish_ahead_before_the_key_is_rotate_every_old(
    private_keys: list[PrivateKey],
) -> None:
    keyring = Keyring([signing_key(private_keys[0], activates_at=T0)])
    due_at = T0 + DAY - PUBLISH_AHEAD

    def due(now: float) -> bool:
        return keyring.rotation_due(now, rotate_every=DAY, publish_ahead=PUBLISH_AHEAD)

    assert not due(T0)
    assert not due(due_at - 1)
    assert due(due_at)
    assert due(T0 + 2 * DAY)


def test_rotation_is_not_due_while_a_next_key_is_published(
    rotated: tuple[SigningKey, ...],
) -> None:
    keyring = Keyring(list(rotated))
    now = T0 + DAY - 1  # the current key is old enough, but its successor is already published
    assert not keyring.rotation_due(now, rotate_every=DAY, publish_ahead=PUBLISH_AHEAD)


def test_rotation_is_not_due_without_a_current_key() -> None:
    assert not Keyring([]).rotation_due(T0, rotate_every=DAY, publish_ahead=PUBLISH_AHEAD)


def test_planned_rotation_publishes_ahead_and_retains_after(
    private_keys: list[PrivateKey],
) -> None:
    current = signing_key(private_keys[0], activates_at=T0 - DAY)
    now = T0

    plan = Keyring([current]).plan_rotation(
        now, publish_ahead=PUBLISH_AHEAD, retain_after=RETAIN_AFTER
    )

    assert plan == RotationPlan(
        activates_at=now + PUBLISH_AHEAD,
        retiring_kid=current.kid,
        retires_at=now + PUBLISH_AHEAD,
        removes_at=now + PUBLISH_AHEAD + RETAIN_AFTER,
    )


def test_immediate_rotation_activates_now(private_keys: list[PrivateKey]) -> None:
    current = signing_key(private_keys[0], activates_at=T0 - DAY)

    plan = Keyring([current]).plan_rotation(
        T0, publish_ahead=PUBLISH_AHEAD, retain_after=RETAIN_AFTER, immediate=True
    )

    assert plan.activates_at == T0
    assert plan.retires_at == T0
    assert plan.removes_at == T0 + RETAIN_AFTER


def test_rotation_without_a_current_key_activates_at_once() -> None:
    plan = Keyring([]).plan_rotation(T0, publish_ahead=PUBLISH_AHEAD, retain_after=RETAIN_AFTER)
    assert plan == RotationPlan(T0, None, None, None)


def test_applying_a_plan_hands_over_signing_without_a_gap(private_keys: list[PrivateKey]) -> None:
    old = signing_key(private_keys[0], activates_at=T0 - DAY)
    plan = Keyring([old]).plan_rotation(T0, publish_ahead=PUBLISH_AHEAD, retain_after=RETAIN_AFTER)
    old_after = signing_key(
        private_keys[0],
        activates_at=old.activates_at,
        retires_at=plan.retires_at,
        removes_at=plan.removes_at,
    )
    new = signing_key(private_keys[1], activates_at=plan.activates_at, created_at=T0)
    keyring = Keyring([old_after, new])

    for now in (T0, T0 + PUBLISH_AHEAD - 1):
        assert keyring.current(now) is old_after
        assert {k.kid for k in keyring.published(now)} == {old.kid, new.kid}
    for now in (T0 + PUBLISH_AHEAD, T0 + PUBLISH_AHEAD + RETAIN_AFTER - 1):
        assert keyring.current(now) is new
        assert {k.kid for k in keyring.published(now)} == {old.kid, new.kid}
    assert [k.kid for k in keyring.published(T0 + PUBLISH_AHEAD + RETAIN_AFTER)] == [new.kid]


# --- signing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["ES256", "EdDSA", "RS256", "PS256"])
def test_signed_token_verifies_with_the_published_jwk(algorithm: str) -> None:
    key = signing_key(generate_private_key(algorithm), activates_at=T0, algorithm=algorithm)
    claims: dict[str, Any] = {"iss": "https://sidecar.test.example", "sub": "alice", "aud": "up"}

    token = TokenSigner().sign(claims, key)

    header = jwt.get_unverified_header(token)
    assert header["typ"] == "at+jwt"
    assert header["kid"] == key.kid
    assert header["alg"] == algorithm
    verified = jwt.decode(token, jwt.PyJWK(key.public_jwk), algorithms=[algorithm], audience="up")
    assert verified == claims


def test_signed_token_does_not_verify_with_another_key(private_keys: list[PrivateKey]) -> None:
    key = signing_key(private_keys[0], activates_at=T0)
    other = signing_key(private_keys[1], activates_at=T0)
    token = TokenSigner().sign({"sub": "alice"}, key)
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(token, jwt.PyJWK(other.public_jwk), algorithms=["ES256"])
