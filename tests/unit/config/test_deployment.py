"""sidecar/config/deployment.py: the sections of how the service runs (server, management
listener, logs, PostgreSQL connection, shared rate-limit store), their defaults and bounds, and
errors that name the key."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from sidecar.config.deployment import (
    DatabaseConfig,
    LogConfig,
    ManagementConfig,
    RedisConfig,
    ServerConfig,
)
from sidecar.config.loading import format_validation_error


def refusal(model: type[BaseModel], **values: Any) -> str:
    with pytest.raises(ValidationError) as refused:
        model.model_validate(values)
    return format_validation_error(refused.value)


# --- server ---------------------------------------------------------------------------------------


def test_server_defaults() -> None:
    assert ServerConfig().model_dump() == {
        "kind": "granian",
        "workers": 2,
        "threads": 2,
        "keepalive": 15.0,
        "max_connections": 4096,
        "backlog": 4096,
        "graceful_timeout": 20.0,
    }


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("kind", "gunicorn"),
        ("workers", 1),
        ("workers", 64),
        ("threads", 64),
        ("keepalive", "10m"),
        ("max_connections", 16),
        ("backlog", 128),
        ("backlog", 65535),
        ("graceful_timeout", "10m"),
    ],
)
def test_server_bounds_are_inclusive(key: str, value: Any) -> None:
    assert ServerConfig.model_validate({key: value})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("kind", "uwsgi"),
        ("workers", 0),
        ("workers", 65),
        ("threads", 0),
        ("keepalive", 0),
        ("keepalive", "601s"),
        ("max_connections", 15),
        ("backlog", 127),
        ("backlog", 65536),
        ("graceful_timeout", 0),
    ],
)
def test_server_values_out_of_bounds_name_the_key(key: str, value: Any) -> None:
    assert refusal(ServerConfig, **{key: value}).startswith(f"{key}: ")


# --- the other sections ------------------------------------------------------------------------


def test_database_defaults_bound_every_wait() -> None:
    database = DatabaseConfig.model_validate({})
    assert (database.pool_size, database.max_overflow) == (5, 5)
    assert database.pool_timeout == database.connect_timeout == database.statement_timeout == 2.0
    assert database.sslmode is None


@pytest.mark.parametrize(
    ("key", "value"),
    [("pool_size", 0), ("connect_timeout", 0.5), ("statement_timeout", 0), ("sslmode", "on")],
)
def test_database_values_out_of_bounds_name_the_key(key: str, value: Any) -> None:
    assert refusal(DatabaseConfig, **{key: value}).startswith(f"{key}: ")


def test_redis_needs_a_redis_url_and_defaults_to_local_buckets_on_failure() -> None:
    redis = RedisConfig.model_validate({"url": "rediss://redis.internal:6380/0"})
    assert redis.on_failure == "local"
    assert redis.timeout == 0.1
    assert refusal(RedisConfig, url="http://redis.internal").startswith("url: ")
    assert refusal(RedisConfig, url="redis://r", on_failure="maybe").startswith("on_failure: ")


@pytest.mark.parametrize(("listen", "port"), [("0.0.0.0:9091", 9091), ("[::]:9091", 9091)])
def test_the_management_listener_is_host_and_port(listen: str, port: int) -> None:
    assert ManagementConfig.model_validate({"listen": listen}).listen_port == port


@pytest.mark.parametrize("listen", ["9091", "host:99999", "::1:9091"])
def test_a_management_listener_that_is_not_host_and_port_is_refused(listen: str) -> None:
    assert refusal(ManagementConfig, listen=listen).startswith("listen: ")


def test_log_format_is_auto_json_or_text() -> None:
    assert LogConfig.model_validate({}).format == "auto"
    assert refusal(LogConfig, format="xml").startswith("format: ")


def test_audit_retention_is_a_positive_duration_or_absent() -> None:
    from sidecar.config.deployment import AuditConfig

    assert AuditConfig.model_validate({}).retention is None
    assert AuditConfig.model_validate({"retention": "90d"}).retention == 90 * 86400
    assert refusal(AuditConfig, retention=0).startswith("retention: ")
