"""SQLAlchemy 2 models. The schema itself is owned by the Alembic migrations in
``sidecar/migrations/``; these models must match them (a test compares the two)."""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    Float,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    true,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class PolicyRow(Base):
    """One exchange policy: client x audience -> scopes, lifetime. JSON lists are stored as text
    so that SQLite and PostgreSQL hold them identically."""

    __tablename__ = "policies"
    __table_args__ = (
        UniqueConstraint("name", name="uq_policies_name"),
        Index("ix_policies_client_audience", "client_id", "audience"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(255))
    client_id: Mapped[str] = mapped_column(String(255))
    audience: Mapped[str] = mapped_column(String(2048))
    issuer: Mapped[str | None] = mapped_column(String(2048), nullable=True)
    conditions: Mapped[str] = mapped_column(Text, server_default="[]")  # JSON list
    scopes: Mapped[str] = mapped_column(Text)  # JSON list
    default_scopes: Mapped[str] = mapped_column(Text)  # JSON list
    ttl: Mapped[int] = mapped_column(Integer)
    enabled: Mapped[bool] = mapped_column(Boolean)
    require_subject_scopes: Mapped[bool] = mapped_column(Boolean)
    reuse_tokens: Mapped[bool] = mapped_column(Boolean, server_default=true())
    copy_claims: Mapped[str] = mapped_column(Text)  # JSON list
    credential: Mapped[str] = mapped_column(String(32), server_default="mint")
    upstream: Mapped[str | None] = mapped_column(String(64), nullable=True)
    version: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[float] = mapped_column(Float)
    updated_by: Mapped[str] = mapped_column(String(255))


class PolicyVersionRow(Base):
    """Every change of a policy, as the full policy document after the change (or a deletion)."""

    __tablename__ = "policy_versions"
    __table_args__ = (Index("ix_policy_versions_name", "name", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(255))
    client_id: Mapped[str] = mapped_column(String(255))
    audience: Mapped[str] = mapped_column(String(2048))
    version: Mapped[int] = mapped_column(Integer)
    action: Mapped[str] = mapped_column(String(16))  # create | update | delete | rollback
    document: Mapped[str] = mapped_column(Text)  # JSON of the policy after the change
    changed_at: Mapped[float] = mapped_column(Float)
    changed_by: Mapped[str] = mapped_column(String(255))


class SigningKeyRow(Base):
    """A signing key. Its state (next, current, previous, gone) follows from its timestamps."""

    __tablename__ = "signing_keys"

    kid: Mapped[str] = mapped_column(String(64), primary_key=True)
    algorithm: Mapped[str] = mapped_column(String(16))
    private_key: Mapped[bytes] = mapped_column(LargeBinary)  # PKCS#8 PEM, or its ciphertext
    encryption: Mapped[str | None] = mapped_column(String(32), nullable=True)
    public_jwk: Mapped[str] = mapped_column(Text)  # JSON
    created_at: Mapped[float] = mapped_column(Float)
    activates_at: Mapped[float] = mapped_column(Float)  # starts signing
    retires_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # stops signing
    removes_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # leaves the JWKS


class ClientAssertionJtiRow(Base):
    """``jti`` values of accepted private_key_jwt assertions, kept until the assertion expires
    (RFC 7523 §3 item 7: replay protection)."""

    __tablename__ = "client_assertion_jtis"

    client_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    jti: Mapped[str] = mapped_column(String(255), primary_key=True)
    expires_at: Mapped[float] = mapped_column(Float, index=True)


class AuditEventRow(Base):
    """One exchange decision. Never a token or secret: tokens appear as ``jti`` or fingerprint."""

    __tablename__ = "audit_events"
    __table_args__ = (
        Index("ix_audit_events_at", "at"),
        Index("ix_audit_events_jti", "jti"),
        Index("ix_audit_events_subject", "subject"),
        Index("ix_audit_events_client_id", "client_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[float] = mapped_column(Float)
    decision: Mapped[str] = mapped_column(String(16))  # granted | denied
    error: Mapped[str | None] = mapped_column(String(64), nullable=True)
    reason: Mapped[str | None] = mapped_column(String(255), nullable=True)
    client_id: Mapped[str | None] = mapped_column(String(255), nullable=True)
    subject: Mapped[str | None] = mapped_column(String(255), nullable=True)
    subject_issuer: Mapped[str | None] = mapped_column(String(2048), nullable=True)
    subject_token_sha256: Mapped[str | None] = mapped_column(String(16), nullable=True)
    actor: Mapped[str | None] = mapped_column(String(255), nullable=True)
    audiences: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON list
    scope: Mapped[str | None] = mapped_column(Text, nullable=True)
    jti: Mapped[str | None] = mapped_column(String(64), nullable=True)
    expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    kid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    request_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    latency_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    # On a grant: the granting policies, "name@version", space-separated.
    policies: Mapped[str | None] = mapped_column(Text, nullable=True)


class LeaseRow(Base):
    """Named row locks: updating a row serialises a critical section across every worker and
    replica sharing the database (e.g. "keyring" for key generation and rotation)."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str | None] = mapped_column(String(255), nullable=True)
    acquired_at: Mapped[float | None] = mapped_column(Float, nullable=True)
