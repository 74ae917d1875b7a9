"""Each section model of the configuration (sidecar/config/models.py): its defaults, its bounds,
and errors that name the key path. Section models are validated directly; the rules across
sections (``Settings``) through ``settings_from_mapping`` on the shared test configuration. YAML,
substitution and the checks test_loading.py makes through a file are not repeated here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from sidecar.config import (
    CachesConfig,
    ConfigError,
    KeysConfig,
    TokensConfig,
    format_validation_error,
    settings_from_mapping,
)
from sidecar.config.parties import (
    AdminConfig,
    AdminCredential,
    ClientConfig,
    RateLimitConfig,
    TrustedIssuerConfig,
)
from sidecar.exchange.request import TOKEN_EXCHANGE_GRANT

ADMIN_TOKEN = "admin-token-" + "t" * 24
JWKS = {"keys": [{"kty": "EC", "crv": "P-256", "x": "x", "y": "y"}]}


def refusal(model: type[BaseModel], **values: Any) -> str:
    """The error text of validating ``values`` as ``model``: each line starts with its key
    path, as the configuration reports it."""
    with pytest.raises(ValidationError) as caught:
        model.model_validate(values)
    return format_validation_error(caught.value)


def refused(config: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        settings_from_mapping(config, env={})
    return str(caught.value)


# --- tokens ---------------------------------------------------------------------------------------


def test_tokens_defaults() -> None:
    assert TokensConfig().model_dump() == {"algorithm": "ES256", "max_ttl": 300, "leeway": 30}


@pytest.mark.parametrize(("name", "value"), [("max_ttl", 10), ("max_ttl", 3600), ("leeway", 300)])
def test_tokens_bounds_are_inclusive(name: str, value: int) -> None:
    assert getattr(TokensConfig.model_validate({name: value}), name) == value


@pytest.mark.parametrize(("name", "value"), [("max_ttl", 9), ("max_ttl", 3601), ("leeway", 301)])
def test_tokens_out_of_bounds_name_the_key(name: str, value: int) -> None:
    assert refusal(TokensConfig, **{name: value}).startswith(f"{name}: ")


# --- keys -----------------------------------------------------------------------------------------


def test_keys_defaults() -> None:
    keys = KeysConfig()
    assert (keys.rotate_every, keys.publish_ahead, keys.retain_after) == (86400.0, 900.0, 900.0)
    assert (keys.refresh_interval, keys.encryption_key, keys.directory) == (10.0, None, None)


def test_rotate_every_of_a_minute_is_accepted() -> None:
    assert KeysConfig(rotate_every="60s").rotate_every == 60.0  # type: ignore[arg-type]


def test_rotate_every_under_a_minute_names_the_key() -> None:
    assert refusal(KeysConfig, rotate_every="59s") == "rotate_every: must be at least 60s"


def test_a_key_directory_with_an_encryption_key_is_refused() -> None:
    message = refusal(KeysConfig, directory="/keys", encryption_key="k" * 32)
    assert "cannot be used with directory" in message
    assert "k" * 32 not in message


def test_a_key_directory_is_a_path() -> None:
    assert KeysConfig(directory="keys/signing").directory == Path("keys/signing")  # type: ignore[arg-type]


def keys_config(config: dict[str, Any], **keys: Any) -> dict[str, Any]:
    config["keys"] = {"rotate_every": "24h", "publish_ahead": "15m", "retain_after": "15m", **keys}
    return config


def test_publish_ahead_of_twice_the_refresh_interval_is_accepted(config: dict[str, Any]) -> None:
    settings = settings_from_mapping(
        keys_config(config, publish_ahead="20s", refresh_interval="10s"), env={}
    )
    assert (settings.keys.publish_ahead, settings.keys.refresh_interval) == (20.0, 10.0)


def test_publish_ahead_under_twice_the_refresh_interval_is_refused(
    config: dict[str, Any],
) -> None:
    message = refused(keys_config(config, publish_ahead="19s", refresh_interval="10s"))
    assert message == "keys.publish_ahead must be at least twice keys.refresh_interval"


def test_publish_ahead_as_long_as_rotate_every_is_refused(config: dict[str, Any]) -> None:
    message = refused(keys_config(config, rotate_every="1h", publish_ahead="1h"))
    assert message == "keys.publish_ahead must be shorter than keys.rotate_every"


@pytest.mark.parametrize(
    ("publish_ahead", "refresh_interval", "max_age"),
    [("15m", "10s", 300), ("100s", "10s", 90), ("20s", "10s", 10)],
)
def test_verifiers_may_cache_the_jwks_until_a_new_key_could_sign(
    config: dict[str, Any], publish_ahead: str, refresh_interval: str, max_age: int
) -> None:
    # A new key is stored publish_ahead before it signs and reaches every worker within
    # refresh_interval: a JWKS fetched just before must be refetched in the time left (5 min
    # at most).
    settings = settings_from_mapping(
        keys_config(config, publish_ahead=publish_ahead, refresh_interval=refresh_interval),
        env={},
    )
    assert settings.jwks_max_age == max_age


# --- trusted issuers ------------------------------------------------------------------------------

ISSUER = {
    "issuer": "https://idp.example",
    "jwks_uri": "https://idp.example/jwks",
    "audiences": ["x"],
}


def test_trusted_issuer_defaults() -> None:
    issuer = TrustedIssuerConfig.model_validate(ISSUER)
    assert issuer.algorithms == ["RS256", "ES256"]
    assert (issuer.refresh_interval, issuer.min_refetch_interval) == (300.0, 30.0)
    assert (issuer.fetch_timeout, issuer.max_stale) == (3.0, 3600.0)


def test_the_issuer_is_kept_byte_for_byte() -> None:
    issuer = TrustedIssuerConfig.model_validate({**ISSUER, "issuer": "https://IdP.example/"})
    assert issuer.issuer == "https://IdP.example/"


def test_max_stale_shorter_than_the_refresh_interval_is_refused() -> None:
    message = refusal(TrustedIssuerConfig, **ISSUER, refresh_interval="10m", max_stale="5m")
    assert message == "max_stale must be at least refresh_interval"


def test_an_unknown_issuer_key_names_its_path() -> None:
    assert refusal(TrustedIssuerConfig, **ISSUER, jwks_url="https://x").startswith("jwks_url: ")


# --- rate limits ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "key"),
    [({"per_second": 0, "burst": 1}, "per_second"), ({"per_second": 1, "burst": 0}, "burst")],
)
def test_a_rate_limit_needs_a_positive_rate_and_burst(values: dict[str, Any], key: str) -> None:
    assert refusal(RateLimitConfig, **values).startswith(f"{key}: ")


def test_a_rate_limit_may_be_fractional() -> None:
    assert RateLimitConfig(per_second=0.5, burst=1).per_second == 0.5


# --- clients --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("credential", "methods"),
    [
        ({"client_secret": "s" * 32}, ("client_secret_basic", "client_secret_post")),
        ({"jwks": JWKS}, ("private_key_jwt",)),
        ({"jwks_uri": "https://gateway.example/jwks"}, ("private_key_jwt",)),
    ],
)
def test_a_client_has_one_credential_and_the_methods_it_allows(
    credential: dict[str, Any], methods: tuple[str, ...]
) -> None:
    assert ClientConfig.model_validate({"client_id": "c", **credential}).auth_methods == methods


@pytest.mark.parametrize(
    "credentials",
    [
        {},
        {"client_secret": "s" * 32, "jwks_uri": "https://gateway.example/jwks"},
        {"client_secret": "s" * 32, "jwks": JWKS},
    ],
    ids=["none", "secret-and-jwks_uri", "secret-and-jwks"],
)
def test_a_client_without_exactly_one_credential_is_refused(credentials: dict[str, Any]) -> None:
    message = refusal(ClientConfig, client_id="c", **credentials)
    assert message.startswith("exactly one credential is required")
    assert "s" * 32 not in message


def test_a_client_may_use_token_exchange_by_default() -> None:
    client = ClientConfig(client_id="c", client_secret="s" * 32)  # type: ignore[arg-type]
    assert client.grant_types == [TOKEN_EXCHANGE_GRANT]
    assert client.rate_limit is None


def test_a_client_with_no_grant_types_is_kept_but_may_not_exchange() -> None:
    client = ClientConfig.model_validate({"client_id": "c", "jwks": JWKS, "grant_types": []})
    assert client.grant_types == []


def test_a_client_id_of_255_characters_fits_the_stored_column() -> None:
    assert ClientConfig.model_validate({"client_id": "c" * 255, "jwks": JWKS})


@pytest.mark.parametrize("client_id", ["c" * 256, ""])
def test_a_client_id_that_is_empty_or_too_long_to_store_is_refused(client_id: str) -> None:
    assert refusal(ClientConfig, client_id=client_id, jwks=JWKS).startswith("client_id: ")


def test_a_client_jwks_uri_must_be_https() -> None:
    message = refusal(ClientConfig, client_id="c", jwks_uri="http://gateway.example/jwks")
    assert message.startswith("jwks_uri: must use https")


# --- admin ----------------------------------------------------------------------------------------


def test_an_admin_token_under_32_characters_is_refused_without_echoing_it() -> None:
    message = refusal(AdminCredential, name="ops", token="short-admin-token")
    assert message == "token: must be at least 32 characters"


@pytest.mark.parametrize("name", ["", "has space", "semi;colon", "n" * 65])
def test_an_admin_credential_name_is_a_short_plain_word(name: str) -> None:
    assert refusal(AdminCredential, name=name, token=ADMIN_TOKEN).startswith("name: ")


def test_admin_credential_names_are_distinct() -> None:
    credential = {"name": "ops", "token": ADMIN_TOKEN}
    message = refusal(AdminConfig, credentials=[credential, credential])
    assert message == "credentials: 'ops' appears twice"


def test_admin_needs_a_credential() -> None:
    assert refusal(AdminConfig, credentials=[]).startswith("credentials: ")


@pytest.mark.parametrize(
    ("listen", "port"), [(None, None), ("127.0.0.1:9001", 9001), ("[::1]:9001", 9001)]
)
def test_the_admin_listener_port(listen: str | None, port: int | None) -> None:
    admin = AdminConfig.model_validate(
        {"listen": listen, "credentials": [{"name": "ops", "token": ADMIN_TOKEN}]}
    )
    assert admin.listen_port == port


@pytest.mark.parametrize(
    "listen", ["9001", "127.0.0.1", "host:", "::1:9001", "[::1:9001", "host:123456", "host:65536"]
)
def test_the_admin_listener_is_host_colon_port(listen: str) -> None:
    credentials = [{"name": "ops", "token": ADMIN_TOKEN}]
    assert refusal(AdminConfig, listen=listen, credentials=credentials).startswith("listen: ")


def test_an_admin_error_in_the_file_names_its_full_path(config: dict[str, Any]) -> None:
    config["admin"] = {"credentials": [{"name": "ops", "token": "too-short"}]}
    message = refused(config)
    assert message == "admin.credentials[0].token: must be at least 32 characters"


# --- caches ---------------------------------------------------------------------------------------


def test_caches_are_on_by_default() -> None:
    caches = CachesConfig()
    assert (caches.subject_tokens.enabled, caches.subject_tokens.max_entries) == (True, 10_000)
    minted = caches.minted_tokens
    assert (minted.enabled, minted.max_entries, minted.min_remaining) == (True, 10_000, 0.5)


@pytest.mark.parametrize("value", [0.01, 1])
def test_min_remaining_is_a_fraction_of_the_lifetime(value: float) -> None:
    caches = CachesConfig.model_validate({"minted_tokens": {"min_remaining": value}})
    assert caches.minted_tokens.min_remaining == value


@pytest.mark.parametrize("value", [0, 1.5])
def test_min_remaining_outside_the_lifetime_names_its_path(value: float) -> None:
    message = refusal(CachesConfig, minted_tokens={"min_remaining": value})
    assert message.startswith("minted_tokens.min_remaining: ")


def test_a_server_error_in_the_file_names_its_full_path(config: dict[str, Any]) -> None:
    config["server"] = {"workers": 0}
    assert refused(config).startswith("server.workers: ")


# --- the whole settings ---------------------------------------------------------------------------


def test_a_relative_path_resolves_against_the_config_directory(
    config: dict[str, Any], tmp_path: Path
) -> None:
    settings = settings_from_mapping(config, env={}, config_dir=tmp_path)
    assert settings.resolve_path(Path("keys/a.pem")) == tmp_path / "keys" / "a.pem"
    assert settings.resolve_path(Path("/etc/a.pem")) == Path("/etc/a.pem")


def test_a_missing_key_directory_is_reported_naming_the_key(
    config: dict[str, Any], tmp_path: Path
) -> None:
    keys_config(config, directory="signing-keys")
    settings = settings_from_mapping(config, env={}, config_dir=tmp_path)

    assert settings.missing_files() == [
        f"keys.directory: {tmp_path / 'signing-keys'} is not a directory"
    ]
    (tmp_path / "signing-keys").mkdir()
    assert settings.missing_files() == []


def test_a_short_client_secret_is_a_weakness_naming_the_client(config: dict[str, Any]) -> None:
    config["clients"][0]["client_secret"] = "short-secret"
    settings = settings_from_mapping(config, env={})
    assert settings.weaknesses() == ["clients[0].client_secret is shorter than 16 characters"]


def test_the_shared_test_configuration_has_no_weakness(config: dict[str, Any]) -> None:
    assert settings_from_mapping(config, env={}).weaknesses() == []
