"""The typed configuration: the token, key and cache sections, and :class:`Settings`, the whole
file once validated (read once at start-up; tests pass their own). The issuers, clients and admin
credentials are in :mod:`sidecar.config.parties`, re-exported here."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator

from sidecar.config.common import (
    Duration,
    SigningAlgorithm,
    StrictModel,
    check_http_url,
    parse_listen,
    refuse_duplicates,
)
from sidecar.config.deployment import (
    AuditConfig,
    DatabaseConfig,
    LogConfig,
    ManagementConfig,
    RedisConfig,
    ServerConfig,
)
from sidecar.config.parties import (
    AdminConfig,
    AdminCredential,
    ClientConfig,
    KubernetesConfig,
    RateLimitConfig,
    TrustedIssuerConfig,
)
from sidecar.config.policies import PolicyConfig, validate_policies
from sidecar.config.upstreams import ExtAuthzConfig, UpstreamConfig, check_upstreams

# Re-exported: the parties' models, defined in sidecar.config.parties, import from here too.
__all__ = [
    "AdminConfig",
    "AdminCredential",
    "CachesConfig",
    "ClientConfig",
    "KeysConfig",
    "KubernetesConfig",
    "MintedTokenCacheConfig",
    "RateLimitConfig",
    "Settings",
    "SubjectTokenCacheConfig",
    "TokensConfig",
    "TrustedIssuerConfig",
]


class TokensConfig(StrictModel):
    algorithm: SigningAlgorithm = "ES256"
    max_ttl: int = Field(300, ge=10, le=3600)
    leeway: int = Field(30, ge=0, le=300)


class KeysConfig(StrictModel):
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


class SubjectTokenCacheConfig(StrictModel):
    """Verified subject and actor tokens, by SHA-256 of the token, each kept until its ``exp``."""

    enabled: bool = True
    max_entries: int = Field(10_000, ge=1, le=1_000_000)


class MintedTokenCacheConfig(StrictModel):
    """Minted tokens reused for an identical request while enough of their lifetime is left."""

    enabled: bool = True
    max_entries: int = Field(10_000, ge=1, le=1_000_000)
    # Reused only while at least this fraction of the token's lifetime remains (0.5: a gateway
    # never gets a token with less than half the lifetime a fresh one would have had).
    min_remaining: float = Field(0.5, gt=0, le=1)


class CachesConfig(StrictModel):
    subject_tokens: SubjectTokenCacheConfig = Field(
        default_factory=SubjectTokenCacheConfig  # type: ignore[arg-type]
    )
    minted_tokens: MintedTokenCacheConfig = Field(
        default_factory=MintedTokenCacheConfig  # type: ignore[arg-type]
    )


class Settings(StrictModel):
    issuer: str
    database_url: str = "sqlite:///var/sidecar.db"
    tokens: TokensConfig = Field(default_factory=TokensConfig)  # type: ignore[arg-type]
    keys: KeysConfig = Field(default_factory=KeysConfig)
    trusted_issuers: list[TrustedIssuerConfig] = Field(min_length=1)
    clients: list[ClientConfig] = Field(min_length=1)
    policies: list[PolicyConfig] = Field(default_factory=list)
    # Credentials of upstreams that do not trust our JWKS (policies' credential static or
    # client_credentials); upstreams_file adds backend definitions from a JSON or YAML file.
    upstreams: list[UpstreamConfig] = Field(default_factory=list)
    upstreams_file: Path | None = None
    ext_authz: ExtAuthzConfig | None = None
    # How often every worker re-reads the policy table (seconds): the bound on how long a
    # policy change takes to reach every worker of every replica.
    policy_refresh_interval: Duration = 5.0
    admin: AdminConfig | None = None
    management: ManagementConfig | None = None
    redis: RedisConfig | None = None
    kubernetes: KubernetesConfig | None = None
    log: LogConfig = Field(default_factory=LogConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    database: DatabaseConfig = Field(default_factory=DatabaseConfig)  # type: ignore[arg-type]
    caches: CachesConfig = Field(default_factory=CachesConfig)
    # Per-client limit of /token requests (per worker process); absent: no limit.
    rate_limit: RateLimitConfig | None = None
    server: ServerConfig = Field(default_factory=ServerConfig)  # type: ignore[arg-type]
    # Where the config file lives; relative jwks_file paths resolve against it. Not a YAML key.
    config_dir: Path = Field(default=Path("."), exclude=True)

    @field_validator("issuer")
    @classmethod
    def _issuer_url(cls, value: str) -> str:
        check_http_url(value)
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
        refuse_duplicates("trusted_issuers", issuers)
        refuse_duplicates("clients", [c.client_id for c in self.clients])
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
        if (
            self.admin is not None
            and self.admin.listen_port is not None
            and self.management is not None
            and self.admin.listen_port == self.management.listen_port
        ):
            raise ValueError("admin.listen and management.listen must use different ports")
        if self.kubernetes is not None and self.kubernetes.issuer == self.issuer:
            raise ValueError("kubernetes.issuer must not be this service's own issuer")
        accounts = [c.kubernetes_service_account for c in self.clients]
        named = [account for account in accounts if account is not None]
        if named and self.kubernetes is None:
            raise ValueError("clients with kubernetes_service_account need a kubernetes: issuer")
        refuse_duplicates("clients[].kubernetes_service_account", named)
        check_upstreams(self.upstreams)
        if self.ext_authz is not None:
            if self.ext_authz.client_id not in {c.client_id for c in self.clients}:
                raise ValueError("ext_authz.client_id is not one of the configured clients")
            ports = [self.admin.listen_port if self.admin else None]
            ports.append(self.management.listen_port if self.management else None)
            if parse_listen(self.ext_authz.listen)[1] in ports:
                raise ValueError("ext_authz.listen must use a port of its own")
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
        if self.kubernetes is not None and self.kubernetes.jwks_file is not None:
            path = self.resolve_path(self.kubernetes.jwks_file)
            if not path.is_file():
                missing.append(f"kubernetes.jwks_file: {path} is not a file")
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
