"""The configuration: one YAML file, read once at start-up into one typed, validated object.

- :mod:`sidecar.config.common`: errors, durations, strict models, protocol constants;
- :mod:`sidecar.config.models`: one model per section, and :class:`Settings`;
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
    AdminConfig,
    AdminCredential,
    CachesConfig,
    ClientConfig,
    KeysConfig,
    KubernetesConfig,
    RateLimitConfig,
    Settings,
    TokensConfig,
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
