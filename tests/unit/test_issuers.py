"""Trusted issuers: one key set per issuer, looked up by (issuer, kid); jwks_file resolved
against the configuration's directory; jwks_uri fetched with the configured timeout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from sidecar.config import load_settings
from sidecar.issuers import IssuerDirectory
from tests.conftest import FakeClock

FILE_ISSUER = "https://file-idp.test.example"
URI_ISSUER = "https://uri-idp.test.example"
JWKS_URI = "https://uri-idp.test.example/.well-known/jwks.json"


def jwks(*kids: str) -> dict[str, Any]:
    keys = []
    for kid in kids:
        jwk = ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()).public_key(), as_dict=True)
        jwk.update(kid=kid, alg="ES256")
        keys.append(jwk)
    return {"keys": keys}


class Fetch:
    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.calls: list[tuple[str, float]] = []

    def __call__(self, url: str, timeout: float) -> Any:
        self.calls.append((url, timeout))
        return self.document


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    """A config file in its own directory, naming its jwks_file relative to that directory."""
    directory = tmp_path / "etc" / "sidecar"
    (directory / "keys").mkdir(parents=True)
    (directory / "keys" / "idp.jwks.json").write_text(json.dumps(jwks("file-key")))
    config = {
        "issuer": "https://sidecar.test.example",
        "trusted_issuers": [
            {
                "issuer": FILE_ISSUER,
                "jwks_file": "keys/idp.jwks.json",
                "audiences": ["https://gateway.test.example"],
                "algorithms": ["ES256"],
            },
            {
                "issuer": URI_ISSUER,
                "jwks_uri": JWKS_URI,
                "audiences": ["https://gateway.test.example", "gateway"],
                "algorithms": ["ES256", "RS256"],
                "fetch_timeout": "1500ms",
            },
        ],
        "clients": [{"client_id": "gateway", "client_secret": "s" * 32}],
    }
    path = directory / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def fetch() -> Fetch:
    return Fetch(jwks("uri-key"))


@pytest.fixture
def directory(config_file: Path, fetch: Fetch, monkeypatch: pytest.MonkeyPatch) -> IssuerDirectory:
    # Run from elsewhere: the relative jwks_file must not depend on the working directory.
    monkeypatch.chdir(config_file.parents[2])
    return IssuerDirectory(load_settings(config_file, env={}), clock=FakeClock(), fetch=fetch)


def test_issuers_are_found_by_exact_name(directory: IssuerDirectory) -> None:
    assert directory.find_issuer(FILE_ISSUER) is not None
    assert directory.find_issuer(URI_ISSUER) is not None
    for near_miss in (FILE_ISSUER + "/", FILE_ISSUER.upper(), FILE_ISSUER[:-1], ""):
        assert directory.find_issuer(near_miss) is None


def test_issuer_entries_carry_their_audiences_and_algorithms(directory: IssuerDirectory) -> None:
    issuer = directory.find_issuer(URI_ISSUER)
    assert issuer is not None
    assert issuer.issuer == URI_ISSUER
    assert issuer.audiences == ("https://gateway.test.example", "gateway")
    assert issuer.algorithms == frozenset({"ES256", "RS256"})


def test_jwks_file_is_read_relative_to_the_config_directory(directory: IssuerDirectory) -> None:
    issuer = directory.find_issuer(FILE_ISSUER)
    assert issuer is not None
    key = issuer.find_key("file-key")
    assert key is not None
    assert key.algorithms == frozenset({"ES256"})


def test_absolute_jwks_file_is_used_as_is(tmp_path: Path, config_file: Path) -> None:
    elsewhere = tmp_path / "mounted.jwks.json"
    elsewhere.write_text(json.dumps(jwks("mounted-key")))
    data = yaml.safe_load(config_file.read_text())
    data["trusted_issuers"][0]["jwks_file"] = str(elsewhere)
    config_file.write_text(yaml.safe_dump(data))

    directory = IssuerDirectory(load_settings(config_file, env={}), clock=FakeClock())
    issuer = directory.find_issuer(FILE_ISSUER)
    assert issuer is not None
    assert issuer.find_key("mounted-key") is not None


def test_jwks_uri_is_fetched_with_the_configured_timeout(
    directory: IssuerDirectory, fetch: Fetch
) -> None:
    issuer = directory.find_issuer(URI_ISSUER)
    assert issuer is not None
    assert issuer.find_key("uri-key") is not None
    assert fetch.calls == [(JWKS_URI, 1.5)]


def test_keys_of_one_issuer_are_not_found_through_another(directory: IssuerDirectory) -> None:
    file_issuer = directory.find_issuer(FILE_ISSUER)
    uri_issuer = directory.find_issuer(URI_ISSUER)
    assert file_issuer is not None
    assert uri_issuer is not None

    assert file_issuer.find_key("uri-key") is None
    assert uri_issuer.find_key("file-key") is None
