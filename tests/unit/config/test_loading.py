"""The configuration file (sidecar/config/loading.py): substitution, validation, and error messages
that name the key path."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.config import (
    ConfigError,
    PolicyConfig,
    Settings,
    check_policy_set,
    load_policies_file,
    load_policies_with_origins,
    load_settings,
    parse_duration,
)

SECRET = "gateway-secret-" + "x" * 24

BASE: dict[str, Any] = {
    "issuer": "https://sidecar.test.example",
    "database_url": "sqlite:///var/sidecar.db",
    "tokens": {"algorithm": "ES256", "max_ttl": 300, "leeway": 30},
    "keys": {"rotate_every": "24h", "publish_ahead": "15m", "retain_after": "15m"},
    "trusted_issuers": [
        {
            "issuer": "https://idp.test.example",
            "jwks_uri": "https://idp.test.example/.well-known/jwks.json",
            "audiences": ["https://gateway.test.example"],
            "algorithms": ["RS256", "ES256"],
        }
    ],
    "clients": [{"client_id": "gateway", "client_secret": SECRET}],
    "policies": [
        {
            "client_id": "gateway",
            "audience": "https://code-search.internal/mcp",
            "scopes": ["code.read", "code.search"],
            "default_scopes": ["code.read"],
            "ttl": 120,
        }
    ],
}


def config(**changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    data.update(changes)
    return data


def write(tmp_path: Path, data: dict[str, Any] | str, name: str = "sidecar.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def load(tmp_path: Path, data: dict[str, Any] | str, env: dict[str, str] | None = None) -> Settings:
    return load_settings(write(tmp_path, data), env=env or {})


def refused(tmp_path: Path, data: dict[str, Any] | str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, data, env)
    return str(caught.value)


# --- a good file --------------------------------------------------------------------------------


def test_a_complete_file_loads_into_typed_settings(tmp_path: Path) -> None:
    settings = load(tmp_path, config())

    assert settings.issuer == "https://sidecar.test.example"
    assert settings.tokens.algorithm == "ES256"
    assert settings.tokens.max_ttl == 300
    assert settings.keys.rotate_every == 24 * 3600
    assert settings.keys.publish_ahead == 15 * 60
    assert settings.trusted_issuers[0].algorithms == ["RS256", "ES256"]
    assert settings.clients[0].client_secret is not None
    assert settings.clients[0].client_secret.get_secret_value() == SECRET
    assert settings.clients[0].auth_methods == ("client_secret_basic", "client_secret_post")
    assert settings.policies[0].ttl == 120
    assert settings.config_dir == tmp_path.resolve()
    assert settings.token_endpoint == "https://sidecar.test.example/token"
    assert settings.jwks_uri == "https://sidecar.test.example/.well-known/jwks.json"
    assert settings.find_client("gateway") is settings.clients[0]
    assert settings.find_client("nobody") is None


def test_defaults_fill_what_is_left_out(tmp_path: Path) -> None:
    data = config()
    del data["tokens"], data["keys"], data["database_url"], data["policies"]
    del data["trusted_issuers"][0]["algorithms"]

    settings = load(tmp_path, data)

    assert settings.tokens.algorithm == "ES256"
    assert settings.tokens.max_ttl == 300
    assert settings.tokens.leeway == 30
    assert settings.keys.encryption_key is None
    assert settings.database_url.startswith("sqlite:///")
    assert settings.trusted_issuers[0].algorithms == ["RS256", "ES256"]
    assert settings.policies == []


def test_the_demo_configuration_is_valid() -> None:
    demo = Path(__file__).resolve().parents[3] / "deploy" / "demo.yaml"
    assert load_settings(demo, env={}).issuer.startswith("http://127.0.0.1")


def test_secrets_are_not_shown_in_the_settings_repr(tmp_path: Path) -> None:
    data = config()
    data["keys"]["encryption_key"] = "encryption-key-" + "z" * 20
    settings = load(tmp_path, data)

    assert SECRET not in repr(settings)
    assert "encryption-key-" not in repr(settings)


# --- environment substitution -------------------------------------------------------------------


def test_environment_variables_are_substituted(tmp_path: Path) -> None:
    data = config()
    data["clients"][0]["client_secret"] = "${GATEWAY_SECRET}"
    data["trusted_issuers"][0]["issuer"] = "https://${IDP_HOST}"
    data["trusted_issuers"][0]["jwks_uri"] = "https://${IDP_HOST}/jwks.json"

    settings = load(tmp_path, data, env={"GATEWAY_SECRET": SECRET, "IDP_HOST": "idp.example"})

    assert settings.clients[0].client_secret is not None
    assert settings.clients[0].client_secret.get_secret_value() == SECRET
    assert settings.trusted_issuers[0].issuer == "https://idp.example"
    assert settings.trusted_issuers[0].jwks_uri == "https://idp.example/jwks.json"


def test_a_secret_is_read_from_a_file(tmp_path: Path) -> None:
    # A mounted Kubernetes Secret: the value never passes through the environment.
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    (secrets_dir / "gateway").write_text(SECRET + "\n")
    data = config()
    data["clients"][0]["client_secret"] = "${file:secrets/gateway}"

    settings = load(tmp_path, data)

    assert settings.clients[0].client_secret is not None
    assert settings.clients[0].client_secret.get_secret_value() == SECRET


def test_a_secret_file_is_read_again_on_every_load(tmp_path: Path) -> None:
    secret_file = tmp_path / "gateway.secret"
    secret_file.write_text(SECRET)
    data = config()
    data["clients"][0]["client_secret"] = f"${{file:{secret_file}}}"
    first = load(tmp_path, data)
    rotated = "rotated-secret-" + "z" * 24
    secret_file.write_text(rotated)

    second = load(tmp_path, data)

    assert first.clients[0].client_secret is not None
    assert second.clients[0].client_secret is not None
    assert first.clients[0].client_secret.get_secret_value() == SECRET
    assert second.clients[0].client_secret.get_secret_value() == rotated


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        ("${file:missing/secret}", "cannot read"),
        ("${file:}", "names no file"),
        ("${file:big}", "larger than 64 KiB"),
        ("${file:binary}", "is not UTF-8 text"),
    ],
)
def test_an_unusable_secret_file_names_the_key_and_never_a_value(
    tmp_path: Path, reference: str, expected: str
) -> None:
    (tmp_path / "big").write_text("x" * (64 * 1024 + 1))
    (tmp_path / "binary").write_bytes(b"\xff\xfe" + SECRET.encode())
    data = config()
    data["clients"][0]["client_secret"] = reference

    message = refused(tmp_path, data)

    assert message.startswith("clients[0].client_secret: ")
    assert expected in message
    assert SECRET not in message
    assert "xxxxxxxx" not in message


def test_substitution_in_a_number_field_is_validated_as_that_type(tmp_path: Path) -> None:
    data = config()
    data["tokens"]["max_ttl"] = "${MAX_TTL}"
    assert load(tmp_path, data, env={"MAX_TTL": "600"}).tokens.max_ttl == 600
    assert "tokens.max_ttl" in refused(tmp_path, data, env={"MAX_TTL": "ten"})


def test_double_dollar_escapes_a_literal_reference(tmp_path: Path) -> None:
    data = config()
    data["clients"][0]["client_secret"] = "$${NOT_A_VARIABLE}-long-enough"

    settings = load(tmp_path, data)

    assert settings.clients[0].client_secret is not None
    assert settings.clients[0].client_secret.get_secret_value() == "${NOT_A_VARIABLE}-long-enough"


def test_a_substituted_value_is_not_substituted_again(tmp_path: Path) -> None:
    data = config()
    data["clients"][0]["client_secret"] = "${GATEWAY_SECRET}"
    settings = load(tmp_path, data, env={"GATEWAY_SECRET": "${OTHER}-0123456789abcdef"})
    assert settings.clients[0].client_secret is not None
    assert settings.clients[0].client_secret.get_secret_value() == "${OTHER}-0123456789abcdef"


def test_missing_variable_names_the_key_path_and_the_variable(tmp_path: Path) -> None:
    data = config()
    data["clients"][0]["client_secret"] = "${GATEWAY_CLIENT_SECRET}"

    message = refused(tmp_path, data)

    assert "clients[0].client_secret" in message
    assert "GATEWAY_CLIENT_SECRET" in message


def test_missing_variable_deep_in_a_list_names_its_path(tmp_path: Path) -> None:
    data = config()
    data["trusted_issuers"][0]["audiences"] = ["https://a.example", "${GATEWAY_AUD}"]

    message = refused(tmp_path, data)

    assert "trusted_issuers[0].audiences[1]" in message
    assert "GATEWAY_AUD" in message


@pytest.mark.parametrize("reference", ["${}", "${1ABC}", "${A-B}", "${A B}"])
def test_invalid_variable_names_are_refused(tmp_path: Path, reference: str) -> None:
    data = config()
    data["clients"][0]["client_secret"] = reference + "-0123456789abcdef"
    assert "clients[0].client_secret" in refused(tmp_path, data, env={"A": "x", "1ABC": "y"})


def test_empty_environment_value_is_substituted_and_then_validated(tmp_path: Path) -> None:
    data = config()
    data["clients"][0]["client_secret"] = "${GATEWAY_SECRET}"
    assert "clients[0].client_secret" in refused(tmp_path, data, env={"GATEWAY_SECRET": ""})


# --- the file itself ----------------------------------------------------------------------------


def test_duplicate_yaml_keys_are_refused(tmp_path: Path) -> None:
    text = yaml.safe_dump(config(), sort_keys=False) + "issuer: https://other.example\n"
    message = refused(tmp_path, text)
    assert "duplicate key 'issuer'" in message


def test_duplicate_keys_in_a_nested_mapping_are_refused(tmp_path: Path) -> None:
    text = yaml.safe_dump(config(), sort_keys=False).replace(
        "  max_ttl: 300\n", "  max_ttl: 300\n  max_ttl: 3000\n"
    )
    assert "duplicate key 'max_ttl'" in refused(tmp_path, text)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_settings(tmp_path / "absent.yaml", env={})


@pytest.mark.parametrize("text", ["issuer: [unclosed\n", "- a\n- b\n", "just text\n"])
def test_invalid_yaml_or_a_non_mapping_top_level_is_refused(tmp_path: Path, text: str) -> None:
    refused(tmp_path, text)


def test_yaml_tags_that_construct_objects_are_refused(tmp_path: Path) -> None:
    text = "issuer: !!python/object/apply:os.getcwd []\n"
    refused(tmp_path, text)


def test_config_dir_is_not_a_yaml_key(tmp_path: Path) -> None:
    assert "config_dir" in refused(tmp_path, config(config_dir="/etc"))


# --- unknown keys and bad values name the key path ----------------------------------------------


def test_unknown_top_level_key_is_refused(tmp_path: Path) -> None:
    assert "isuer" in refused(tmp_path, config(isuer="https://typo.example"))


def test_unknown_nested_key_names_its_path(tmp_path: Path) -> None:
    data = config()
    data["trusted_issuers"][0]["jwks_url"] = "https://idp.test.example/jwks"
    assert "trusted_issuers[0].jwks_url" in refused(tmp_path, data)


@pytest.mark.parametrize("algorithm", ["HS256", "none", "None", "HS512", "RS1"])
def test_symmetric_or_none_issuer_algorithms_are_refused(tmp_path: Path, algorithm: str) -> None:
    data = config()
    data["trusted_issuers"][0]["algorithms"] = [algorithm]
    assert "trusted_issuers[0].algorithms[0]" in refused(tmp_path, data)


def test_bad_algorithm_position_is_named(tmp_path: Path) -> None:
    data = config()
    data["trusted_issuers"][0]["algorithms"] = ["RS256", "HS256"]
    assert "trusted_issuers[0].algorithms[1]" in refused(tmp_path, data)


def test_empty_algorithm_list_is_refused(tmp_path: Path) -> None:
    data = config()
    data["trusted_issuers"][0]["algorithms"] = []
    assert "trusted_issuers[0].algorithms" in refused(tmp_path, data)


@pytest.mark.parametrize("algorithm", ["HS256", "none", "RS512", "ES384"])
def test_unsupported_signing_algorithm_is_refused(tmp_path: Path, algorithm: str) -> None:
    data = config()
    data["tokens"]["algorithm"] = algorithm
    assert "tokens.algorithm" in refused(tmp_path, data)


@pytest.mark.parametrize("algorithm", ["ES256", "EdDSA", "RS256", "PS256"])
def test_supported_signing_algorithms_are_accepted(tmp_path: Path, algorithm: str) -> None:
    data = config()
    data["tokens"]["algorithm"] = algorithm
    assert load(tmp_path, data).tokens.algorithm == algorithm


def test_jwks_uri_and_jwks_file_together_are_refused(tmp_path: Path) -> None:
    data = config()
    data["trusted_issuers"][0]["jwks_file"] = "idp.jwks.json"
    message = refused(tmp_path, data)
    assert "trusted_issuers[0]" in message
    assert "exactly one of jwks_uri or jwks_file" in message


def test_neither_jwks_uri_nor_jwks_file_is_refused(tmp_path: Path) -> None:
    data = config()
    del data["trusted_issuers"][0]["jwks_uri"]
    assert "exactly one of jwks_uri or jwks_file" in refused(tmp_path, data)


def test_jwks_file_alone_is_accepted_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "idp.jwks.json").write_text('{"keys": []}')
    data = config()
    del data["trusted_issuers"][0]["jwks_uri"]
    data["trusted_issuers"][0]["jwks_file"] = "keys/idp.jwks.json"
    settings = load(tmp_path, data)
    assert settings.trusted_issuers[0].jwks_file == Path("keys/idp.jwks.json")
    assert settings.resolve_path(Path("keys/idp.jwks.json")) == tmp_path / "keys" / "idp.jwks.json"


def test_a_missing_jwks_file_is_reported_naming_the_key(tmp_path: Path) -> None:
    data = config()
    del data["trusted_issuers"][0]["jwks_uri"]
    data["trusted_issuers"][0]["jwks_file"] = "keys/missing.jwks.json"
    (message,) = load(tmp_path, data).missing_files()
    assert message.startswith("trusted_issuers[0].jwks_file: ")
    assert "missing.jwks.json" in message


@pytest.mark.parametrize(
    ("keys", "complaint"),
    [
        ({"rotate_every": "1h", "publish_ahead": "1h"}, "shorter than keys.rotate_every"),
        ({"publish_ahead": "15s", "refresh_interval": "10s"}, "twice keys.refresh_interval"),
    ],
)
def test_key_timings_that_would_sign_with_an_unseen_key_are_refused(
    tmp_path: Path, keys: dict[str, str], complaint: str
) -> None:
    data = config()
    data["keys"] = keys
    assert complaint in refused(tmp_path, data)


def test_an_unknown_grant_type_is_refused_naming_the_client(tmp_path: Path) -> None:
    data = config()
    data["clients"][0]["grant_types"] = ["client_credentials"]
    assert "clients[0].grant_types[0]" in refused(tmp_path, data)


def test_an_empty_audience_is_refused(tmp_path: Path) -> None:
    data = config()
    data["trusted_issuers"][0]["audiences"] = [""]
    assert "trusted_issuers[0].audiences[0]" in refused(tmp_path, data)


@pytest.mark.parametrize(
    "issuer", ["http://127.0.0.1:9000", "http://localhost:9000", "http://[::1]:9000"]
)
def test_http_issuer_is_allowed_on_loopback(tmp_path: Path, issuer: str) -> None:
    data = config()
    data["trusted_issuers"][0]["issuer"] = issuer
    assert load(tmp_path, data).trusted_issuers[0].issuer == issuer


@pytest.mark.parametrize(
    "issuer",
    [
        "http://idp.test.example",
        "http://localhost.evil.example",
        "http://10.0.0.1",
        "ftp://idp.test.example",
        "idp.test.example",
        "https://",
        "https://idp.test.example?tenant=1",
        "https://idp.test.example#x",
    ],
)
def test_non_https_or_malformed_trusted_issuer_is_refused(tmp_path: Path, issuer: str) -> None:
    data = config()
    data["trusted_issuers"][0]["issuer"] = issuer
    assert "trusted_issuers[0].issuer" in refused(tmp_path, data)


def test_plain_http_jwks_uri_off_loopback_is_refused(tmp_path: Path) -> None:
    data = config()
    data["trusted_issuers"][0]["jwks_uri"] = "http://idp.test.example/jwks.json"
    assert "trusted_issuers[0].jwks_uri" in refused(tmp_path, data)


def test_own_issuer_among_trusted_issuers_is_refused(tmp_path: Path) -> None:
    data = config()
    data["trusted_issuers"].append({**data["trusted_issuers"][0], "issuer": data["issuer"]})
    assert "own issuer" in refused(tmp_path, data)


def test_the_same_trusted_issuer_twice_is_refused(tmp_path: Path) -> None:
    data = config()
    data["trusted_issuers"].append(copy.deepcopy(data["trusted_issuers"][0]))
    assert "appears twice" in refused(tmp_path, data)


@pytest.mark.parametrize(
    "issuer",
    ["http://sidecar.example", "https://sidecar.example/", "https://sidecar.example?x=1", "x"],
)
def test_bad_own_issuer_is_refused(tmp_path: Path, issuer: str) -> None:
    assert "issuer" in refused(tmp_path, config(issuer=issuer))


def test_empty_audiences_are_refused(tmp_path: Path) -> None:
    data = config()
    data["trusted_issuers"][0]["audiences"] = []
    assert "trusted_issuers[0].audiences" in refused(tmp_path, data)


def test_no_trusted_issuers_or_no_clients_is_refused(tmp_path: Path) -> None:
    assert "trusted_issuers" in refused(tmp_path, config(trusted_issuers=[]))
    assert "clients" in refused(tmp_path, config(clients=[]))


@pytest.mark.parametrize("url", ["mysql://db/sidecar", "sqlite://relative", "postgres"])
def test_unsupported_database_url_is_refused(tmp_path: Path, url: str) -> None:
    assert "database_url" in refused(tmp_path, config(database_url=url))


@pytest.mark.parametrize(("field", "value"), [("max_ttl", 5), ("max_ttl", 7200), ("leeway", -1)])
def test_token_bounds_are_enforced(tmp_path: Path, field: str, value: int) -> None:
    data = config()
    data["tokens"][field] = value
    assert f"tokens.{field}" in refused(tmp_path, data)


# --- clients ------------------------------------------------------------------------------------


def test_client_with_both_a_secret_and_keys_is_refused(tmp_path: Path) -> None:
    data = config()
    data["clients"][0]["jwks_uri"] = "https://gateway.example/jwks.json"
    message = refused(tmp_path, data)
    assert "clients[0]" in message
    assert "exactly one credential" in message


def test_client_without_credentials_is_refused(tmp_path: Path) -> None:
    data = config()
    del data["clients"][0]["client_secret"]
    assert "exactly one credential" in refused(tmp_path, data)


def test_client_with_jwks_and_jwks_uri_is_refused(tmp_path: Path) -> None:
    data = config()
    data["clients"][0] = {
        "client_id": "gateway",
        "jwks": {"keys": []},
        "jwks_uri": "https://gateway.example/jwks.json",
    }
    assert "clients[0]" in refused(tmp_path, data)


def test_client_jwks_must_be_a_jwk_set(tmp_path: Path) -> None:
    data = config()
    data["clients"][0] = {"client_id": "gateway", "jwks": {"kty": "EC"}}
    assert "clients[0]" in refused(tmp_path, data)


def test_private_key_jwt_client_is_accepted(tmp_path: Path) -> None:
    data = config()
    data["clients"][0] = {"client_id": "gateway", "jwks_uri": "https://gateway.example/jwks"}
    assert load(tmp_path, data).clients[0].auth_methods == ("private_key_jwt",)


def test_short_client_secret_is_a_warning_without_echoing_it(tmp_path: Path) -> None:
    data = config()
    data["clients"][0]["client_secret"] = "short-secret"
    (warning,) = load(tmp_path, data).weaknesses()
    assert warning.startswith("clients[0].client_secret")
    assert "short-secret" not in warning


def test_empty_client_secret_is_refused(tmp_path: Path) -> None:
    data = config()
    data["clients"][0]["client_secret"] = ""
    assert "clients[0].client_secret" in refused(tmp_path, data)


def test_duplicate_client_ids_are_refused(tmp_path: Path) -> None:
    data = config()
    data["clients"].append(copy.deepcopy(data["clients"][0]))
    assert "appears twice" in refused(tmp_path, data)


# --- policies -----------------------------------------------------------------------------------


def with_policy(**changes: Any) -> dict[str, Any]:
    data = config()
    data["policies"][0].update(changes)
    return data


def test_policy_ttl_above_max_ttl_is_refused(tmp_path: Path) -> None:
    message = refused(tmp_path, with_policy(ttl=301))
    assert "policies[0]" in message
    assert "max_ttl" in message


def test_policy_ttl_equal_to_max_ttl_is_accepted(tmp_path: Path) -> None:
    assert load(tmp_path, with_policy(ttl=300)).policies[0].ttl == 300


def test_default_scopes_outside_scopes_are_refused(tmp_path: Path) -> None:
    message = refused(tmp_path, with_policy(default_scopes=["code.read", "code.write"]))
    assert "policies[0]" in message
    assert "code.write" in message


@pytest.mark.parametrize("scope", ["*", "all", "ALL", "any", "root", "admin:*", "code.*"])
def test_omnibus_scopes_are_refused(tmp_path: Path, scope: str) -> None:
    message = refused(tmp_path, with_policy(scopes=["code.read", scope], default_scopes=[]))
    assert "policies[0].scopes" in message
    assert "omnibus" in message


@pytest.mark.parametrize("scope", ["two words", 'quo"te', "back\\slash", ""])
def test_invalid_scope_tokens_in_a_policy_are_refused(tmp_path: Path, scope: str) -> None:
    assert "policies[0].scopes" in refused(tmp_path, with_policy(scopes=[scope], default_scopes=[]))


def test_a_scope_listed_twice_is_refused(tmp_path: Path) -> None:
    assert "policies[0].scopes" in refused(tmp_path, with_policy(scopes=["a", "a"]))


def test_empty_scopes_are_refused(tmp_path: Path) -> None:
    assert "policies[0].scopes" in refused(tmp_path, with_policy(scopes=[], default_scopes=[]))


def test_duplicate_client_and_audience_is_refused(tmp_path: Path) -> None:
    data = config()
    data["policies"].append({**data["policies"][0], "ttl": 60})
    message = refused(tmp_path, data)
    assert "policies[1]" in message
    assert "same client and audience" in message


def test_same_audience_for_two_clients_is_accepted(tmp_path: Path) -> None:
    data = config()
    data["clients"].append({"client_id": "other", "client_secret": SECRET})
    data["policies"].append({**data["policies"][0], "client_id": "other"})
    assert len(load(tmp_path, data).policies) == 2


def test_policy_for_an_unknown_client_is_refused(tmp_path: Path) -> None:
    message = refused(tmp_path, with_policy(client_id="nobody"))
    assert "policies[0]" in message
    assert "not one of the configured clients" in message


@pytest.mark.parametrize("claim", ["sub", "iss", "aud", "scope", "act", "may_act", "cnf"])
def test_reserved_claims_cannot_be_copied(tmp_path: Path, claim: str) -> None:
    message = refused(tmp_path, with_policy(copy_claims=["email", claim]))
    assert "policies[0].copy_claims" in message


def test_ordinary_claims_can_be_copied(tmp_path: Path) -> None:
    settings = load(tmp_path, with_policy(copy_claims=["email", "groups"]))
    assert settings.policies[0].copy_claims == ["email", "groups"]


def test_policy_booleans_default_and_reach_the_policy(tmp_path: Path) -> None:
    [defaulted] = load(tmp_path, config()).policies
    assert (defaulted.enabled, defaulted.require_subject_scopes, defaulted.reuse_tokens) == (
        True,
        False,
        True,
    )
    assert defaulted.to_policy().reuse_tokens is True

    [strict] = load(tmp_path, with_policy(require_subject_scopes=True, reuse_tokens=False)).policies
    assert strict.to_policy().require_subject_scopes is True
    assert strict.to_policy().reuse_tokens is False


def test_reuse_tokens_from_yaml_text(tmp_path: Path) -> None:
    text = yaml.safe_dump(config(), sort_keys=False).replace(
        "  ttl: 120\n", "  ttl: 120\n  reuse_tokens: false\n"
    )
    assert load(tmp_path, text).policies[0].reuse_tokens is False


@pytest.mark.parametrize("value", ["sometimes", [True], {"on": True}])
def test_reuse_tokens_that_is_not_a_boolean_is_refused(tmp_path: Path, value: Any) -> None:
    assert "policies[0].reuse_tokens" in refused(tmp_path, with_policy(reuse_tokens=value))


def test_unknown_policy_key_names_its_path(tmp_path: Path) -> None:
    assert "policies[0].scope" in refused(tmp_path, with_policy(scope="code.read"))


# --- keys and durations -------------------------------------------------------------------------


def test_retain_after_shorter_than_max_ttl_plus_leeway_is_refused(tmp_path: Path) -> None:
    data = config()
    data["keys"]["retain_after"] = 329  # max_ttl 300 + leeway 30 = 330
    assert "retain_after" in refused(tmp_path, data)
    data["keys"]["retain_after"] = 330
    assert load(tmp_path, data).keys.retain_after == 330


def test_rotate_every_below_a_minute_is_refused(tmp_path: Path) -> None:
    data = config()
    data["keys"]["rotate_every"] = "30s"
    assert "keys.rotate_every" in refused(tmp_path, data)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (90, 90.0),
        (1.5, 1.5),
        ("90", 90.0),
        ("90s", 90.0),
        ("15m", 900.0),
        ("24h", 86400.0),
        ("7d", 604800.0),
        ("500ms", 0.5),
        (" 5m ", 300.0),
        ("0", 0.0),
    ],
)
def test_durations(value: Any, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["15 minutes", "1.5h", "-5m", "m", "", "1h30m", True, None, -1])
def test_bad_durations_are_refused(value: Any) -> None:
    with pytest.raises(ValueError, match=r"duration|negative"):
        parse_duration(value)


def test_bad_duration_in_the_file_names_its_path(tmp_path: Path) -> None:
    data = config()
    data["keys"]["publish_ahead"] = "fifteen minutes"
    assert "keys.publish_ahead" in refused(tmp_path, data)


def test_durations_in_the_file(tmp_path: Path) -> None:
    data = config()
    data["keys"] = {"rotate_every": 3600, "publish_ahead": "90s", "retain_after": "1h"}
    data["trusted_issuers"][0]["refresh_interval"] = "10m"
    settings = load(tmp_path, data)
    assert settings.keys.rotate_every == 3600
    assert settings.keys.publish_ahead == 90
    assert settings.keys.retain_after == 3600
    assert settings.trusted_issuers[0].refresh_interval == 600


def test_short_encryption_key_is_a_warning_without_echoing_it(tmp_path: Path) -> None:
    data = config()
    data["keys"]["encryption_key"] = "tiny-key"
    (warning,) = load(tmp_path, data).weaknesses()
    assert "keys.encryption_key" in warning
    assert "tiny-key" not in warning


def test_empty_encryption_key_is_refused(tmp_path: Path) -> None:
    data = config()
    data["keys"]["encryption_key"] = ""
    assert "keys.encryption_key" in refused(tmp_path, data)


# --- load_policies_file -------------------------------------------------------------------------


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load(tmp_path, config())


def test_policies_file_is_loaded(tmp_path: Path, settings: Settings) -> None:
    path = write(
        tmp_path,
        {
            "policies": [
                {
                    "client_id": "gateway",
                    "audience": "https://tickets.internal/mcp",
                    "scopes": ["tickets.read"],
                    "default_scopes": ["tickets.read"],
                    "ttl": 60,
                }
            ]
        },
        "policies.yaml",
    )

    policies = load_policies_file(path, settings)

    assert [p.audience for p in policies] == ["https://tickets.internal/mcp"]
    assert policies[0].scopes == ["tickets.read"]


def test_the_config_files_own_policies_section_loads(tmp_path: Path, settings: Settings) -> None:
    path = write(tmp_path, config(), "whole-config.yaml")
    assert len(load_policies_file(path, settings)) == 1


def test_policies_file_without_policies_is_refused(tmp_path: Path, settings: Settings) -> None:
    with pytest.raises(ConfigError, match="policies"):
        load_policies_file(write(tmp_path, {"other": 1}, "p.yaml"), settings)


def test_policies_must_be_a_list(tmp_path: Path, settings: Settings) -> None:
    with pytest.raises(ConfigError, match="policies"):
        load_policies_file(write(tmp_path, {"policies": {"a": 1}}, "p.yaml"), settings)


def test_bad_policy_in_a_file_names_its_path(tmp_path: Path, settings: Settings) -> None:
    bad = {**BASE["policies"][0], "scopes": ["*"], "default_scopes": []}
    good = {**BASE["policies"][0], "audience": "https://other.internal"}
    with pytest.raises(ConfigError, match=r"policies\[1\]\.scopes"):
        load_policies_file(write(tmp_path, {"policies": [good, bad]}, "p.yaml"), settings)


def test_policy_file_is_checked_against_the_settings(tmp_path: Path, settings: Settings) -> None:
    unknown_client = {**BASE["policies"][0], "client_id": "nobody"}
    with pytest.raises(ConfigError, match=r"p\.yaml, line 2\): client_id 'nobody' is not one of"):
        load_policies_file(write(tmp_path, {"policies": [unknown_client]}, "p.yaml"), settings)

    too_long = {**BASE["policies"][0], "ttl": 3000}
    with pytest.raises(ConfigError, match="max_ttl"):
        load_policies_file(write(tmp_path, {"policies": [too_long]}, "p.yaml"), settings)


def test_policy_file_with_duplicate_targets_is_refused(tmp_path: Path, settings: Settings) -> None:
    policy = BASE["policies"][0]
    with pytest.raises(ConfigError, match="same client and audience"):
        load_policies_file(write(tmp_path, {"policies": [policy, policy]}, "p.yaml"), settings)


def test_policy_file_with_duplicate_yaml_keys_is_refused(
    tmp_path: Path, settings: Settings
) -> None:
    text = yaml.safe_dump({"policies": BASE["policies"]}) + "policies: []\n"
    with pytest.raises(ConfigError, match="duplicate key"):
        load_policies_file(write(tmp_path, text, "p.yaml"), settings)


def test_empty_policy_file_list_is_accepted(tmp_path: Path, settings: Settings) -> None:
    assert load_policies_file(write(tmp_path, {"policies": []}, "p.yaml"), settings) == []


def test_empty_encryption_key_from_the_environment_is_refused(tmp_path: Path) -> None:
    # An exported-but-empty variable must not silently turn encryption at rest off.
    data = config()
    data["keys"]["encryption_key"] = "${SIDECAR_KEY_ENCRYPTION_KEY}"
    message = refused(tmp_path, data, env={"SIDECAR_KEY_ENCRYPTION_KEY": ""})
    assert "keys.encryption_key" in message


def test_unterminated_reference_is_refused(tmp_path: Path) -> None:
    data = config()
    data["clients"][0]["client_secret"] = "${GATEWAY_SECRET-0123456789abcdef"
    message = refused(tmp_path, data, env={"GATEWAY_SECRET": SECRET})
    assert "clients[0].client_secret" in message
    assert "unterminated" in message


# --- policy names, issuer filter, subject conditions, overlap (issue 5) -------------------------

OTHER_IDP = {
    "issuer": "https://other-idp.test.example",
    "jwks_uri": "https://other-idp.test.example/.well-known/jwks.json",
    "audiences": ["https://gateway.test.example"],
}


def with_policies(*policies: dict[str, Any]) -> dict[str, Any]:
    """The base configuration with a second trusted issuer and these policies, each based on
    the base policy."""
    data = config()
    data["trusted_issuers"].append(copy.deepcopy(OTHER_IDP))
    data["policies"] = [{**BASE["policies"][0], **p} for p in policies]
    return data


def test_subject_conditions_load_as_typed_conditions(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        with_policies(
            {
                "subject": {
                    "tenant": {"equals": "acme"},
                    "groups": {"contains": "eng"},
                    "level": {"one_of": [1, 2]},
                    "mfa": {"equals": True},
                }
            }
        ),
    )

    [policy] = [p.to_policy() for p in settings.policies]
    assert {(c.claim, c.operator, c.values) for c in policy.conditions} == {
        ("tenant", "equals", ("acme",)),
        ("groups", "contains", ("eng",)),
        ("level", "one_of", (1, 2)),
        ("mfa", "equals", (True,)),
    }
    # YAML types survive: a boolean stays a boolean, an integer an integer.
    [mfa] = [c for c in policy.conditions if c.claim == "mfa"]
    assert mfa.values[0] is True


def test_a_yaml_condition_keeps_its_type(tmp_path: Path) -> None:
    text = yaml.safe_dump(config()).replace(
        "  ttl: 120\n", '  ttl: 120\n  subject:\n    level: {equals: "1"}\n    mfa: {equals: yes}\n'
    )
    [policy] = [p.to_policy() for p in load(tmp_path, text).policies]
    values = {c.claim: c.values[0] for c in policy.conditions}
    assert values == {"level": "1", "mfa": True}
    assert type(values["level"]) is str
    assert type(values["mfa"]) is bool


@pytest.mark.parametrize(
    "condition",
    [
        {"equals": "acme", "one_of": ["acme"]},
        {"equals": "acme", "contains": "acme"},
        {},
        {"one_of": []},
        {"equals": 1.5},
        {"equals": None},
        {"equals": ["acme"]},
        {"equals": {"a": 1}},
        {"one_of": [["acme"]]},
        {"contains": [1]},
        {"startswith": "ac"},
        "acme",
    ],
)
def test_malformed_subject_condition_is_refused_naming_its_path(
    tmp_path: Path, condition: Any
) -> None:
    message = refused(tmp_path, with_policies({"subject": {"tenant": condition}}))
    assert message.startswith("policies[0].subject.tenant")


def test_issuer_filter_must_name_a_trusted_issuer(tmp_path: Path) -> None:
    accepted = load(tmp_path, with_policies({"issuer": OTHER_IDP["issuer"]}))
    assert accepted.policies[0].to_policy().issuer == OTHER_IDP["issuer"]

    message = refused(tmp_path, with_policies({"name": "code", "issuer": "https://idp.evil"}))
    assert message == (
        "policy \"code\" (policies[0]): issuer 'https://idp.evil' is not one of the trusted_issuers"
    )


@pytest.mark.parametrize(
    ("first", "second"),
    [
        pytest.param(
            {"issuer": "https://idp.test.example"},
            {"issuer": OTHER_IDP["issuer"]},
            id="by-issuer",
        ),
        pytest.param(
            {"subject": {"tenant": {"equals": "acme"}}},
            {"subject": {"tenant": {"equals": "globex"}}},
            id="by-equals",
        ),
        pytest.param(
            {"subject": {"tenant": {"one_of": ["acme", "initech"]}}},
            {"subject": {"tenant": {"one_of": ["globex", "hooli"]}}},
            id="by-one_of",
        ),
        pytest.param(
            {"subject": {"tenant": {"equals": "acme"}, "groups": {"contains": "eng"}}},
            {"subject": {"tenant": {"one_of": ["globex"]}}},
            id="by-one-disjoint-claim",
        ),
        pytest.param({}, {"enabled": False}, id="one-disabled"),
    ],
)
def test_exclusive_policies_for_one_client_and_audience_are_accepted(
    tmp_path: Path, first: dict[str, Any], second: dict[str, Any]
) -> None:
    settings = load(tmp_path, with_policies({"name": "a", **first}, {"name": "b", **second}))
    assert [p.name for p in settings.policies] == ["a", "b"]


@pytest.mark.parametrize(
    ("first", "second"),
    [
        pytest.param({}, {}, id="no-conditions"),
        pytest.param({"issuer": "https://idp.test.example"}, {}, id="one-issuer-filter"),
        pytest.param(
            {"subject": {"groups": {"contains": "eng"}}},
            {"subject": {"groups": {"contains": "sales"}}},
            id="contains",
        ),
        pytest.param(
            {"subject": {"tenant": {"one_of": ["acme", "initech"]}}},
            {"subject": {"tenant": {"one_of": ["initech", "globex"]}}},
            id="intersecting-one_of",
        ),
        pytest.param(
            {"subject": {"tenant": {"equals": "acme"}}},
            {"subject": {"region": {"equals": "eu"}}},
            id="different-claims",
        ),
        pytest.param(
            {},
            {"audience": "HTTPS://Code-Search.INTERNAL:443/mcp"},
            id="same-audience-after-normalisation",
        ),
    ],
)
def test_overlapping_enabled_policies_are_refused_naming_both(
    tmp_path: Path, first: dict[str, Any], second: dict[str, Any]
) -> None:
    message = refused(tmp_path, with_policies({"name": "a", **first}, {"name": "b", **second}))
    assert message.startswith(
        'policy "b" (policies[1]) could match the same requests as policy "a" (policies[0]): '
    )


def test_enabling_a_disabled_duplicate_is_refused(tmp_path: Path) -> None:
    assert load(tmp_path, with_policies({"name": "a"}, {"name": "b", "enabled": False}))
    message = refused(tmp_path, with_policies({"name": "a"}, {"name": "b", "enabled": True}))
    assert 'policy "b" (policies[1])' in message


def test_two_policies_with_one_name_are_refused_naming_it(tmp_path: Path) -> None:
    message = refused(
        tmp_path,
        with_policies({"name": "code"}, {"name": "code", "audience": "https://other.internal"}),
    )
    assert message.startswith(
        'policy "code" (policies[1]): the name is already used by the policy at policies[0]'
    )


def test_default_name_is_client_arrow_audience(tmp_path: Path) -> None:
    [policy] = load(tmp_path, config()).policies
    assert policy.to_policy().name == "gateway -> https://code-search.internal/mcp"


@pytest.mark.parametrize(
    ("bad", "named"),
    [
        pytest.param({"scopes": ["code.read", "*"]}, '"bad-policy", policies[1].scopes', id="*"),
        pytest.param(
            {"scopes": ["code.read", "all"]}, '"bad-policy", policies[1].scopes', id="all"
        ),
        pytest.param({"ttl": 301}, '"bad-policy" (', id="ttl"),
        pytest.param(
            {"default_scopes": ["code.read", "code.write"]},
            '"bad-policy", policies[1].default_scopes',
            id="dflt",
        ),
        pytest.param({"scope": "code.read"}, '"bad-policy", policies[1].scope', id="unknown"),
        pytest.param({"client_id": "nobody"}, '"bad-policy" (', id="client"),
        pytest.param({"issuer": "https://nobody.example"}, '"bad-policy" (', id="iss"),
        pytest.param({"name": "good-policy"}, '"good-policy" (', id="name"),
        pytest.param(
            {"audience": "https://code-search.internal/mcp"}, '"bad-policy" (', id="overlap"
        ),
        pytest.param(
            {"subject": {"tenant": {"equals": 0.5}}}, '"bad-policy", policies[1].subject', id="cond"
        ),
    ],
)
def test_every_policy_refusal_in_a_policy_file_names_the_policy(
    tmp_path: Path, settings: Settings, bad: dict[str, Any], named: str
) -> None:
    good = {**BASE["policies"][0], "name": "good-policy"}
    policy = {**BASE["policies"][0], "name": "bad-policy", "audience": "https://other.internal"}
    path = write(tmp_path, {"policies": [good, {**policy, **bad}]}, "p.yaml")

    with pytest.raises(ConfigError) as caught:
        load_policies_file(path, settings)

    assert named in str(caught.value)
    assert f"{path}, line " in str(caught.value)  # where it is written


def test_a_policy_without_a_name_is_named_by_its_client_and_audience_in_a_refusal(
    tmp_path: Path, settings: Settings
) -> None:
    unnamed = {**BASE["policies"][0], "scopes": "code.read"}
    path = write(tmp_path, {"policies": [unnamed]}, "p.yaml")

    with pytest.raises(ConfigError) as caught:
        load_policies_file(path, settings)

    assert str(caught.value).startswith(
        f'{path}, line 2: policy "gateway -> https://code-search.internal/mcp", '
        "policies[0].scopes: "
    )


def test_a_policy_listing_applied_as_a_file_is_pointed_at_policy_export(
    tmp_path: Path, settings: Settings
) -> None:
    listed = {**BASE["policies"][0], "name": "code", "version": 3}
    path = write(tmp_path, {"policies": [listed]}, "p.yaml")

    with pytest.raises(ConfigError) as caught:
        load_policies_file(path, settings)

    assert str(caught.value) == (
        f'{path}, line 2: policy "code", policies[0].version: Extra inputs are not permitted '
        "(a listing, not a policy file: `policy export` writes one that applies)"
    )


def test_a_default_name_too_long_to_store_is_refused(tmp_path: Path) -> None:
    # "gateway -> " + the audience must fit the 255-character name column (PostgreSQL refuses a
    # longer value at write time); a long audience needs an explicit name.
    audience = "https://long.internal/" + "a" * 240
    message = refused(tmp_path, with_policy(audience=audience))
    assert message.startswith("policies[0]")
    assert "give the policy a name" in message

    named = load(tmp_path, with_policy(audience=audience, name="long upstream"))
    assert named.policies[0].to_policy().name == "long upstream"


# --- upstream credentials (upstreams:, upstreams_file:, policies' credential) -------------------

VENDOR = "https://api.vendor.example/mcp"
BACKENDS = [
    {
        "name": "vendor",
        "url": VENDOR,
        "credentials": {"type": "bearer", "token": "${VENDOR_API_KEY}"},
    }
]


def vendor_policy(**changes: Any) -> dict[str, Any]:
    policy: dict[str, Any] = {
        "client_id": "gateway",
        "audience": VENDOR,
        "scopes": ["vendor.read"],
        "credential": "static",
        "upstream": "vendor",
    }
    policy.update(changes)
    return policy


@pytest.mark.parametrize("shape", ["list", "backends", "upstreams"])
def test_backend_definitions_are_imported_from_upstreams_file(tmp_path: Path, shape: str) -> None:
    document: Any = BACKENDS if shape == "list" else {shape: BACKENDS}
    (tmp_path / "backends.json").write_text(json.dumps(document))

    settings = load(
        tmp_path,
        config(upstreams_file="backends.json", policies=[vendor_policy()]),
        env={"VENDOR_API_KEY": "vk-123"},
    )

    [vendor] = settings.upstreams
    assert (vendor.name, vendor.url, vendor.mode) == ("vendor", VENDOR, "static")
    assert vendor.credentials.token.get_secret_value() == "vk-123"  # type: ignore[union-attr]
    assert "vk-123" not in repr(settings)


def test_inline_upstreams_and_the_file_add_up_and_a_name_twice_is_refused(tmp_path: Path) -> None:
    (tmp_path / "backends.json").write_text(json.dumps(BACKENDS))

    message = refused(
        tmp_path,
        config(upstreams_file="backends.json", upstreams=BACKENDS),
        env={"VENDOR_API_KEY": "vk"},
    )

    assert "upstreams" in message
    assert "vk" not in message.replace("vendor", "")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "cannot read"),
        ("{not json", "not JSON or YAML"),
        ('{"name": "x"}', "must hold a list"),
    ],
)
def test_an_unusable_upstreams_file_names_the_key(
    tmp_path: Path, content: str | None, expected: str
) -> None:
    if content is not None:
        (tmp_path / "backends.json").write_text(content)

    message = refused(tmp_path, config(upstreams_file="backends.json"))

    assert message.startswith("upstreams_file:")
    assert expected in message


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (vendor_policy(upstream="nowhere"), "upstream nowhere is not in upstreams"),
        (vendor_policy(credential="client_credentials"), "does not fit upstream vendor"),
        (vendor_policy(upstream=None), "needs an upstream"),
        (vendor_policy(credential="mint"), "upstream is only for credential"),
        (vendor_policy(credential="api_key"), "credential"),
    ],
)
def test_a_policy_credential_must_fit_a_configured_upstream(
    tmp_path: Path, policy: dict[str, Any], expected: str
) -> None:
    message = refused(
        tmp_path, config(upstreams=BACKENDS, policies=[policy]), env={"VENDOR_API_KEY": "vk"}
    )

    assert expected in message


@pytest.mark.parametrize("database_first", [True, False], ids=["database-first", "file-first"])
def test_an_overlap_with_a_policy_only_in_the_database_suggests_prune(
    tmp_path: Path, settings: Settings, database_first: bool
) -> None:
    """In whichever order the resulting set comes (the store lists it in database order)."""
    stored = {**BASE["policies"][0], "name": "old-code-search"}
    path = write(tmp_path, {"policies": [{**BASE["policies"][0], "name": "code"}]}, "p.yaml")
    configs, origins = load_policies_with_origins(path, settings)
    resulting = [PolicyConfig.model_validate(stored).to_policy(), configs[0].to_policy()]
    if not database_first:
        resulting.reverse()

    with pytest.raises(ValueError, match="could match") as refused:
        check_policy_set(resulting, settings, origins)

    file_policy = f'policy "code" ({path}, line 2)'
    database_policy = f'policy "old-code-search" (in the database, not in {path})'
    first, second = (
        (file_policy, database_policy) if database_first else (database_policy, file_policy)
    )
    assert str(refused.value) == (
        f"{first} could match the same requests as {second}: make their issuer or subject "
        "conditions exclusive, or disable one; `policy apply --prune` deletes the database's "
        "policies the file does not name"
    )
