"""The exchange policy decision (RFC 8693 §2.2.2 ``invalid_target``, RFC 6749 §3.3 scope): which
targets a client may get a token for, for which subjects, with which scopes, for how long. Pure: the
policies arrive as a :class:`PolicySet`. ``/token`` and ``sidecar policy explain`` both call
:func:`decide`, so they cannot disagree.

RFC 8693 §2.2.2 names ``invalid_target`` for "the authorization server is unwilling or unable to
issue a token for any target service indicated by the resource or audience parameters"; a request
naming several targets is refused as a whole if any one of them is not allowed.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from sidecar.errors import InvalidRequestError, InvalidScopeError, InvalidTargetError
from sidecar.exchange.subject import VerifiedToken

Operator = Literal["equals", "one_of", "contains"]
_DEFAULT_PORTS = {"http": 80, "https": 443}
# Credential modes (the policy's ``credential``).
MINT, STATIC, CLIENT_CREDENTIALS = "mint", "static", "client_credentials"
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


@functools.lru_cache(maxsize=4096)
def normalize_audience(audience: str) -> str:
    """The form in which audiences are compared: for an absolute URI, the scheme and host are
    lowercased (ASCII only: ``str.lower`` would fold look-alikes such as the Kelvin sign into
    ASCII) and a default port is dropped; nothing else changes. Other values compare exactly."""
    try:
        parts = urlsplit(audience)
        port = parts.port
    except ValueError:
        return audience
    prefix = f"{parts.scheme}://{parts.netloc}"  # urlsplit lowercases the scheme only
    if (
        not parts.hostname
        or not parts.netloc.isascii()
        or audience[: len(prefix)].translate(_ASCII_LOWER) != prefix.translate(_ASCII_LOWER)
    ):
        return audience
    scheme = parts.scheme.translate(_ASCII_LOWER)
    userinfo, _, hostport = parts.netloc.rpartition("@")
    host = hostport.rsplit(":", 1)[0] if port is not None or hostport.endswith(":") else hostport
    netloc = (f"{userinfo}@" if userinfo else "") + host.translate(_ASCII_LOWER)
    if port is not None and port != _DEFAULT_PORTS.get(scheme):
        netloc += f":{port}"
    # Everything after the authority is kept byte for byte (an empty "?" included).
    return f"{scheme}://{netloc}{audience[len(prefix) :]}"


@dataclass(frozen=True, slots=True, eq=False)
class Condition:
    """A condition on one verified claim of the subject token.

    - ``equals``: the claim equals the value;
    - ``one_of``: the claim equals one of the values;
    - ``contains``: the claim is a list holding the value, or a space-separated string with it.
    """

    claim: str
    operator: Operator
    values: tuple[Any, ...]  # one value for equals/contains, several for one_of

    # Typed, like the matching: `equals: true` and `equals: 1` hold for different tokens, so a
    # policy changed from one to the other has changed (Python's True == 1 would hide it).
    def _key(self) -> tuple[Any, ...]:
        return (self.claim, self.operator, tuple((type(v), v) for v in self.values))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Condition):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def holds(self, claims: Mapping[str, Any]) -> bool:
        if self.claim not in claims:
            return False
        actual = claims[self.claim]
        if self.operator == "contains":
            if isinstance(actual, str):
                return self.values[0] in actual.split(" ")
            return isinstance(actual, list) and _member(self.values[0], actual)
        if isinstance(actual, list | dict):
            return False
        return _member(actual, self.values)

    def describe(self) -> str:
        shown = list(self.values) if self.operator == "one_of" else self.values[0]
        return f"{self.claim} {self.operator} {_as_written(shown)}"


def _as_written(value: Any) -> str:
    """A condition's value as a policy file spells it: true/false/null as in YAML (not Python's
    True), strings quoted."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[" + ", ".join(_as_written(v) for v in value) + "]"
    return repr(value)


def _member(value: Any, candidates: Iterable[Any]) -> bool:
    # Typed equality: True must not equal 1, nor "1" equal 1.
    return any(type(value) is type(c) and value == c for c in candidates)


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
    issuer: str | None = None  # only subject tokens of this issuer
    conditions: tuple[Condition, ...] = ()
    name: str = field(default="")
    # Whether a still-fresh token minted under this policy may be handed out again for an
    # identical request (caches.minted_tokens); off for an upstream that takes each jti once.
    reuse_tokens: bool = True
    # What the client gets: "mint" (our own token), "static" or "client_credentials" (the
    # credential of the configured upstream named by ``upstream``).
    credential: str = MINT
    upstream: str | None = None

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", default_policy_name(self.client_id, self.audience))

    def refusal(self, subject: VerifiedToken) -> str | None:
        """Why this policy does not apply to ``subject``, or None if it does."""
        if not self.enabled:
            return f"policy {self.name}: disabled"
        if self.issuer is not None and subject.issuer != self.issuer:
            return f"policy {self.name}: subject issuer is not {self.issuer}"
        for condition in self.conditions:
            if not condition.holds(subject.claims):
                return f"policy {self.name}: condition failed: {condition.describe()}"
        return None


