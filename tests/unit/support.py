"""In-memory stand-ins shared by the unit tests of the grant, client authentication and the token
endpoint: what those pieces need from the world (an issuer directory, a ``jti`` store, a signing
key, policies), built from keys and values generated in the test, with no database, file or
network behind them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sidecar.config.policies import PolicyConfig
from sidecar.exchange.policy import Policy, PolicySet
from sidecar.exchange.subject import VerificationKey
from sidecar.keys.keyring import SigningKey
from sidecar.keys.material import generate_private_key, public_jwk
from tests.conftest import TestIdP

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


def new_signing_key(now: float, algorithm: str = "ES256") -> SigningKey:
    """A freshly generated key (sidecar.keys.material), current from ``now`` on."""
    private_key = generate_private_key(algorithm)
    jwk = public_jwk(private_key, algorithm)
    return SigningKey(
        kid=jwk["kid"],
        algorithm=algorithm,
        private_key=private_key,
        public_jwk=jwk,
        created_at=now,
        activates_at=now,
    )


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
