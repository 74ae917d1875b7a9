"""The configuration of how the service runs where it is deployed: the HTTP server, its extra
listeners, logs, the PostgreSQL connection and the shared rate-limit store."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from sidecar.config.common import Duration, Listen, StrictModel, parse_listen


class DatabaseConfig(StrictModel):
    """PostgreSQL connection settings (SQLite ignores all but nothing: it has none of these).
    Every wait on the database is bounded: a slow or unreachable database is a 503, not a
    hang."""

    pool_size: int = Field(5, ge=1, le=100)  # connections each worker keeps open
    max_overflow: int = Field(5, ge=0, le=100)  # more, opened under load and closed after
    pool_timeout: Duration = Field(2.0, gt=0, le=60)  # a request waits this long for one
    connect_timeout: Duration = Field(2.0, ge=1, le=60)
    # Server-side (PostgreSQL cancels the statement); the client gives up one second later.
    statement_timeout: Duration = Field(2.0, gt=0, le=600)
    # libpq TLS parameters: disable | allow | prefer | require | verify-ca | verify-full.
    sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] | None = (
        None
    )
    sslrootcert: Path | None = None
    sslcert: Path | None = None
    sslkey: Path | None = None


class LogConfig(StrictModel):
    # json: one JSON object per line; text: plain lines; auto: json unless stderr is a terminal.
    format: Literal["auto", "json", "text"] = "auto"


class RedisConfig(StrictModel):
    """Rate limits shared by every worker of every replica (one Redis round trip per charge);
    without it, each worker keeps its own buckets."""

    url: str = Field(pattern=r"^rediss?://")
    # A charge waits at most this long for Redis.
    timeout: Duration = Field(0.1, gt=0, le=5)
    # When Redis does not answer: "local" (each worker's own buckets, the default), "open"
    # (no limit) or "closed" (refuse with 503 temporarily_unavailable).
    on_failure: Literal["local", "open", "closed"] = "local"
    key_prefix: str = Field("sidecar:ratelimit:", min_length=1, max_length=64)


class ManagementConfig(StrictModel):
    """A listener of its own for what upstreams and the orchestrator fetch (JWKS, metadata,
    health, metrics), so that ``/token`` can stay on loopback for the pod's gateway alone."""

    listen: Listen

    @property
    def listen_port(self) -> int:
        return parse_listen(self.listen)[1]


class ServerConfig(StrictModel):
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


class AuditConfig(StrictModel):
    # Rows of the audit table older than this are deleted by the service, in small batches;
    # absent: kept for ever (the log lines are the operator's to keep).
    retention: Duration | None = Field(default=None, gt=0)