def default_policy_name(client_id: str, audience: str) -> str:
    return f"{client_id} -> {audience}"


class PolicySet:
    """An immutable index of policies by (client, normalised audience), built once per refresh."""

    def __init__(self, policies: Iterable[Policy]) -> None:
        self._policies = tuple(policies)
        # Set by the store: what the table looked like when this set was read from it, and the
        # version of each policy.
        self.marker: tuple[Any, ...] | None = None
        self.versions: dict[str, int] = {}
        self._by_target: dict[tuple[str, str], list[Policy]] = {}
        for policy in self._policies:
            key = (policy.client_id, normalize_audience(policy.audience))
            self._by_target.setdefault(key, []).append(policy)

    def version_of(self, name: str) -> int | None:
        return self.versions.get(name)

    def __len__(self) -> int:
        return len(self._policies)

    def __iter__(self) -> Iterator[Policy]:
        return iter(self._policies)

    def candidates(self, client_id: str, target: str) -> list[Policy]:
        return self._by_target.get((client_id, normalize_audience(target)), [])

    def find(self, client_id: str, target: str) -> Policy | None:
        """The first policy for (client, target), whatever its conditions."""
        found = self.candidates(client_id, target)
        return found[0] if found else None


@dataclass(frozen=True, slots=True)
class Decision:
    audiences: tuple[str, ...]
    scopes: tuple[str, ...]
    lifetime: int  # seconds
    copy_claims: tuple[str, ...]
    policies: tuple[Policy, ...]
    credential: str = MINT
    upstream: str | None = None  # for static and client_credentials

    @property
    def reuse_tokens(self) -> bool:
        """Every matched policy allows reusing a minted token."""
        return all(p.reuse_tokens for p in self.policies)


def _policy_for(client_id: str, target: str, subject: VerifiedToken, policies: PolicySet) -> Policy:
    candidates = policies.candidates(client_id, target)
    if not candidates:
        raise InvalidTargetError(reason="no policy for the client and target")
    refusals = []
    matching = []
    for policy in candidates:
        refusal = policy.refusal(subject)
        if refusal is None:
            matching.append(policy)
        else:
            refusals.append(refusal)
    if len(matching) > 1:
        # Validation refuses overlapping enabled policies; if it ever happens, fail closed.
        names = ", ".join(p.name for p in matching)
        raise InvalidTargetError(reason=f"ambiguous: several policies match: {names}")
    if not matching:
        raise InvalidTargetError(reason="; ".join(refusals))
    return matching[0]


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
            outside = " ".join(sorted(granted - allowed))
            raise InvalidScopeError(reason=f"scope not allowed by the policy: {outside}")
        if require_subject and not granted <= subject.scopes:
            missing = " ".join(sorted(granted - subject.scopes))
            raise InvalidScopeError(reason=f"scope not in the subject token: {missing}")
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
    """Decide an exchange, or raise the protocol error that refuses it; its ``reason`` names the
    policy and the rule that refused (for the audit trail and ``policy explain``, never the
    client)."""
    matched = [_policy_for(client_id, target, subject, policies) for target in targets]
    credential, upstream = matched[0].credential, matched[0].upstream
    if len(matched) > 1 and any(p.credential != MINT for p in matched):
        # One credential of an upstream's own is good for that upstream alone.
        names = ", ".join(p.name for p in matched if p.credential != MINT)
        raise InvalidTargetError(
            reason=f"policy {names}: an upstream credential is issued for its audience alone"
        )
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
        # The policies' own audiences: an upstream compares `aud` with the identifier it was
        # configured with, not with the variant a gateway happened to send.
        audiences=tuple(dict.fromkeys(p.audience for p in matched)),
        scopes=scopes,
        lifetime=lifetime,
        copy_claims=copy_claims,
        policies=tuple(matched),
        credential=credential,
        upstream=upstream,
    )


def _disjoint(a: Condition, b: Condition) -> bool:
    """True when no claim value can satisfy both conditions on the same claim."""
    if a.claim != b.claim or "contains" in (a.operator, b.operator):
        return False
    return not any(_member(value, b.values) for value in a.values)


def could_overlap(a: Policy, b: Policy) -> bool:
    """Whether one request could match both policies (both enabled, same client and audience,
    issuer filters and subject conditions not provably exclusive). Conservative: when unsure,
    it says they overlap."""
    if not (a.enabled and b.enabled) or a.client_id != b.client_id:
        return False
    if normalize_audience(a.audience) != normalize_audience(b.audience):
        return False
    if a.issuer is not None and b.issuer is not None and a.issuer != b.issuer:
        return False
    return not any(_disjoint(x, y) for x in a.conditions for y in b.conditions)
