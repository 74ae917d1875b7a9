"""The configuration: one YAML file, read once at start-up into one typed, validated object.

``${NAME}`` in any string is replaced by the environment variable NAME (``$${`` writes a literal
``${``); a missing variable, an unknown key or a bad value is a :class:`ConfigError` whose message
names the key path, e.g. ``trusted_issuers[0].algorithms[1]: ...``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from sidecar.exchange.policy import Condition, Policy, could_overlap, default_policy_name

TOKEN_EXCHANGE_GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"

# Only asymmetric algorithms: an HMAC "key" would be the issuer's public key, which is the
# classic algorithm-confusion attack, and "none" is never acceptable.
SubjectAlgorithm = Literal[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"
]
SigningAlgorithm = Literal["ES256", "EdDSA", "RS256", "PS256"]

# Scope values that grant "everything" defeat the point of narrowing; refused in any policy.
OMNIBUS_SCOPES = frozenset({"*", "all", "any", "root", "admin:*"})
# RFC 6749 §3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
SCOPE_TOKEN = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]+$")

_DURATION = re.compile(r"^\s*(\d+)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
# `$${` (an escaped literal), `${NAME}`, or an unterminated `${` (an error, not a literal).
_ENV_REF = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key path and the problem."""


def parse_duration(value: Any) -> float:
    """``90``, ``"90s"``, ``"15m"``, ``"24h"``, ``"7d"``, ``"500ms"`` -> seconds."""
    if isinstance(value, bool):
        raise ValueError("must be a duration such as 30s, 15m or 24h")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = int(match.group(1)) * _UNITS[match.group(2)]
    else:
        raise ValueError("must be a duration such as 30s, 15m or 24h")
    if seconds < 0:
        raise ValueError("must not be negative")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False)


def _check_http_url(value: str, *, allow_path: bool = True) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError("must be an absolute http(s) URL")
    if parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError("must use https (plain http is allowed only on loopback)")
    if parts.query or parts.fragment:
        raise ValueError("must not have a query or fragment")
    if not allow_path and parts.path not in ("", "/"):
        raise ValueError("must not have a path")
    return value


class TokensConfig(_Strict):
    algorithm: SigningAlgorithm = "ES256"
    max_ttl: int = Field(300, ge=10, le=3600)
    leeway: int = Field(30, ge=0, le=300)


class KeysConfig(_Strict):
    rotate_every: Duration = 24 * 3600.0
    publish_ahead: Duration = 15 * 60.0
    retain_after: Duration = 15 * 60.0
    encryption_key: SecretStr | None = None
    # How often every worker re-reads the keyring (seconds): the bound on how long a rotation
    # takes to reach every worker of every replica.
    refresh_interval: Duration = 10.0
    # A directory of PEM private keys (e.g. a mounted Secret) instead of the database keyring.
    directory: Path | None = None

    @model_validator(mode="after")
    def _one_keyring(self) -> KeysConfig:
        if self.directory is not None and self.encryption_key is not None:
            raise ValueError(
                "encryption_key encrypts keys stored in the database; it cannot be used with "
                "directory (protect the directory's files instead)"
            )
        return self

    @field_validator("rotate_every")
    @classmethod
    def _rotate_not_tiny(cls, value: float) -> float:
        if value < 60:
            raise ValueError("must be at least 60s")
        return value

    @field_validator("encryption_key")
    @classmethod
    def _encryption_key_strength(cls, value: SecretStr | None) -> SecretStr | None:
        # An empty key (an exported but empty variable) would silently store keys in clear
        # text: a start-up error naming the key path. A short one is a warning (weaknesses()).
        if value is not None and not value.get_secret_value():
            raise ValueError("must not be empty")
        return value


