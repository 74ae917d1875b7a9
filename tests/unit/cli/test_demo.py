"""``sidecar demo-init`` and ``sidecar demo-token`` (sidecar/cli/demo.py), in-process through
click: the demo identity provider's key pair beside the first trusted issuer's ``jwks_file`` (or
in ``keys/`` of the working directory without ``--config``), and subject tokens signed with it.
tests/functional/test_cli.py runs them as the README does, on deploy/demo.yaml."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml

from sidecar.config import load_settings
from tests.conftest import CODE_SEARCH, TestIdP, make_services
from tests.unit.support import cli, invoke, one_line_error

KEY_NAME = "demo-idp.key.pem"


@pytest.fixture
def demo_jwks(tmp_path: Path) -> Path:
    """Where the configuration expects the demo IdP's JWKS (not there yet)."""
    return tmp_path / "demo" / "idp.jwks.json"


@pytest.fixture
def config_file(config: dict[str, Any], demo_jwks: Path, tmp_path: Path) -> Path:
    config["trusted_issuers"][0]["jwks_file"] = str(demo_jwks)
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def initialised(config_file: Path) -> Path:
    result = cli(config_file, "demo-init")
    assert result.exit_code == 0, result.output
    return config_file


def verified(token: str, jwks: Path, idp: TestIdP, audience: str | None = None) -> dict[str, Any]:
    """The claims of a demo token, verified with the published JWKS."""
    key = jwt.PyJWKSet.from_json(jwks.read_text())[jwt.get_unverified_header(token)["kid"]]
    claims: dict[str, Any] = jwt.decode(
        token,
        key,
        algorithms=["ES256"],
        audience=audience or idp.audience,
        issuer=idp.issuer,
    )
    return claims


# --- demo-init --------------------------------------------------------------------------------


def test_demo_init_creates_the_key_pair_beside_the_configured_jwks_file(
    config_file: Path, demo_jwks: Path
) -> None:
    result = cli(config_file, "demo-init")

    private_key = demo_jwks.with_name(KEY_NAME)
    assert result.exit_code == 0, result.output
    assert result.stdout == f"created {private_key} and {demo_jwks}\n"
    assert stat.S_IMODE(private_key.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in private_key.read_bytes()


def test_the_demo_jwks_publishes_the_public_key_only(initialised: Path, demo_jwks: Path) -> None:
    [key] = json.loads(demo_jwks.read_text())["keys"]

    assert (key["kty"], key["crv"], key["alg"], key["use"]) == ("EC", "P-256", "ES256", "sig")
    assert "d" not in key
    assert key["kid"]


def test_demo_init_again_keeps_the_key_pair(initialised: Path, demo_jwks: Path) -> None:
    private_key = demo_jwks.with_name(KEY_NAME)
    before = (private_key.read_bytes(), demo_jwks.read_bytes())

    again = cli(initialised, "demo-init")

    assert again.exit_code == 0, again.output
    assert again.stdout == f"kept {private_key} and {demo_jwks}\n"
    assert (private_key.read_bytes(), demo_jwks.read_bytes()) == before


def test_demo_init_without_a_configuration_writes_to_keys_of_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    result = invoke("demo-init")

    assert result.exit_code == 0, result.output
    assert result.stdout == "created keys/demo-idp.key.pem and keys/demo-idp.jwks.json\n"
    assert (tmp_path / "keys" / KEY_NAME).is_file()
    assert (tmp_path / "keys" / "demo-idp.jwks.json").is_file()


def test_a_relative_jwks_file_is_found_beside_the_configuration(
    config: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "deploy").mkdir()
    (tmp_path / "elsewhere").mkdir()
    config["trusted_issuers"][0]["jwks_file"] = "../keys/idp.jwks.json"
    config_file = tmp_path / "deploy" / "sidecar.yaml"
    config_file.write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path / "elsewhere")

    result = cli(config_file, "demo-init")

    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == [KEY_NAME, "idp.jwks.json"]
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_demo_init_never_replaces_a_jwks_file_it_did_not_create(
    config: dict[str, Any], idp: TestIdP, tmp_path: Path
) -> None:
    config_file = tmp_path / "sidecar.yaml"  # the test IdP's jwks_file, which exists
    config_file.write_text(yaml.safe_dump(config))
    published = idp.jwks_path.read_bytes()

    cli(config_file, "demo-init")

    assert idp.jwks_path.read_bytes() == published


# --- demo-token -------------------------------------------------------------------------------


