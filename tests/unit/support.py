"""In-memory stand-ins shared by the unit tests of the grant, client authentication and the token
endpoint: what those pieces need from the world (an issuer directory, a ``jti`` store, a signing
key, policies), built from keys and values generated in the test, with no database, file or
network behind them. And the command line run in-process, for the unit tests of its commands;
the audit trail on a SQLite file, for those of the audit modules."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from click.testing import CliRunner, Result
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from sidecar.audit import DENIED, GRANTED, AuditEvent, AuditTrail
from sidecar.cli import main
from sidecar.config.policies import PolicyConfig
from sidecar.exchange.policy import Policy, PolicySet
from sidecar.exchange.subject import VerificationKey
from sidecar.keys.keyring import SigningKey
from sidecar.keys.material import PrivateKey, generate_private_key, public_jwk
from sidecar.store.audit_query import EXCHANGES
from sidecar.store.db import make_engine
from sidecar.store.migrate import upgrade
from sidecar.store.models import AuditEventRow
from tests.conftest import CODE_SEARCH, TestIdP

Item = TypeVar("Item")
Result_ = TypeVar("Result_")

# --- the issuer directory (sidecar.exchange.subject.IssuerDirectory) ---------------------------


@dataclass
class InMemoryIssuer:
    """One trusted issuer (the ``IssuerKeys`` protocol) whose public keys are held in a dict."""

    issuer: str
    audiences: tuple[str, ...]
    algorithms: frozenset[str]
    keys: dict[str, VerificationKey] = field(default_factory=dict)

    def find_key(self, kid: str) -> VerificationKey | None:
        return self.keys.get(kid)


class InMemoryIssuers:
    """The ``IssuerDirectory`` protocol over a dict: exact, byte-for-byte issuer lookup."""

    def __init__(self, *issuers: InMemoryIssuer) -> None:
        self.issuers = {entry.issuer: entry for entry in issuers}

    def find_issuer(self, issuer: str) -> InMemoryIssuer | None:
        return self.issuers.get(issuer)


def trusted_issuer(idp: TestIdP, algorithms: Iterable[str] = ("RS256", "ES256")) -> InMemoryIssuer:
    """The test IdP as a trusted issuer: its public keys by kid, each for its one algorithm."""
    keys: dict[str, VerificationKey] = {}
    for kid, (private, alg) in idp.keys.items():
        public: Any = private.public_key()  # type: ignore[attr-defined]
        keys[kid] = VerificationKey(kid, public, frozenset({alg}))
    return InMemoryIssuer(
        issuer=idp.issuer,
        audiences=(idp.audience,),
        algorithms=frozenset(algorithms),
        keys=keys,
    )


def issuer_directory(idp: TestIdP) -> InMemoryIssuers:
    return InMemoryIssuers(trusted_issuer(idp))


# --- the jti store (sidecar.store.jtis.JtiStore) -----------------------------------------------


class InMemoryJtis:
    """``JtiStore.remember`` over a dict: a ``jti`` is accepted once per client."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, str], float] = {}
        self.calls: list[tuple[str, str, float]] = []

    def remember(self, client_id: str, jti: str, expires_at: float) -> bool:
        self.calls.append((client_id, jti, expires_at))
        if (client_id, jti) in self.seen:
            return False
        self.seen[(client_id, jti)] = expires_at
        return True


def never_fetch(url: str, timeout: float) -> Any:
    """A JWKS fetch function for clients whose keys are inline: calling it is a test failure."""
    raise AssertionError(f"no JWKS may be fetched in a unit test (asked for {url})")


# --- signing keys and policies ------------------------------------------------------------------


def signing_key(
    private_key: PrivateKey,
    *,
    activates_at: float,
    retires_at: float | None = None,
    removes_at: float | None = None,
    created_at: float | None = None,
    algorithm: str = "ES256",
) -> SigningKey:
    """``private_key`` as a keyring holds it, its kid that of its public JWK (sidecar.keys
    .material); created when it activates unless ``created_at`` says otherwise."""
    jwk = public_jwk(private_key, algorithm)
    return SigningKey(
        kid=jwk["kid"],
        algorithm=algorithm,
        private_key=private_key,
        public_jwk=jwk,
        created_at=activates_at if created_at is None else created_at,
        activates_at=activates_at,
        retires_at=retires_at,
        removes_at=removes_at,
    )


def new_signing_key(now: float, algorithm: str = "ES256") -> SigningKey:
    """A freshly generated key (sidecar.keys.material), current from ``now`` on."""
    return signing_key(generate_private_key(algorithm), activates_at=now, algorithm=algorithm)


# The gateway's code-search policy, as the YAML keys of a ``policies:`` entry.
GATEWAY_CODE_SEARCH: dict[str, Any] = {
    "client_id": "gateway",
    "audience": CODE_SEARCH,
    "scopes": ["code.read", "code.search"],
    "default_scopes": ["code.read"],
    "ttl": 120,
}


def gateway_policy(audience: str = CODE_SEARCH, **fields: Any) -> Policy:
    """:data:`GATEWAY_CODE_SEARCH` for ``audience`` as a :class:`Policy` built directly (no
    configuration validation, so any value goes), ``fields`` changed; the scope collections
    become frozensets."""
    values: dict[str, Any] = {**GATEWAY_CODE_SEARCH, "audience": audience, **fields}
    for name in ("scopes", "default_scopes"):
        values[name] = frozenset(values[name])
    return Policy(**values)


