"""``sidecar policy explain`` and ``POST /token`` make the same decision (issue 5): a table of
cases, each run through the real token endpoint over HTTP and through :func:`explain` with the
same subject token (``--subject-token`` semantics), against the same database; then the command
itself in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
import yaml
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker

from sidecar.cli import main
from sidecar.cli.explain import explain
from sidecar.services import Services
from sidecar.store.models import AuditEventRow
from tests.conftest import (
    CODE_SEARCH,
    DISABLED,
    GATEWAY_SECRET,
    OTHER_SECRET,
    SIDECAR_ISSUER,
    TICKETS,
    LiveServer,
    TestIdP,
)
from tests.launcher import SIDECAR

CONDITIONAL = "https://payroll.internal/mcp"  # groups contains eng, mfa equals true
FROM_IDP = "https://wiki.internal/mcp"  # only subjects of the test IdP
FROM_OTHER_IDP = "https://hr.internal/mcp"  # only subjects of another trusted issuer
UNKNOWN = "https://payments.internal/mcp"
STRANGER = ("stranger", "stranger-secret-" + "z" * 24)
NO_EXCHANGE = ("no-exchange", OTHER_SECRET)
GATEWAY = ("gateway", GATEWAY_SECRET)


@pytest.fixture
def other_idp(tmp_path: Path, idp_rsa_key: rsa.RSAPrivateKey) -> TestIdP:
    directory = tmp_path / "other-idp"
    directory.mkdir()
    other = TestIdP(directory, idp_rsa_key)
    other.issuer = "https://other-idp.test.example"
    return other


@pytest.fixture
def config(config: dict[str, Any], idp: TestIdP, other_idp: TestIdP) -> dict[str, Any]:
    config["trusted_issuers"].append(
        {
            "issuer": other_idp.issuer,
            "jwks_file": str(other_idp.jwks_path),
            "audiences": [other_idp.audience],
        }
    )
    base = {"client_id": "gateway", "scopes": ["code.read", "code.search"],
            "default_scopes": ["code.read"]}  # fmt: skip
    config["policies"] += [
        {
            **base,
            "name": "payroll for engineers",
            "audience": CONDITIONAL,
            "subject": {"groups": {"contains": "eng"}, "mfa": {"equals": True}},
            "ttl": 90,
            "copy_claims": ["email", "groups"],
        },
        {**base, "name": "wiki from the idp", "audience": FROM_IDP, "issuer": idp.issuer},
        {
            **base,
            "name": "hr from elsewhere",
            "audience": FROM_OTHER_IDP,
            "issuer": other_idp.issuer,
        },
    ]
    return config


@dataclass(frozen=True)
class Case:
    id: str
    audiences: tuple[str, ...] = (CODE_SEARCH,)
    resources: tuple[str, ...] = ()
    scope: str | None = None
    claims: dict[str, Any] = field(default_factory=dict)  # subject token claims to override
    client: tuple[str, str] = GATEWAY
    expires_in: int = 600  # the subject token's exp, from now
    # Expected: an error code, or the granted scopes and lifetime.
    error: str | None = None
    scopes: tuple[str, ...] = ()
    lifetime: int | None = 0  # None: the subject token's remaining lifetime


CASES = [
    Case("default-scopes", scopes=("code.read",), lifetime=120),
    Case("requested-scopes", scope="code.search code.read", scopes=("code.read", "code.search"),
         lifetime=120),
    Case("scope-outside-the-policy", scope="code.read code.write", error="invalid_scope"),
    Case("require-subject-scopes-missing", audiences=(TICKETS,), scope="tickets.read",
         claims={"scope": "code.read"}, error="invalid_scope"),
    Case("require-subject-scopes-present", audiences=(TICKETS,), claims={"scope": "tickets.read"},
         scopes=("tickets.read",), lifetime=60),
    Case("conditions-hold", audiences=(CONDITIONAL,),
         claims={"groups": ["sales", "eng"], "mfa": True, "email": "a@example.com"},
         scopes=("code.read",), lifetime=90),
    Case("condition-fails", audiences=(CONDITIONAL,), claims={"groups": ["sales"], "mfa": True},
         error="invalid_target"),
    Case("condition-fails-on-type", audiences=(CONDITIONAL,),
         claims={"groups": "eng", "mfa": "true"}, error="invalid_target"),
    Case("condition-claim-missing", audiences=(CONDITIONAL,), claims={"groups": ["eng"]},
         error="invalid_target"),
    Case("issuer-filter-matches", audiences=(FROM_IDP,), scopes=("code.read",), lifetime=120),
    Case("issuer-filter-mismatch", audiences=(FROM_OTHER_IDP,), error="invalid_target"),
    Case("disabled-policy", audiences=(DISABLED,), error="invalid_target"),
    Case("unknown-audience", audiences=(UNKNOWN,), error="invalid_target"),
    Case("audience-in-another-case-and-default-port",
         audiences=("HTTPS://CODE-SEARCH.INTERNAL:443/mcp",), scopes=("code.read",), lifetime=120),
    Case("resource-only", audiences=(), resources=(CODE_SEARCH,), scopes=("code.read",),
         lifetime=120),
    Case("resource-with-a-fragment", audiences=(), resources=(CODE_SEARCH + "#x",),
         error="invalid_target"),
    Case("scope-repeated", scope="code.search code.search", scopes=("code.search",),
         lifetime=120),
    Case("several-targets-allowed", audiences=(CODE_SEARCH,), resources=(CONDITIONAL,),
         claims={"groups": ["eng"], "mfa": True}, scope="code.search",
         scopes=("code.search",), lifetime=90),
    Case("several-targets-one-forbidden", audiences=(CODE_SEARCH, UNKNOWN),
         error="invalid_target"),
    Case("several-targets-one-disabled", audiences=(CODE_SEARCH,), resources=(DISABLED,),
         error="invalid_target"),
    Case("unknown-client", client=STRANGER, error="invalid_client"),
    Case("client-without-token-exchange", client=NO_EXCHANGE, error="unauthorized_client"),
    Case("subject-token-for-another-audience", claims={"aud": "https://elsewhere.example"},
         error="invalid_request"),
    Case("subject-token-expired", expires_in=-3600, error="invalid_request"),
    Case("subject-token-expiring-soon", expires_in=45, scopes=("code.read",), lifetime=None),
]  # fmt: skip


def last_audit(services: Services) -> AuditEventRow:
    assert services.audit.flush()
    with sessionmaker(services.engine)() as session:
        row = session.scalars(select(AuditEventRow).order_by(AuditEventRow.id.desc())).first()
        assert row is not None
        return row


def audit_count(services: Services) -> int:
    assert services.audit.flush()
    with sessionmaker(services.engine)() as session:
        return int(session.scalar(select(func.count()).select_from(AuditEventRow)) or 0)


def token_for(idp: TestIdP, case: Case) -> str:
    return idp.token(**{"exp": int(time.time()) + case.expires_in, **case.claims})


def post(server: LiveServer, case: Case, subject_token: str) -> requests.Response:
    return server.exchange(
        subject_token,
        auth=case.client,
        audience=list(case.audiences) or None,
        resource=list(case.resources) or None,
        scope=case.scope,
    )


def explained(services: Services, case: Case, subject: str | dict[str, Any], now: int) -> Any:
    return explain(
        services,
        client_id=case.client[0],
        audiences=case.audiences,
        resources=case.resources,
        scope=case.scope,
        subject=subject,
        now=now,
    )


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_explain_and_the_token_endpoint_agree(
    case: Case, server: LiveServer, services: Services, idp: TestIdP
) -> None:
    subject_token = token_for(idp, case)
    response = post(server, case, subject_token)
    body = response.json()
    audited = last_audit(services)
    recorded = audit_count(services)

    if response.status_code == 200:
        minted = jwt.decode(
            body["access_token"],
            jwt.PyJWKClient(f"{server.url}/.well-known/jwks.json").get_signing_key_from_jwt(
                body["access_token"]
            ),
            algorithms=["ES256"],
            issuer=SIDECAR_ISSUER,
            options={"verify_aud": False},
        )
        # The same instant as the endpoint's decision, so that lifetimes compare exactly.
        result = explained(services, case, subject_token, now=minted["iat"])
    else:
        result = explained(services, case, subject_token, now=int(time.time()))

    # Both agree with each other, and with what the case expects.
    if case.error is None:
        assert response.status_code == 200, body
        assert result["decision"] == "granted", result
        assert tuple(result["scope"]) == tuple(body["scope"].split()) == case.scopes
        lifetime = case.lifetime
        if lifetime is None:
            lifetime = jwt.decode(subject_token, options={"verify_signature": False})["exp"]
            lifetime -= minted["iat"]
            assert lifetime < 120  # shorter than the policy's ttl
        assert result["lifetime"] == body["expires_in"] == lifetime
        assert minted["exp"] - minted["iat"] == lifetime
        aud = minted["aud"] if isinstance(minted["aud"], list) else [minted["aud"]]
        assert result["audience"] == aud
        copied = {"email", "groups"} & set(minted)
        assert set(result["copied_claims"]) == copied
    else:
        assert response.status_code in (400, 401), body
        assert result["decision"] == "denied", result
        assert result["error"] == body["error"] == case.error
        assert "scope" not in result
        assert "lifetime" not in result
        if case.error != "invalid_client":  # authentication fails before any shared step
            assert result["reason"] == audited.reason
    # Explain mints nothing and records nothing.
    assert audit_count(services) == recorded


def test_explain_from_claims_agrees_with_explain_from_the_token(
    services: Services, idp: TestIdP
) -> None:
    # One service for the whole table: `--claims` skips only the token's verification.
    now = int(time.time())
    for case in CASES:
        if case.error == "invalid_request":
            continue  # a token that fails verification has no claims to take as verified
        subject_token = token_for(idp, case)
        claims = jwt.decode(subject_token, options={"verify_signature": False})

        from_token = explained(services, case, subject_token, now)
        from_claims = explained(services, case, claims, now)

        assert from_claims == from_token, case.id


@pytest.mark.parametrize(
    "claims",
    [{"iss": "https://idp.evil.example"}, {"nonce": "n-0S6_WzA2Mj"}],
    ids=["untrusted-issuer", "id-token"],
)
def test_claims_that_the_token_endpoint_refuses_before_any_policy_are_refused(
    claims: dict[str, Any], server: LiveServer, services: Services, idp: TestIdP
) -> None:
    # --claims skips signature and audience checks only: a token from an issuer the service
    # does not trust, or an ID token, is refused by /token whatever the policies say.
    subject_token = idp.token(**claims)
    response = server.exchange(subject_token)
    unverified = jwt.decode(subject_token, options={"verify_signature": False})

    result = explained(services, Case("x"), unverified, now=int(time.time()))

    assert response.json()["error"] == "invalid_request"
    assert result["decision"] == "denied"
    assert result["error"] == "invalid_request"
    assert result["reason"] == last_audit(services).reason


def test_explain_names_the_policy_and_the_failed_condition(
    services: Services, idp: TestIdP
) -> None:
    case = Case("x", audiences=(CONDITIONAL,))
    token = idp.token(groups=["eng"], mfa=False)

    result = explained(services, case, token, now=int(time.time()))

    assert result == {
        "decision": "denied",
        "client_id": "gateway",
        "error": "invalid_target",
        "reason": "policy payroll for engineers: condition failed: mfa equals true",
    }


def test_explain_names_the_policy_that_granted(services: Services, idp: TestIdP) -> None:
    case = Case("x", audiences=(CONDITIONAL,), scope="code.search")
    token = idp.token(groups=["eng"], mfa=True, email="alice@example.com")

    result = explained(services, case, token, now=int(time.time()))

    assert result == {
        "decision": "granted",
        "client_id": "gateway",
        "policies": ["payroll for engineers"],
        "audience": [CONDITIONAL],
        "scope": ["code.search"],
        "lifetime": 90,
        "copied_claims": ["email", "groups"],
        "credential": "mint",
    }


@pytest.mark.parametrize(
    "claims",
    [
        {"iss": TestIdP.issuer},
        {"iss": TestIdP.issuer, "sub": ""},
        {"iss": 1, "sub": "alice"},
        {"iss": TestIdP.issuer, "sub": "alice", "exp": "soon"},
        {"iss": TestIdP.issuer, "sub": "alice", "exp": True},
        {"iss": TestIdP.issuer, "sub": "alice", "exp": 1_000_000_000},
    ],
    ids=["no-sub", "empty-sub", "iss-not-a-string", "exp-a-string", "exp-a-boolean", "expired"],
)
def test_explain_refuses_claims_the_token_endpoint_would_refuse(
    services: Services, claims: dict[str, Any]
) -> None:
    result = explained(services, Case("x"), claims, now=int(time.time()))
    assert (result["decision"], result["error"]) == ("denied", "invalid_request")


def test_explain_claims_without_exp_last_the_policy_ttl(services: Services) -> None:
    claims = {"iss": TestIdP.issuer, "sub": "alice"}
    result = explained(services, Case("x"), claims, now=int(time.time()))
    assert (result["decision"], result["lifetime"]) == ("granted", 120)


# --- the command ----------------------------------------------------------------------------------


@pytest.fixture
def config_file(tmp_path: Path, config: dict[str, Any], services: Services) -> Path:
    """The configuration of the running service, whose database `services` prepared."""
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_explain(config_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "SIDECAR_CONFIG"}
    return subprocess.run(
        [*SIDECAR, "--config", str(config_file), "policy", "explain", *args, "--json"],
        capture_output=True,
        text=True,
        env=environment,
        timeout=60,
    )


def test_policy_explain_command_exits_0_when_granted(
    config_file: Path, tmp_path: Path, idp: TestIdP
) -> None:
    token_file = tmp_path / "subject.jwt"
    token_file.write_text(idp.token(groups=["eng"], mfa=True) + "\n")

    result = run_explain(
        config_file,
        "--client", "gateway",
        "--audience", CONDITIONAL,
        "--scope", "code.read code.search",
        "--subject-token", str(token_file),
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["decision"] == "granted"
    assert report["policies"] == ["payroll for engineers"]
    assert report["scope"] == ["code.read", "code.search"]
    assert report["lifetime"] == 90


@pytest.mark.parametrize("claims", ["[1]", '"a.b.c"', "42", "null", "{not json"])
def test_policy_explain_command_refuses_claims_that_are_not_a_json_object(
    config_file: Path, claims: str
) -> None:
    # In-process through click: the subprocess tests around cover the installed command.
    result = CliRunner().invoke(
        main,
        ["--config", str(config_file), "policy", "explain", "--client", "gateway",
         "--audience", CODE_SEARCH, "--claims", claims],
        env={},
    )  # fmt: skip

    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.startswith("sidecar: error: --claims ")


def test_policy_explain_command_exits_3_when_refused(config_file: Path) -> None:
    claims = {"iss": TestIdP.issuer, "sub": "bob@example.com", "groups": ["sales"], "mfa": True}

    result = run_explain(
        config_file,
        "--client", "gateway",
        "--audience", CONDITIONAL,
        "--claims", json.dumps(claims),
    )  # fmt: skip

    assert result.returncode == 3, result.stderr
    report = json.loads(result.stdout)
    assert report == {
        "decision": "denied",
        "client_id": "gateway",
        "error": "invalid_target",
        "reason": "policy payroll for engineers: condition failed: groups contains 'eng'",
    }


# --- explain --policies FILE, and the text output -------------------------------------------------

ENGINEERS_ONLY = {
    "name": "engineers only",
    "client_id": "gateway",
    "audience": CODE_SEARCH,
    "subject": {"groups": {"contains": "eng"}},
    "scopes": ["code.read"],
    "default_scopes": ["code.read"],
    "ttl": 30,
}
SALES_CLAIMS = json.dumps({"iss": TestIdP.issuer, "sub": "bob@example.com", "groups": ["sales"]})


def explain_in_process(config_file: Path, *args: str) -> Any:
    return CliRunner().invoke(
        main, ["--config", str(config_file), "policy", "explain", *args], env={}
    )


def test_policy_explain_decides_with_a_policy_file_instead_of_the_table(
    config_file: Path, tmp_path: Path
) -> None:
    # The table lets any subject of the gateway search code; the proposed file engineers only.
    proposed = tmp_path / "proposed.yaml"
    proposed.write_text(yaml.safe_dump({"policies": [ENGINEERS_ONLY]}))
    request = ["--client", "gateway", "--audience", CODE_SEARCH, "--claims", SALES_CLAIMS]

    live = explain_in_process(config_file, *request)
    from_file = explain_in_process(config_file, *request, "--policies", str(proposed))

    assert live.exit_code == 0, live.output
    assert from_file.exit_code == 3, from_file.output
    assert from_file.stdout.splitlines() == [
        "decision: denied",
        "client_id: gateway",
        "error: invalid_target",
        "reason: policy engineers only: condition failed: groups contains 'eng'",
    ]


def test_policy_explain_with_a_policy_file_needs_no_database(
    config: dict[str, Any], tmp_path: Path
) -> None:
    database = tmp_path / "never" / "sidecar.db"
    config["database_url"] = f"sqlite:///{database}"
    config_file = tmp_path / "no-database.yaml"
    config_file.write_text(yaml.safe_dump(config))

    # A whole config file serves as the policy file: its `policies:`.
    result = explain_in_process(
        config_file, "--client", "gateway", "--audience", CODE_SEARCH,
        "--claims", SALES_CLAIMS, "--policies", str(config_file), "--json",
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["lifetime"] == 120
    assert not database.exists()


def test_policy_explain_refuses_an_invalid_policy_file_with_exit_2(
    config_file: Path, tmp_path: Path
) -> None:
    invalid = tmp_path / "invalid.yaml"
    invalid.write_text(yaml.safe_dump({"policies": [{**ENGINEERS_ONLY, "client_id": "nobody"}]}))

    result = explain_in_process(
        config_file, "--client", "gateway", "--audience", CODE_SEARCH,
        "--claims", SALES_CLAIMS, "--policies", str(invalid),
    )  # fmt: skip

    assert result.exit_code == 2
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("sidecar: error: invalid policies: ")
    assert "nobody" in line


def test_policy_explain_prints_a_grant_as_key_value_lines(config_file: Path) -> None:
    claims = {"iss": TestIdP.issuer, "sub": "alice", "groups": ["eng"], "mfa": True,
              "email": "alice@example.com"}  # fmt: skip

    result = explain_in_process(
        config_file, "--client", "gateway", "--audience", CONDITIONAL,
        "--scope", "code.read code.search", "--claims", json.dumps(claims),
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "decision: granted",
        "client_id: gateway",
        "policies: payroll for engineers",
        f"audience: {CONDITIONAL}",
        "scope: code.read code.search",
        "lifetime: 90",
        "copied_claims: email groups",
        "credential: mint",
    ]


def test_policy_explain_prints_values_as_yaml_spells_them(
    config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No field of today's result is a boolean or null: the printing is checked on one that is.
    result_with_every_kind = {
        "decision": "granted",
        "reuse_tokens": True,
        "cached": False,
        "upstream": None,
        "copied_claims": [],
        "scope": ["code.read", "code.search"],
        "lifetime": 60,
    }
    monkeypatch.setattr(
        "sidecar.cli.explain.explain", lambda services, **request: result_with_every_kind
    )

    result = explain_in_process(
        config_file, "--client", "gateway", "--audience", CODE_SEARCH, "--claims", SALES_CLAIMS
    )

    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "decision: granted",
        "reuse_tokens: true",
        "cached: false",
        "upstream: null",
        "copied_claims: []",
        "scope: code.read code.search",
        "lifetime: 60",
    ]
