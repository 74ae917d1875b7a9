"""The configuration: one YAML file, read once at start-up into one typed, validated object.

- :mod:`sidecar.config.common`: errors, durations, strict models, protocol constants;
- :mod:`sidecar.config.parties`: who the service trusts and serves (issuers, clients, admins);
- :mod:`sidecar.config.models`: the token, key and cache sections, and :class:`Settings`;
- :mod:`sidecar.config.policies`: ``policies:`` entries and the checks of a whole policy set;
- :mod:`sidecar.config.loading`: YAML, ``${NAME}`` substitution, validation with key paths.
"""

from sidecar.config.common import (
    ConfigError,
    Duration,
    parse_duration,
)
from sidecar.config.deployment import (
    AuditConfig,
    DatabaseConfig,
    LogConfig,
    ManagementConfig,
    RedisConfig,
    ServerConfig,
)
from sidecar.config.loading import (
    format_validation_error,
    load_policies_file,
    load_policies_with_origins,
    load_settings,
    read_yaml,
    settings_from_mapping,
    substitute_env,
)
from sidecar.config.models import (
    CachesConfig,
    KeysConfig,
    Settings,
    TokensConfig,
)
from sidecar.config.parties import (
    AdminConfig,
    AdminCredential,
    ClientConfig,
    KubernetesConfig,
    RateLimitConfig,
    TrustedIssuerConfig,
)
from sidecar.config.policies import (
    ORIGINS,
    ConditionConfig,
    Origins,
    PolicyConfig,
    check_policy_set,
    validate_policies,
)

__all__ = [
    "ORIGINS",
    "AdminConfig",
    "AdminCredential",
    "AuditConfig",
    "CachesConfig",
    "ClientConfig",
    "ConditionConfig",
    "ConfigError",
    "DatabaseConfig",
    "Duration",
    "KeysConfig",
    "KubernetesConfig",
    "LogConfig",
    "ManagementConfig",
    "Origins",
    "PolicyConfig",
    "RateLimitConfig",
    "RedisConfig",
    "ServerConfig",
    "Settings",
    "TokensConfig",
    "TrustedIssuerConfig",
    "check_policy_set",
    "format_validation_error",
    "load_policies_file",
    "load_policies_with_origins",
    "load_settings",
    "parse_duration",
    "read_yaml",
    "settings_from_mapping",
    "substitute_env",
    "validate_policies",
]
