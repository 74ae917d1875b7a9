"""The ``policies:`` entries of a configuration or policy file, and the checks of a whole policy
set against the settings (clients, issuers, ``tokens.max_ttl``) and against itself (names used
twice, enabled policies that could match the same request)."""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

from pydantic import Field, StrictBool, StrictInt, StrictStr, field_validator, model_validator

from sidecar.config.common import OMNIBUS_SCOPES, StrictModel
from sidecar.exchange.policy import Condition, Policy, could_overlap, default_policy_name
from sidecar.exchange.request import SCOPE_TOKEN

if TYPE_CHECKING:
    from sidecar.config.models import Settings

# A claim value a condition compares with: exactly the JSON scalars a claim can hold.
ClaimValue = StrictStr | StrictBool | StrictInt


class ConditionConfig(StrictModel):
    """One condition on a verified subject-token claim: exactly one of the three."""

    equals: ClaimValue | None = None
    one_of: list[ClaimValue] | None = Field(default=None, min_length=1)
    contains: ClaimValue | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> ConditionConfig:
        operators = ("equals", "one_of", "contains")
        given = [name for name in operators if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of equals, one_of, contains")
        if self.contains == "":
            raise ValueError("contains must not be empty")
        return self

    def to_condition(self, claim: str) -> Condition:
        if self.one_of is not None:
            # A set: the order in the file is not a change.
            values = sorted(set(self.one_of), key=lambda v: (type(v).__name__, str(v)))
            return Condition(claim, "one_of", tuple(values))
        if self.equals is not None:
            return Condition(claim, "equals", (self.equals,))
        return Condition(claim, "contains", (self.contains,))


# The admin API's sub-resources of /admin/policies/NAME: no name may end like one.
SUBRESOURCES = ("/history", "/disable", "/enable", "/rollback")


class PolicyConfig(StrictModel):
    # Unique; defaults to "CLIENT -> AUDIENCE". Names a policy in history and rollback.
    name: str | None = Field(default=None, min_length=1, max_length=255)
    client_id: str = Field(min_length=1)
    audience: str = Field(min_length=1, max_length=2048)
    # Only subject tokens from this trusted issuer.
    issuer: str | None = None
    # Conditions on the verified subject-token claims; all must hold.
    subject: dict[str, ConditionConfig] = Field(default_factory=dict)
    scopes: list[str] = Field(min_length=1)
    default_scopes: list[str] = Field(default_factory=list)
    ttl: int = Field(120, ge=1)
    enabled: bool = True
    # Requested (and default) scopes must also be present in the subject token's scopes.
    require_subject_scopes: bool = False
    # A still-fresh token minted under this policy may be handed out again for an identical
    # request (caches.minted_tokens); false for an upstream that accepts each jti once.
    reuse_tokens: bool = True
    # Claims copied from the verified subject token into the minted token (an allowlist).
    copy_claims: list[str] = Field(default_factory=list)
    # What the client gets for the audience: our own token (mint), the upstream's static API
    # key (static), or a token from the upstream's own authorization server
    # (client_credentials); the last two name a configured `upstreams:` entry.
    credential: Literal["mint", "static", "client_credentials"] = "mint"
    upstream: str | None = Field(default=None, min_length=1, max_length=64)

    @field_validator("scopes", "default_scopes")
    @classmethod
    def _scope_syntax(cls, value: list[str]) -> list[str]:
        for scope in value:
            if not SCOPE_TOKEN.match(scope):
                raise ValueError(f"{scope!r} is not a valid scope token (RFC 6749 §3.3)")
            if scope.lower() in OMNIBUS_SCOPES or scope.endswith("*"):
                raise ValueError(f"{scope!r} is an omnibus scope; list the scopes explicitly")
        if len(set(value)) != len(value):
            raise ValueError("lists a scope twice")
        return value

    @field_validator("copy_claims")
    @classmethod
    def _copyable(cls, value: list[str]) -> list[str]:
        from sidecar.exchange.claims import RESERVED_CLAIMS

        for name in value:
            if name in RESERVED_CLAIMS:
                raise ValueError(f"{name!r} is set by the sidecar and cannot be copied")
        return value

    @model_validator(mode="after")
    def _defaults_within_allowed(self) -> PolicyConfig:
        outside = set(self.default_scopes) - set(self.scopes)
        if outside:
            raise ValueError(f"default_scopes {sorted(outside)} are not in scopes")
        return self

    @model_validator(mode="after")
    def _credential_has_its_upstream(self) -> PolicyConfig:
        if self.credential == "mint" and self.upstream is not None:
            raise ValueError("upstream is only for credential static or client_credentials")
        if self.credential != "mint" and self.upstream is None:
            raise ValueError(f"credential {self.credential} needs an upstream (one of upstreams)")
        return self

    @model_validator(mode="after")
    def _name_not_a_subresource(self) -> PolicyConfig:
        # The admin API addresses /admin/policies/NAME/history and NAME/disable. Servers that
        # decode %2F before the app sees the path (granian) cannot tell "a%2Fhistory" from the
        # history of "a": no name may end like a sub-resource, so both read the same way.
        name = self.name or default_policy_name(self.client_id, self.audience)
        if name.endswith(SUBRESOURCES):
            raise ValueError(
                "a policy name must not end with " + ", ".join(SUBRESOURCES) + " (admin API paths)"
            )
        return self

    @model_validator(mode="after")
    def _name_fits(self) -> PolicyConfig:
        # The name column holds 255 characters; PostgreSQL refuses a longer value outright.
        if self.name is None and len(default_policy_name(self.client_id, self.audience)) > 255:
            raise ValueError(
                "the default name (CLIENT -> AUDIENCE) would be longer than 255 characters; "
                "give the policy a name"
            )
        return self

    def to_policy(self) -> Policy:
        return Policy(
            name=self.name or default_policy_name(self.client_id, self.audience),
            client_id=self.client_id,
            audience=self.audience,
            scopes=frozenset(self.scopes),
            default_scopes=frozenset(self.default_scopes),
            ttl=self.ttl,
            enabled=self.enabled,
            require_subject_scopes=self.require_subject_scopes,
            reuse_tokens=self.reuse_tokens,
            copy_claims=tuple(self.copy_claims),
            credential=self.credential,
            upstream=self.upstream,
            issuer=self.issuer,
            conditions=tuple(
                self.subject[claim].to_condition(claim) for claim in sorted(self.subject)
            ),
        )


@dataclass(frozen=True)
class Origins:
    """Where the policies being checked come from, so that a message names what the user wrote:
    ``by_name`` maps a policy name to e.g. ``"policies.yaml, line 12"``; the others are
    ``elsewhere`` (e.g. ``"in the database, not in policies.yaml"``), and ``hint`` says how to
    remove those (``--prune``)."""

    by_name: Mapping[str, str]
    elsewhere: str | None = None
    hint: str | None = None

    def of(self, policy: Policy) -> str:
        where = self.by_name.get(policy.name, self.elsewhere)
        return f'policy "{policy.name}"' + (f" ({where})" if where else "")


# Set by a command that writes a file's policies (``policy apply``) around the write, so that
# the check of the resulting set, made deep in the store, names the file and its lines.
ORIGINS: ContextVar[Origins | None] = ContextVar("policy_origins", default=None)


def validate_policies(
    policies: list[PolicyConfig],
    settings: Settings,
    labels: list[str] | None = None,
    *,
    elsewhere: str | None = None,
    hint: str | None = None,
) -> None:
    """Cross-checks the ``policies:`` of a file against the settings and each other; ``labels``
    say where each one is (``FILE, line N``; default ``policies[i]``)."""
    labels = labels or [f"policies[{i}]" for i in range(len(policies))]
    built = [config.to_policy() for config in policies]
    first: dict[str, int] = {}
    for index, policy in enumerate(built):
        if policy.name in first:
            raise ValueError(
                f'policy "{policy.name}" ({labels[index]}): the name is already used by the '
                f"policy at {labels[first[policy.name]]}; {RENAME}"
            )
        first[policy.name] = index
    origins = Origins(
        {p.name: label for p, label in zip(built, labels, strict=True)}, elsewhere, hint
    )
    check_policy_set(built, settings, origins)


# The fix for a name used twice (a policy without ``name:`` is named "CLIENT -> AUDIENCE").
RENAME = "give each a name of its own (name:; two for the same client and audience need one)"


def check_policy_set(
    policies: list[Policy], settings: Settings, origins: Origins | None = None
) -> None:
    """Checks a whole policy set; raises ValueError naming the policy (and where it came from):
    unknown client or issuer, ttl above tokens.max_ttl, a name used twice, and two enabled
    policies that could both match the same request (with the fix)."""
    origins = origins or ORIGINS.get() or Origins({})
    client_ids = {c.client_id for c in settings.clients}
    issuers = {i.issuer for i in settings.trusted_issuers}
    upstreams = {u.name: u for u in settings.upstreams}
    seen: dict[str, Policy] = {}
    for policy in policies:
        where = origins.of(policy)
        if policy.client_id not in client_ids:
            raise ValueError(
                f"{where}: client_id {policy.client_id!r} is not one of the configured clients"
            )
        if policy.issuer is not None and policy.issuer not in issuers:
            raise ValueError(f"{where}: issuer {policy.issuer!r} is not one of the trusted_issuers")
        if policy.upstream is not None:
            upstream = upstreams.get(policy.upstream)
            if upstream is None:
                raise ValueError(f"{where}: upstream {policy.upstream} is not in upstreams")
            if upstream.mode != policy.credential:
                raise ValueError(
                    f"{where}: credential {policy.credential} does not fit upstream "
                    f"{policy.upstream}, whose credentials are {upstream.credentials.type}"
                )
            if getattr(
                upstream.credentials, "audience_parameter", None
            ) == "resource" and not _absolute_uri(policy.audience):
                raise ValueError(
                    f"{where}: upstream {policy.upstream} is asked with resource=AUDIENCE "
                    "(RFC 8707: an absolute URI); make the audience one, or set the "
                    "upstream's audience_parameter to audience or none"
                )
        if policy.ttl > settings.tokens.max_ttl:
            raise ValueError(
                f"{where}: ttl {policy.ttl} exceeds tokens.max_ttl ({settings.tokens.max_ttl})"
            )
        if policy.name in seen:
            fix = _with_hint(RENAME, origins, policy)
            raise ValueError(
                f"{where}: the name is already used by {origins.of(seen[policy.name])}; {fix}"
            )
        for other in seen.values():
            if could_overlap(policy, other):
                fix = _with_hint(
                    "make their issuer or subject conditions exclusive, or disable one",
                    origins,
                    policy,
                    other,
                )
                raise ValueError(
                    f"{where} could match the same requests as {origins.of(other)}: {fix}"
                )
        seen[policy.name] = policy


def _with_hint(fix: str, origins: Origins, *policies: Policy) -> str:
    """``fix``, and the origins' hint (``--prune``) when one of ``policies`` is only in the
    database, whichever order the set came in."""
    if origins.hint and any(p.name not in origins.by_name for p in policies):
        return f"{fix}; {origins.hint}"
    return fix


def _absolute_uri(value: str) -> bool:
    parts = urlsplit(value)
    return bool(parts.scheme and parts.netloc) and not parts.fragment