def gateway_policy_config(audience: str = CODE_SEARCH, **fields: Any) -> PolicyConfig:
    """:data:`GATEWAY_CODE_SEARCH` for ``audience`` as a configuration file gives it (validated),
    ``fields`` (YAML keys) changed."""
    return PolicyConfig.model_validate({**GATEWAY_CODE_SEARCH, "audience": audience, **fields})


def new_policy(**fields: Any) -> Policy:
    """A policy as a configuration file would give it (``PolicyConfig.to_policy()``), so that it
    passes the same validation; ``fields`` are the YAML keys."""
    return PolicyConfig(**fields).to_policy()


class PolicyHolder:
    """What the token endpoint reads the current policy set from (``Refreshing.get()``)."""

    def __init__(self, policies: PolicySet) -> None:
        self.policies = policies

    def get(self) -> PolicySet:
        return self.policies


# --- the command line, in-process through click (sidecar.cli) ----------------------------------


def invoke(*args: str) -> Result:
    """``sidecar ARGS...`` as the installed script parses them, without SIDECAR_CONFIG."""
    return CliRunner().invoke(main, list(args), env={"SIDECAR_CONFIG": None})


def cli(config_file: Path, *args: str) -> Result:
    """``sidecar --config CONFIG_FILE ARGS...``"""
    return invoke("--config", str(config_file), *args)


def one_line_error(result: Result) -> str:
    """A failed command: non-zero exit, nothing on stdout, one ``sidecar: error:`` line on
    stderr (returned)."""
    assert result.exit_code != 0, result.output
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("sidecar: error: ")
    return line


# --- concurrency ----------------------------------------------------------------------------------


def race(
    items: Sequence[Item], action: Callable[[Item], Result_], timeout: float = 15
) -> list[Result_]:
    """``action`` on every item at once, each from a thread of its own, all released together
    by a barrier: the results, in the order they came. An exception in any thread fails the
    test."""
    barrier = threading.Barrier(len(items))
    results: list[Result_] = []
    errors: list[BaseException] = []

    def run(item: Item) -> None:
        barrier.wait()
        try:
            results.append(action(item))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(item,)) for item in items]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert errors == []
    assert len(results) == len(items)
    return results


# --- the audit trail (sidecar.audit) --------------------------------------------------------------


EVENT_FIELDS = frozenset(AuditEvent.__dataclass_fields__)
# A flush interval no test waits for: events stay queued until flush() or close().
SLOW_FLUSH = 60.0


def grant_event(**changes: Any) -> AuditEvent:
    """A grant's audit event with every field of a grant filled in (the gateway's, for alice, to
    two targets); ``changes`` replace some."""
    event = AuditEvent(
        at=1_700_000_000.25,
        decision=GRANTED,
        client_id="gateway",
        subject="alice@example.com",
        subject_issuer="https://idp.test.example",
        subject_token_sha256="0123456789abcdef",
        actor="svc-gateway",
        audiences=["https://code-search.internal/mcp", "https://tickets.internal/mcp"],
        scope="code.read code.search",
        jti="jti-1",
        expires_at=1_700_000_120.0,
        kid="key-1",
    )
    return dataclasses.replace(event, **changes)


def audit_event(subject: str, decision: str = DENIED, **values: Any) -> AuditEvent:
    """An audit event of ``subject`` at the current time."""
    return AuditEvent(at=time.time(), decision=decision, subject=subject, **values)


def flushed(trail: AuditTrail, timeout: float = 5.0) -> bool:
    """flush(), asked again every 50 ms. flush() wakes the writer once: if the writer is not
    waiting for work at that moment (just started, or between two batches), the wake-up is lost
    and the queue waits for the next flush_interval, a minute in the tests that use a long one."""
    deadline = time.monotonic() + timeout
    while not trail.flush(0.05):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)  # flush() returns at once while the writer is failing
    return True


def stored_audit_rows(engine: Engine) -> list[AuditEventRow]:
    """The exchanges' audit rows of ``engine``'s database, oldest first."""
    with Session(engine) as session:
        return list(
            session.scalars(
                select(AuditEventRow)
                .where(AuditEventRow.decision.in_(EXCHANGES))
                .order_by(AuditEventRow.id)
            )
        )


class AuditDatabase:
    """A migrated SQLite file (the ``db`` fixture of tests/unit/audit/conftest.py), the trails
    built on it, and a way to take it away for real."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.engine = make_engine(f"sqlite:///{path}")
        upgrade(self.engine)
        self.trails: list[AuditTrail] = []
        self.away = False

    def trail(self, **options: Any) -> AuditTrail:
        trail = AuditTrail(self.engine, **options)
        self.trails.append(trail)
        return trail

    def rows(self) -> list[AuditEventRow]:
        return stored_audit_rows(self.engine)

    def subjects(self) -> list[str | None]:
        return [row.subject for row in self.rows()]

    def take_away(self) -> None:
        # As tests/functional/http/test_token_failures.py: the file (and its WAL side files)
        # disappears, a directory takes its path, and the pool forgets the connections that hold
        # the old file.
        for suffix in ("", "-wal", "-shm"):
            part = self.path.with_name(self.path.name + suffix)
            if part.exists():
                part.rename(part.with_name(part.name + ".gone"))
        self.path.mkdir()
        self.engine.dispose()
        self.away = True

    def bring_back(self) -> None:
        self.path.rmdir()
        for suffix in ("", "-wal", "-shm"):
            part = self.path.with_name(self.path.name + suffix + ".gone")
            if part.exists():
                part.rename(self.path.with_name(self.path.name + suffix))
        self.engine.dispose()
        self.away = False