def test_demo_token_is_signed_by_the_demo_key_for_the_first_trusted_issuer(
    initialised: Path, demo_jwks: Path, idp: TestIdP
) -> None:
    result = cli(initialised, "demo-token")

    assert result.exit_code == 0, result.output
    token = result.stdout.strip()
    claims = verified(token, demo_jwks, idp)
    assert claims["sub"] == "alice@example.com"
    assert claims["scope"] == "code.read code.search"
    assert claims["exp"] - claims["iat"] == 3600
    assert claims["jti"]
    assert jwt.get_unverified_header(token)["typ"] == "at+jwt"


def test_demo_token_options_set_its_claims(
    initialised: Path, demo_jwks: Path, idp: TestIdP
) -> None:
    result = cli(
        initialised,
        "demo-token",
        "--sub", "bob@example.com",
        "--scope", "tickets.read",
        "--ttl", "90",
        "--audience", "https://other-gateway.test.example",
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    claims = verified(
        result.stdout.strip(), demo_jwks, idp, audience="https://other-gateway.test.example"
    )
    assert (claims["sub"], claims["scope"]) == ("bob@example.com", "tickets.read")
    assert claims["exp"] - claims["iat"] == 90


def test_each_demo_token_is_a_new_one(initialised: Path) -> None:
    tokens = {cli(initialised, "demo-token").stdout for _ in range(2)}

    assert len(tokens) == 2


def test_a_demo_token_is_granted_by_the_service(initialised: Path, tmp_path: Path) -> None:
    make_services(load_settings(initialised)).close()
    token_file = tmp_path / "subject.jwt"
    token_file.write_text(cli(initialised, "demo-token").stdout)

    result = cli(
        initialised,
        "policy", "explain",
        "--client", "gateway",
        "--audience", CODE_SEARCH,
        "--subject-token", str(token_file),
        "--json",
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["decision"] == "granted"


def test_demo_token_before_demo_init_says_what_to_run(config_file: Path, demo_jwks: Path) -> None:
    result = cli(config_file, "demo-token")

    assert result.exit_code == 1
    line = one_line_error(result)
    assert str(demo_jwks.with_name(KEY_NAME)) in line
    assert "run `sidecar demo-init`" in line


@pytest.mark.parametrize("ttl", ["0", "86401", "soon"])
def test_demo_token_refuses_a_ttl_out_of_range(initialised: Path, ttl: str) -> None:
    result = cli(initialised, "demo-token", "--ttl", ttl)

    assert result.exit_code == 2
    assert result.stdout == ""
    assert "--ttl" in result.stderr


def test_demo_token_without_a_configuration_exits_2() -> None:
    result = invoke("demo-token")

    assert result.exit_code == 2
    assert one_line_error(result) == (
        "sidecar: error: no configuration: pass --config PATH or set SIDECAR_CONFIG"
    )


def test_demo_commands_with_an_invalid_configuration_exit_2(
    config: dict[str, Any], tmp_path: Path
) -> None:
    config["trusted_issuers"][0]["audiences"] = []
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))

    for command in ("demo-init", "demo-token"):
        result = cli(bad, command)

        assert result.exit_code == 2, command
        assert "trusted_issuers[0].audiences" in one_line_error(result)


# --- demo-token --claim / --claim-json ----------------------------------------------------------


def unverified(result: Any) -> dict[str, Any]:
    """The claims of the token a command printed (its signature is checked above)."""
    assert result.exit_code == 0, result.output
    claims: dict[str, Any] = jwt.decode(result.stdout.strip(), options={"verify_signature": False})
    return claims


def test_claims_are_typed_as_yaml_reads_a_plain_scalar(initialised: Path) -> None:
    result = cli(
        initialised, "demo-token",
        "--claim", "groups=eng,ops",
        "--claim", "teams=core,",
        "--claim", "tenant=acme",
        "--claim", "mfa=true",
        "--claim", "admin=false",
        "--claim", "level=3",
        "--claim", "postcode=01234",
        "--claim", "flags=1,true,x",
        "--claim", "note=",
    )  # fmt: skip

    claims = unverified(result)
    assert {name: claims[name] for name in (
        "groups", "teams", "tenant", "mfa", "admin", "level", "postcode", "flags", "note"
    )} == {
        "groups": ["eng", "ops"],
        "teams": ["core"],
        "tenant": "acme",
        "mfa": True,
        "admin": False,
        "level": 3,
        "postcode": "01234",
        "flags": [1, True, "x"],
        "note": "",
    }  # fmt: skip


