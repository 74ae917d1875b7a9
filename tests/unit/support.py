"""In-memory stand-ins shared by the unit tests of the grant, client authentication and the token
endpoint: what those pieces need from the world (an issuer directory, a ``jti`` store, a signing
key, policies), built from keys and values generated in the test, with no database, file or
network behind them. And the command line run in-process, for the unit tests of its commands."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from click.testing import CliRunner, Result

from sidecar.cli import main
from sidecar.config.policies import PolicyConfig
from sidecar.exchange.policy import Policy, PolicySet
from sidecar.exchange.subject import VerificationKey
from sidecar.keys.keyring import SigningKey
from sidecar.keys.material import PrivateKey, generate_private_key, public_jwk
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
