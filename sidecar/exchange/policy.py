"""The exchange policy decision (DESIGN §2 steps 3 and 4): which targets a client may get a token
for, with which scopes, for how long. Pure: the policies arrive as a :class:`PolicySet`.

RFC 8693 §2.2.2 names ``invalid_target`` for "the authorization server is unwilling or unable to
issue a token for any target service indicated by the resource or audience parameters"; a request
naming several targets is refused as a whole if any one of them is not allowed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sidecar.errors import InvalidRequestError, InvalidScopeError, InvalidTargetError
from sidecar.exchange.subject import VerifiedToken


@dataclass(frozen=True, slots=True)
class Policy:
    client_id: str
    audience: str
    scopes: frozenset[str]
    default_scopes: frozenset[str]
    ttl: int
    enabled: bool = True
    require_subject_scopes: bool = False
    copy_claims: tuple[str, ...] = ()


class PolicySet:
    """An immutable index of policies by (client, audience), built once per refresh."""

    def __init__(self, policies: Iterable[Policy]) -> None:
        self._by_target = {(p.client_id, p.audience): p for p in policies}

    def __len__(self) -> int:
        return len(self._by_target)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._by_target.values())

    def find(self, client_id: str, target: str) -> Policy | None:
        return self._by_target.get((client_id, target))


@dataclass(frozen=True, slots=True)
class Decision:
    audiences: tuple[str, ...]
    scopes: tuple[str, ...]
    lifetime: int  # seconds
    copy_claims: tuple[str, ...]
    policies: tuple[Policy, ...]


def _policies_for(client_id: str, targets: tuple[str, ...], policies: PolicySet) -> list[Policy]:
    found = []
    for target in targets:
        policy = policies.find(client_id, target)
        if policy is None:
            raise InvalidTargetError(reason="no policy for the client and target")
        if not policy.enabled:
            raise InvalidTargetError(reason="the policy for the client and target is disabled")
        found.append(policy)
    return found


def _narrow_scopes(
    requested: tuple[str, ...] | None, policies: list[Policy], subject: VerifiedToken
) -> tuple[str, ...]:
    allowed = frozenset.intersection(*(p.scopes for p in policies))
    require_subject = any(p.require_subject_scopes for p in policies)
    if requested is None:
        granted = frozenset.intersection(*(p.default_scopes for p in policies))
        if require_subject:
            granted &= subject.scopes
    else:
        granted = frozenset(requested)
        if not granted <= allowed:
            raise InvalidScopeError(reason="a requested scope is not allowed by the policy")
        if require_subject and not granted <= subject.scopes:
            raise InvalidScopeError(reason="a requested scope is not in the subject token")
    if not granted:
        # A token with no scope grants nothing useful and usually means a misconfiguration.
        raise InvalidScopeError(reason="no scope would be granted")
    return tuple(sorted(granted))


def decide(
    client_id: str,
    targets: tuple[str, ...],
    requested_scopes: tuple[str, ...] | None,
    subject: VerifiedToken,
    policies: PolicySet,
    *,
    max_ttl: int,
    now: int,
) -> Decision:
    """Decide an exchange, or raise the protocol error that refuses it (with a ``reason``)."""
    matched = _policies_for(client_id, targets, policies)
    scopes = _narrow_scopes(requested_scopes, matched, subject)
    # Lifetime = min(policy TTL, global maximum, the subject token's remaining lifetime):
    # a minted token never outlives the token it was exchanged for.
    lifetime = min(min(p.ttl for p in matched), max_ttl, subject.expires_at - now)
    if lifetime <= 0:
        raise InvalidRequestError("The token is invalid.", reason="subject token has expired")
    copy_claims = tuple(
        name for name in matched[0].copy_claims if all(name in p.copy_claims for p in matched)
    )
    return Decision(
        audiences=targets,
        scopes=scopes,
        lifetime=lifetime,
        copy_claims=copy_claims,
        policies=tuple(matched),
    )