def test_claim_json_adds_any_json_value_beside_the_claim_options(
    initialised: Path, demo_jwks: Path, idp: TestIdP
) -> None:
    result = cli(
        initialised, "demo-token", "--sub", "bob",
        "--claim", "tenant=acme",
        "--claim-json", '{"groups": ["eng"], "org": {"id": 7}, "ratio": 0.5}',
        "--claim-json", '{"email": "bob@example.com"}',
    )  # fmt: skip

    claims = verified(result.stdout.strip(), demo_jwks, idp)  # still the demo IdP's token
    assert claims["sub"] == "bob"
    assert claims["tenant"] == "acme"
    assert claims["groups"] == ["eng"]
    assert (claims["org"], claims["ratio"], claims["email"]) == ({"id": 7}, 0.5, "bob@example.com")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--claim", "iss=https://evil.example"], "claim iss is set by demo-token"),
        (["--claim", "aud=x"], "claim aud: give it with --audience"),
        (["--claim-json", '{"exp": 1}'], "claim exp: give it with --ttl"),
        (["--claim", "iat=1"], "claim iat is set by demo-token"),
        (["--claim-json", '{"jti": "x"}'], "claim jti is set by demo-token"),
        (["--claim", "sub=mallory"], "claim sub: give it with --sub"),
        (["--claim-json", '{"scope": "admin"}'], "claim scope: give it with --scope"),
        (["--claim", "tenant=a", "--claim-json", '{"tenant": "b"}'], "claim tenant is given twice"),
        (["--claim", "groups"], "--claim 'groups': write NAME=VALUE"),
        (["--claim", "=eng"], "--claim '=eng': write NAME=VALUE"),
        (["--claim-json", '["eng"]'], "--claim-json must be a JSON object"),
        (["--claim-json", "{groups: eng}"], "--claim-json is not valid JSON"),
    ],
    ids=["iss", "aud", "exp", "iat", "jti", "sub", "scope", "twice", "no-equals", "no-name",
         "json-list", "json-invalid"],
)  # fmt: skip
def test_demo_token_refuses_claims_it_cannot_add(
    initialised: Path, args: list[str], message: str
) -> None:
    result = cli(initialised, "demo-token", *args)

    assert result.exit_code == 2
    assert one_line_error(result).startswith(f"sidecar: error: {message}")


def test_demo_token_never_lets_extra_claims_replace_its_own(initialised: Path) -> None:
    from sidecar.demo import demo_token

    with pytest.raises(ValueError, match="demo_token sets iss itself"):
        demo_token(
            initialised.parent / "demo" / KEY_NAME,
            issuer="https://idp.test.example",
            audience="https://gateway.test.example",
            subject="alice",
            scope="code.read",
            ttl=60,
            extra={"iss": "https://evil.example"},
        )


def test_demo_tokens_with_claims_exercise_subject_conditions_end_to_end(
    initialised: Path, tmp_path: Path
) -> None:
    policies = tmp_path / "policies.yaml"
    policies.write_text(yaml.safe_dump({"policies": [{
        "name": "code-search", "client_id": "gateway", "audience": CODE_SEARCH,
        "issuer": TestIdP.issuer,
        "subject": {"groups": {"contains": "eng"}, "tenant": {"one_of": ["acme", "acme-eu"]}},
        "scopes": ["code.read", "code.search"], "default_scopes": ["code.read"],
        "require_subject_scopes": True, "copy_claims": ["email", "tenant"], "ttl": 120,
    }]}))  # fmt: skip
    for name, claims in [
        ("alice.jwt", ["--claim", "groups=eng,ops", "--claim", "tenant=acme-eu"]),
        ("bob.jwt", ["--claim", "groups=sales,", "--claim", "tenant=acme"]),
    ]:
        token = cli(initialised, "demo-token", "--scope", "code.read", *claims)
        assert token.exit_code == 0, token.output
        (tmp_path / name).write_text(token.stdout)
    cases = tmp_path / "cases.yaml"
    cases.write_text(yaml.safe_dump({"policies": "policies.yaml", "cases": [
        {"name": "alice", "client": "gateway", "subject_token_file": "alice.jwt",
         "audience": CODE_SEARCH,
         "expect": {"decision": "granted", "scopes": ["code.read"], "copied_claims": ["tenant"]}},
        {"name": "bob", "client": "gateway", "subject_token_file": "bob.jwt",
         "audience": CODE_SEARCH,
         "expect": {"decision": "denied", "reason": "groups contains 'eng'"}},
    ]}))  # fmt: skip

    result = cli(initialised, "policy", "test", str(cases))

    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[:2] == ["PASS alice", "PASS bob"]