class TrustedIssuerConfig(_Strict):
    issuer: str
    jwks_uri: str | None = None
    jwks_file: Path | None = None
    audiences: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1)
    algorithms: list[SubjectAlgorithm] = Field(default_factory=lambda: ["RS256", "ES256"])  # type: ignore[arg-type]
    # Scheduled refresh of the issuer's JWKS, and the minimum gap between two refetches that an
    # unknown `kid` may trigger (so a flood of unknown kids cannot hammer the IdP).
    refresh_interval: Duration = 300.0
    min_refetch_interval: Duration = 30.0
    fetch_timeout: Duration = 3.0
    # While the JWKS cannot be fetched, cached keys keep verifying for at most this long after
    # the last successful fetch; then subject tokens of this issuer get 503.
    max_stale: Duration = 3600.0

    @model_validator(mode="after")
    def _stale_after_refresh(self) -> TrustedIssuerConfig:
        if self.max_stale < self.refresh_interval:
            raise ValueError("max_stale must be at least refresh_interval")
        return self

    @field_validator("issuer")
    @classmethod
    def _issuer_url(cls, value: str) -> str:
        # Compared byte for byte with `iss`; no normalisation is applied, by design.
        return _check_http_url(value)

    @field_validator("jwks_uri")
    @classmethod
    def _jwks_url(cls, value: str | None) -> str | None:
        return None if value is None else _check_http_url(value)

    @field_validator("algorithms")
    @classmethod
    def _algorithms_present(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("must list at least one algorithm")
        return value

    @model_validator(mode="after")
    def _one_key_source(self) -> TrustedIssuerConfig:
        if (self.jwks_uri is None) == (self.jwks_file is None):
            raise ValueError("exactly one of jwks_uri or jwks_file is required")
        return self


class RateLimitConfig(_Strict):
    """A token bucket: ``per_second`` requests sustained, ``burst`` at once (per worker)."""

    per_second: float = Field(gt=0)
    burst: int = Field(ge=1)


class ClientConfig(_Strict):
    client_id: str = Field(min_length=1, max_length=255)
    client_secret: SecretStr | None = None
    jwks: dict[str, Any] | None = None
    jwks_uri: str | None = None
    # This client's own limit, instead of the top-level rate_limit.
    rate_limit: RateLimitConfig | None = None
    # The grants this client may use; token exchange is the only grant this service offers, so
    # `[]` is the way to keep a client configured but unable to exchange (unauthorized_client).
    grant_types: list[Literal["urn:ietf:params:oauth:grant-type:token-exchange"]] = Field(
        default_factory=lambda: [TOKEN_EXCHANGE_GRANT]  # type: ignore[arg-type]
    )

    @field_validator("jwks_uri")
    @classmethod
    def _jwks_url(cls, value: str | None) -> str | None:
        return None if value is None else _check_http_url(value)

    @field_validator("client_secret")
    @classmethod
    def _secret_strength(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value():
            raise ValueError("must not be empty")
        return value

    @model_validator(mode="after")
    def _one_credential(self) -> ClientConfig:
        has_keys = self.jwks is not None or self.jwks_uri is not None
        if (self.client_secret is None) == (not has_keys):
            raise ValueError(
                "exactly one credential is required: client_secret, or jwks / jwks_uri "
                "(private_key_jwt)"
            )
        if self.jwks is not None and self.jwks_uri is not None:
            raise ValueError("jwks and jwks_uri are mutually exclusive")
        if self.jwks is not None and not isinstance(self.jwks.get("keys"), list):
            raise ValueError("jwks must be a JWK Set with a 'keys' list")
        return self

    @property
    def auth_methods(self) -> tuple[str, ...]:
        if self.client_secret is not None:
            return ("client_secret_basic", "client_secret_post")
        return ("private_key_jwt",)


ClaimValue = StrictStr | StrictBool | StrictInt


class ConditionConfig(_Strict):
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


class PolicyConfig(_Strict):
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
    def _name_not_a_subresource(self) -> PolicyConfig:
        # The admin API addresses /admin/policies/NAME/history and NAME/disable. Servers that
        # decode %2F before the app sees the path (granian) cannot tell "a%2Fhistory" from the
        # history of "a": no name may end like a sub-resource, so both read the same way.
        name = self.name or default_policy_name(self.client_id, self.audience)
        if name.endswith(("/history", "/disable")):
            raise ValueError("a policy name must not end with /history or /disable")
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
            issuer=self.issuer,
            conditions=tuple(
                self.subject[claim].to_condition(claim) for claim in sorted(self.subject)
            ),
        )


class AdminCredential(_Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$")
    token: SecretStr

    @field_validator("token")
    @classmethod
    def _token_strength(cls, value: SecretStr) -> SecretStr:
        if len(value.get_secret_value()) < 32:
            raise ValueError("must be at least 32 characters")
        return value


class AdminConfig(_Strict):
    """The policy admin API; absent, it is disabled (404)."""

    # HOST:PORT of a separate listener; when set, /admin is served there and only there.
    listen: str | None = Field(default=None, pattern=r"^[^\s:]+:\d{1,5}$")
    credentials: list[AdminCredential] = Field(min_length=1)

    @model_validator(mode="after")
    def _distinct_names(self) -> AdminConfig:
        _refuse_duplicates("credentials", [c.name for c in self.credentials])
        return self

    @property
    def listen_port(self) -> int | None:
        return int(self.listen.rsplit(":", 1)[1]) if self.listen else None


class SubjectTokenCacheConfig(_Strict):
    """Verified subject and actor tokens, by SHA-256 of the token, each kept until its ``exp``."""

    enabled: bool = True
    max_entries: int = Field(10_000, ge=1, le=1_000_000)


class MintedTokenCacheConfig(_Strict):
    """Minted tokens reused for an identical request while enough of their lifetime is left."""

    enabled: bool = True
    max_entries: int = Field(10_000, ge=1, le=1_000_000)
    # Reused only while at least this fraction of the token's lifetime remains (0.5: a gateway
    # never gets a token with less than half the lifetime a fresh one would have had).
    min_remaining: float = Field(0.5, gt=0, le=1)


class CachesConfig(_Strict):
    subject_tokens: SubjectTokenCacheConfig = Field(
        default_factory=SubjectTokenCacheConfig  # type: ignore[arg-type]
    )
    minted_tokens: MintedTokenCacheConfig = Field(
        default_factory=MintedTokenCacheConfig  # type: ignore[arg-type]
    )


class ServerConfig(_Strict):
    """``sidecar serve``: the HTTP server and its limits on hostile or idle clients."""

    # granian (HTTP/1.1 framing in Rust, by hyper), or gunicorn (its gthread worker).
    kind: Literal["granian", "gunicorn"] = "granian"
    workers: int = Field(2, ge=1, le=64)
    # Python threads per worker that run the app; the connections wait in the server, not in
    # Python threads.
    threads: int = Field(2, ge=1, le=64)
    # A request head must arrive within this long, and an idle kept-alive connection is closed
    # after it (granian: one timer for both; gunicorn: its keepalive).
    keepalive: Duration = Field(15.0, gt=0, le=600)
    # Connections one worker holds at most; past it new ones wait in the kernel's backlog, and
    # the idle ones held are closed after ``keepalive``.
    max_connections: int = Field(4096, ge=16, le=1_000_000)
    backlog: int = Field(4096, ge=128, le=65535)
    # SIGTERM: stop accepting, let requests in flight finish for up to this long.
    graceful_timeout: Duration = Field(20.0, gt=0, le=600)


class Settings(_Strict):
    issuer: str
    database_url: str = "sqlite:///var/sidecar.db"
    tokens: TokensConfig = Field(default_factory=TokensConfig)  # type: ignore[arg-type]
    keys: KeysConfig = Field(default_factory=KeysConfig)
    trusted_issuers: list[TrustedIssuerConfig] = Field(min_length=1)
    clients: list[ClientConfig] = Field(min_length=1)
    policies: list[PolicyConfig] = Field(default_factory=list)
    # How often every worker re-reads the policy table (seconds): the bound on how long a
    # policy change takes to reach every worker of every replica.
    policy_refresh_interval: Duration = 5.0
    admin: AdminConfig | None = None
    caches: CachesConfig = Field(default_factory=CachesConfig)
    # Per-client limit of /token requests (per worker process); absent: no limit.
    rate_limit: RateLimitConfig | None = None
    server: ServerConfig = Field(default_factory=ServerConfig)  # type: ignore[arg-type]
    # Where the config file lives; relative jwks_file paths resolve against it. Not a YAML key.
    config_dir: Path = Field(default=Path("."), exclude=True)

    @field_validator("issuer")
    @classmethod
    def _issuer_url(cls, value: str) -> str:
        _check_http_url(value)
        if value.endswith("/"):
            raise ValueError("must not end with '/'")
        return value

    @field_validator("database_url")
    @classmethod
    def _database(cls, value: str) -> str:
        if not value.startswith(("sqlite:///", "postgresql")):
            raise ValueError("must be sqlite:///PATH or postgresql+psycopg://...")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        issuers = [i.issuer for i in self.trusted_issuers]
        if self.issuer in issuers:
            # Our own tokens must never be accepted back as subject tokens.
            raise ValueError("trusted_issuers must not include this service's own issuer")
        _refuse_duplicates("trusted_issuers", issuers)
        _refuse_duplicates("clients", [c.client_id for c in self.clients])
        if self.keys.retain_after < self.tokens.max_ttl + self.tokens.leeway:
            raise ValueError(
                "keys.retain_after must be at least tokens.max_ttl + tokens.leeway, so that "
                "every token outlives the publication of its key"
            )
        if self.keys.publish_ahead >= self.keys.rotate_every:
            raise ValueError("keys.publish_ahead must be shorter than keys.rotate_every")
        if self.keys.publish_ahead < 2 * self.keys.refresh_interval:
            # Every worker must have loaded a new key, and verifiers refetched the JWKS, before
            # the key signs: see jwks_max_age.
            raise ValueError("keys.publish_ahead must be at least twice keys.refresh_interval")
        validate_policies(self.policies, self)
        return self

    def weaknesses(self) -> list[str]:
        """Settings that work but are weak: printed by check-config, logged by serve."""
        found = []
        for index, client in enumerate(self.clients):
            if client.client_secret and len(client.client_secret.get_secret_value()) < 16:
                found.append(f"clients[{index}].client_secret is shorter than 16 characters")
        key = self.keys.encryption_key
        if key is not None and len(key.get_secret_value()) < 16:
            found.append("keys.encryption_key is shorter than 16 characters")
        return found

    def missing_files(self) -> list[str]:
        """Files the configuration names that do not exist (checked by check-config and serve,
        not at load time, so that `sidecar demo-init` can create the demo issuer's JWKS)."""
        missing = []
        for index, entry in enumerate(self.trusted_issuers):
            path = self.resolve_path(entry.jwks_file) if entry.jwks_file else None
            if path is not None and not path.is_file():
                missing.append(f"trusted_issuers[{index}].jwks_file: {path} is not a file")
        if self.keys.directory is not None and not self.resolve_path(self.keys.directory).is_dir():
            missing.append(
                f"keys.directory: {self.resolve_path(self.keys.directory)} is not a directory"
            )
        return missing

    def resolve_path(self, path: Path) -> Path:
        """A path of the config file, relative to the config file's directory."""
        return path if path.is_absolute() else self.config_dir / path

    @property
    def jwks_max_age(self) -> int:
        """How long verifiers may cache the JWKS (seconds). A new key is written to the database
        ``publish_ahead`` before it signs; every worker has it within ``keys.refresh_interval``;
        a verifier that fetched the JWKS just before must refetch before the key signs."""
        return int(max(0.0, min(300.0, self.keys.publish_ahead - self.keys.refresh_interval)))

    @property
    def token_endpoint(self) -> str:
        return f"{self.issuer}/token"

    @property
    def jwks_uri(self) -> str:
        return f"{self.issuer}/.well-known/jwks.json"

    def find_client(self, client_id: str) -> ClientConfig | None:
        for client in self.clients:
            if client.client_id == client_id:
                return client
        return None


def _refuse_duplicates(what: str, values: list[str]) -> None:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise ValueError(f"{what}: {value!r} appears twice")
        seen.add(value)


def validate_policies(policies: list[PolicyConfig], settings: Settings) -> None:
    """Cross-checks the ``policies:`` of a file against the settings and each other."""
    check_policy_set([config.to_policy() for config in policies], settings)


def check_policy_set(policies: list[Policy], settings: Settings) -> None:
    """Checks a whole policy set; raises ValueError naming the policy: unknown client or issuer,
    ttl above tokens.max_ttl, a name used twice, and two enabled policies that could both match
    the same request."""
    client_ids = {c.client_id for c in settings.clients}
    issuers = {i.issuer for i in settings.trusted_issuers}
    seen: dict[str, int] = {}
    for index, policy in enumerate(policies):
        where = f"policies[{index}] ({policy.name})"
        if policy.client_id not in client_ids:
            raise ValueError(f"{where}: client_id is not one of the configured clients")
        if policy.issuer is not None and policy.issuer not in issuers:
            raise ValueError(f"{where}: issuer is not one of the trusted_issuers")
        if policy.ttl > settings.tokens.max_ttl:
            raise ValueError(f"{where}: ttl {policy.ttl} exceeds tokens.max_ttl")
        if policy.name in seen:
            raise ValueError(
                f"{where}: the name is already used by policies[{seen[policy.name]}] "
                "(give policies for the same client and audience distinct names)"
            )
        for other_index, other in enumerate(policies[:index]):
            if could_overlap(policy, other):
                raise ValueError(
                    f"{where}: could match the same requests as policies[{other_index}] "
                    f"({other.name}); make their issuer or subject conditions exclusive, or "
                    "disable one"
                )
        seen[policy.name] = index


# --- loading -------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicate mapping keys instead of silently keeping the last."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    mapping: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in mapping:
            raise ConfigError(f"duplicate key {key!r} (line {key_node.start_mark.line + 1})")
        mapping[key] = loader.construct_object(value_node, deep=True)
    return mapping


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)


def _path_text(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "(top level)"


def substitute_env(value: Any, env: Mapping[str, str], loc: tuple[Any, ...] = ()) -> Any:
    """Replace ``${NAME}`` in every string of a parsed YAML tree."""
    if isinstance(value, dict):
        return {k: substitute_env(v, env, (*loc, k)) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute_env(v, env, (*loc, i)) for i, v in enumerate(value)]
    if not isinstance(value, str) or "$" not in value:
        return value

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$${":
            return "${"
        name = match.group(1)
        if name is None:
            raise ConfigError(f"{_path_text(loc)}: unterminated ${{ (write $${{ for a literal)")
        if not _ENV_NAME.match(name):
            raise ConfigError(f"{_path_text(loc)}: ${{{name}}} is not a valid variable name")
        if name not in env:
            raise ConfigError(f"{_path_text(loc)}: environment variable {name} is not set")
        return env[name]

    return _ENV_REF.sub(replace, value)


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8") from exc
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def format_validation_error(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        message = error["msg"].removeprefix("Value error, ")
        # Cross-field checks run on the whole file and name their key paths in the message.
        loc = tuple(error["loc"])
        lines.append(f"{_path_text(loc)}: {message}" if loc else message)
    return "\n".join(lines)


def settings_from_mapping(
    data: dict[str, Any], *, env: Mapping[str, str] | None = None, config_dir: Path | None = None
) -> Settings:
    data = substitute_env(data, os.environ if env is None else env)
    try:
        settings = Settings.model_validate({**data, "config_dir": config_dir or Path(".")})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
    return settings


def load_settings(
    path: str | os.PathLike[str],
    env: Mapping[str, str] | None = None,
    *,
    config_dir: Path | None = None,
) -> Settings:
    """Read, substitute and validate the configuration file at ``path``; relative paths in it
    resolve against ``config_dir`` (default: the file's own directory)."""
    config_path = Path(path)
    data = read_yaml(config_path)
    if "config_dir" in data:
        raise ConfigError("config_dir: unknown key")
    return settings_from_mapping(
        data, env=env, config_dir=config_dir or config_path.resolve().parent
    )


def load_policies_file(path: Path, settings: Settings) -> list[PolicyConfig]:
    """The ``policies:`` list of a YAML file (a policy file or a whole config file)."""
    data = read_yaml(path)
    raw = data.get("policies")
    if raw is None:
        raise ConfigError(f"{path}: no 'policies' key")
    raw = substitute_env(raw, os.environ, ("policies",))
    if not isinstance(raw, list):
        raise ConfigError("policies: must be a list")
    policies = []
    for index, item in enumerate(raw):
        try:
            policies.append(PolicyConfig.model_validate(item))
        except ValidationError as exc:
            text = format_validation_error(exc)
            raise ConfigError(
                "\n".join(f"policies[{index}].{line}" for line in text.splitlines())
            ) from None
    try:
        validate_policies(policies, settings)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return policies
