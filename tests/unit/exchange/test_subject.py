"""Verification of subject (and actor) tokens: every check of docs/design.md §2 step 2, against
a real issuer directory whose keys are generated per test."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import RSAAlgorithm, get_default_algorithms

from sidecar.config import Settings, settings_from_mapping
from sidecar.errors import InvalidRequestError
from sidecar.exchange.subject import VerifiedToken, jwk_algorithms, verify_token
from sidecar.issuers import IssuerDirectory
from tests.conftest import TestIdP

LEEWAY = 30


class OtherIdP(TestIdP):
    """A second trusted issuer with keys (and kids) of its own."""

    __test__ = False
    issuer = "https://other-idp.test.example"

    def __init__(self, directory: Path) -> None:
        directory.mkdir()
        super().__init__(directory)
        self.keys = {"other-rsa": (self.rsa_key, "RS256")}
        self.write_jwks()


# The issuers' keys are generated once per module (RSA generation dominates otherwise); no test
# here changes them.
@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> TestIdP:
    return TestIdP(tmp_path_factory.mktemp("idp"))


@pytest.fixture(scope="module")
def other_idp(tmp_path_factory: pytest.TempPathFactory) -> OtherIdP:
    return OtherIdP(tmp_path_factory.mktemp("other-idp") / "keys")


@pytest.fixture
def config(config: dict[str, Any], other_idp: OtherIdP) -> dict[str, Any]:
    config["trusted_issuers"].append(
        {
            "issuer": other_idp.issuer,
            "jwks_file": str(other_idp.jwks_path),
            "audiences": [other_idp.audience],
            "algorithms": ["RS256"],
        }
    )
    return config


@pytest.fixture
def issuers(settings: Settings) -> IssuerDirectory:
    return IssuerDirectory(settings, clock=time.time)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def compact(header: dict[str, Any], payload: Any, key: Any = None) -> str:
    """A JWS with exactly this header (no library defaults added), signed with ``key`` using the
    header's ``alg`` (or with an empty signature when ``key`` is None)."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = b""
    if key is not None:
        algorithm = get_default_algorithms()[header["alg"]]
        signature = algorithm.sign(signing_input.encode(), algorithm.prepare_key(key))
    return f"{signing_input}.{b64(signature)}"


def claims(idp: TestIdP, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    payload = {
        "iss": idp.issuer,
        "sub": "alice@example.com",
        "aud": idp.audience,
        "iat": now,
        "exp": now + 600,
        "scope": "code.read code.search",
    }
    payload.update(overrides)
    return payload


def verify(token: str, issuers: IssuerDirectory, *, leeway: int = LEEWAY) -> VerifiedToken:
    return verify_token(token, issuers, leeway=leeway)


def assert_refused(
    token: str, issuers: IssuerDirectory, *, leeway: int = LEEWAY, because: str = ""
) -> None:
    """The token is refused as invalid_request; ``because`` names the check that refused it."""
    with pytest.raises(InvalidRequestError) as caught:
        verify(token, issuers, leeway=leeway)
    assert caught.value.error == "invalid_request"
    assert caught.value.status_code == 400
    assert because in caught.value.reason
    # Neither the public description nor the internal reason carries the token.
    assert token not in str(caught.value.description)
    assert token not in caught.value.reason


# --- valid tokens -------------------------------------------------------------------------------


def test_valid_rs256_token_is_verified(idp: TestIdP, issuers: IssuerDirectory) -> None:
    token = idp.token(kid="rsa-1", email="alice@example.com")

    verified = verify(token, issuers)

    assert verified.issuer == idp.issuer
    assert verified.subject == "alice@example.com"
    assert verified.claims["email"] == "alice@example.com"
    assert verified.scopes == frozenset({"code.read", "code.search"})
    assert verified.expires_at == verified.claims["exp"]


def test_valid_es256_token_is_verified(idp: TestIdP, issuers: IssuerDirectory) -> None:
    token = idp.token(kid="ec-1")
    assert verify(token, issuers).subject == "alice@example.com"


def test_token_of_a_second_trusted_issuer_is_verified_with_its_own_keys(
    other_idp: OtherIdP, issuers: IssuerDirectory
) -> None:
    verified = verify(other_idp.token(kid="other-rsa"), issuers)
    assert verified.issuer == other_idp.issuer


@pytest.mark.parametrize("typ", ["JWT", "jwt", "at+jwt", "application/at+jwt"])
def test_access_token_typ_headers_are_accepted(
    typ: str, idp: TestIdP, issuers: IssuerDirectory
) -> None:
    token = compact({"alg": "RS256", "kid": "rsa-1", "typ": typ}, claims(idp), idp.rsa_key)
    assert verify(token, issuers).subject == "alice@example.com"


def test_typ_header_may_be_absent(idp: TestIdP, issuers: IssuerDirectory) -> None:
    token = compact({"alg": "RS256", "kid": "rsa-1"}, claims(idp), idp.rsa_key)
    assert verify(token, issuers).subject == "alice@example.com"


@pytest.mark.parametrize("typ", ["dpop+jwt", "secevent+jwt", "JWE", 1])
def test_other_typ_headers_are_refused(typ: Any, idp: TestIdP, issuers: IssuerDirectory) -> None:
    token = compact({"alg": "RS256", "kid": "rsa-1", "typ": typ}, claims(idp), idp.rsa_key)
    assert_refused(token, issuers)


# --- algorithms ---------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
def test_unsigned_tokens_are_refused_whatever_the_spelling_of_none(
    alg: str, idp: TestIdP, issuers: IssuerDirectory
) -> None:
    assert_refused(
        compact({"alg": alg, "kid": "rsa-1"}, claims(idp)), issuers, because="alg is not allowed"
    )


def test_unsigned_token_without_kid_is_refused(idp: TestIdP, issuers: IssuerDirectory) -> None:
    assert_refused(compact({"alg": "none"}, claims(idp)), issuers)


@pytest.mark.parametrize("kid", ["rsa-1", "ec-1"])
def test_hs256_signed_with_the_issuers_public_key_is_refused(
    kid: str, idp: TestIdP, issuers: IssuerDirectory
) -> None:
    # The classic algorithm-confusion attack: the public key PEM used as an HMAC secret.
    key = idp.keys[kid][0]
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    unsigned = compact({"alg": "HS256", "kid": kid, "typ": "JWT"}, claims(idp))
    signing_input = unsigned.rsplit(".", 1)[0]
    mac = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    assert_refused(f"{signing_input}.{b64(mac)}", issuers, because="alg is not allowed")


def test_alg_outside_the_issuers_allowlist_is_refused(
    idp: TestIdP, issuers: IssuerDirectory
) -> None:
    # A valid RS512 signature by the issuer's own RSA key: the key is right, the alg is not allowed.
    token = idp.token(kid="rsa-1", alg="RS512")
    assert_refused(token, issuers, because="alg is not allowed")


def test_alg_allowed_for_the_issuer_but_not_fitting_the_key_is_refused(
    idp: TestIdP, issuers: IssuerDirectory
) -> None:
    # ES256 is in the issuer's allowlist, but kid ec-1's signature is presented under rsa-1.
    token = idp.token(kid="rsa-1", alg="ES256", key=idp.ec_key)
    assert_refused(token, issuers, because="alg does not fit the key")


def test_alg_allowed_for_another_issuer_only_is_refused(
    other_idp: OtherIdP, issuers: IssuerDirectory
) -> None:
    # The other issuer allows only RS256; an ES256 token claiming it is refused.
    ec_key = ec.generate_private_key(ec.SECP256R1())
    token = compact({"alg": "ES256", "kid": "other-rsa"}, claims(other_idp), ec_key)
    assert_refused(token, issuers)


def test_eddsa_token_is_refused_when_not_allowlisted(
    idp: TestIdP, issuers: IssuerDirectory
) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    assert_refused(compact({"alg": "EdDSA", "kid": "rsa-1"}, claims(idp), key), issuers)


def test_alg_header_missing_is_refused(idp: TestIdP, issuers: IssuerDirectory) -> None:
    token = compact({"alg": "RS256", "kid": "rsa-1"}, claims(idp), idp.rsa_key)
    header_less = compact({"kid": "rsa-1"}, claims(idp))
    # Keep a real signature segment: only the missing alg should cause the refusal.
    assert_refused(header_less.rsplit(".", 1)[0] + "." + token.rsplit(".", 1)[1], issuers)


# --- keys ---------------------------------------------------------------------------------------


def test_unknown_kid_is_refused(idp: TestIdP, issuers: IssuerDirectory) -> None:
    token = idp.token(kid="not-published", key=idp.rsa_key, alg="RS256")
    assert_refused(token, issuers, because="kid is unknown")


@pytest.mark.parametrize("kid", [None, "", 7, ["rsa-1"], "k" * 257])
def test_missing_or_malformed_kid_is_refused(
    kid: Any, idp: TestIdP, issuers: IssuerDirectory
) -> None:
    header: dict[str, Any] = {"alg": "RS256"}
    if kid is not None:
        header["kid"] = kid
    assert_refused(compact(header, claims(idp), idp.rsa_key), issuers)


def test_kid_of_another_trusted_issuer_is_refused(
    idp: TestIdP, other_idp: OtherIdP, issuers: IssuerDirectory
) -> None:
    # Signed with the other issuer's key under its kid, but claiming the first issuer: keys are
    # looked up by (issuer, kid) only.
    token = idp.token(kid="other-rsa", key=other_idp.rsa_key, alg="RS256")
    assert_refused(token, issuers, because="kid is unknown")


def test_same_kid_name_at_another_issuer_does_not_verify(
    idp: TestIdP, other_idp: OtherIdP, issuers: IssuerDirectory
) -> None:
    # kid rsa-1 exists at the first issuer; a token signed with the other issuer's key fails.
    token = idp.token(kid="rsa-1", key=other_idp.rsa_key, alg="RS256")
    assert_refused(token, issuers)


def test_token_signed_by_an_untrusted_key_is_refused(
    idp: TestIdP, issuers: IssuerDirectory
) -> None:
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert_refused(idp.token(kid="rsa-1", key=stranger, alg="RS256"), issuers)


def test_tampered_payload_is_refused(idp: TestIdP, issuers: IssuerDirectory) -> None:
    header, _, signature = idp.token().split(".")
    forged = b64(json.dumps(claims(idp, sub="mallory@example.com")).encode())
    assert_refused(f"{header}.{forged}.{signature}", issuers)


@pytest.mark.parametrize("name", ["jku", "x5u", "jwk", "x5c", "crit", "b64"])
def test_key_pointing_and_processing_headers_are_refused(
    name: str, idp: TestIdP, issuers: IssuerDirectory
) -> None:
    values: dict[str, Any] = {
        "jku": "https://attacker.example/jwks.json",
        "x5u": "https://attacker.example/cert.pem",
        "jwk": RSAAlgorithm.to_jwk(idp.rsa_key.public_key(), as_dict=True),
        "x5c": ["MIIB"],
        "crit": ["exp"],  # an extension we do not understand
        "b64": True,
    }
    header = {"alg": "RS256", "kid": "rsa-1", name: values[name]}
    # Even with a signature that verifies under the trusted key, the header is refused.
    # (PyJWT itself refuses a crit naming a parameter it does not know, before our check.)
    because = "" if name == "crit" else f"header parameter {name}"
    assert_refused(compact(header, claims(idp), idp.rsa_key), issuers, because=because)


# --- structure ----------------------------------------------------------------------------------


def test_jwe_with_five_segments_is_refused(idp: TestIdP, issuers: IssuerDirectory) -> None:
    header = b64(json.dumps({"alg": "RSA-OAEP", "enc": "A256GCM", "kid": "rsa-1"}).encode())
    assert_refused(f"{header}.{b64(b'k')}.{b64(b'iv')}.{b64(b'ct')}.{b64(b'tag')}", issuers)


@pytest.mark.parametrize("segments", [1, 2, 4, 6])
def test_wrong_segment_counts_are_refused(
    segments: int, idp: TestIdP, issuers: IssuerDirectory
) -> None:
    parts = idp.token().split(".")
    assert_refused(".".join((parts * 2)[:segments]), issuers)


@pytest.mark.parametrize("token", ["", "..", "a.b.c", "!!!.###.$$$", "e30.e30."])
def test_malformed_compact_serializations_are_refused(token: str, issuers: IssuerDirectory) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        verify(token, issuers)
    assert caught.value.error == "invalid_request"


def test_header_that_is_not_json_is_refused(idp: TestIdP, issuers: IssuerDirectory) -> None:
    _, payload, signature = idp.token().split(".")
    assert_refused(f"{b64(b'{not json')}.{payload}.{signature}", issuers)


def test_payload_that_is_not_json_is_refused(idp: TestIdP, issuers: IssuerDirectory) -> None:
    header = b64(json.dumps({"alg": "RS256", "kid": "rsa-1"}).encode())
    signing_input = f"{header}.{b64(b'not json')}"
    algorithm = get_default_algorithms()["RS256"]
    signature = algorithm.sign(signing_input.encode(), idp.rsa_key)
    assert_refused(f"{signing_input}.{b64(signature)}", issuers)


@pytest.mark.parametrize("payload", [["a", "b"], "text", 42, None])
def test_payload_that_is_not_a_json_object_is_refused(
    payload: Any, idp: TestIdP, issuers: IssuerDirectory
) -> None:
    assert_refused(compact({"alg": "RS256", "kid": "rsa-1"}, payload, idp.rsa_key), issuers)


def test_header_that_is_not_a_json_object_is_refused(
    idp: TestIdP, issuers: IssuerDirectory
) -> None:
    _, payload, signature = idp.token().split(".")
    assert_refused(f"{b64(b'[1, 2]')}.{payload}.{signature}", issuers)


def test_signature_that_is_not_base64url_is_refused(idp: TestIdP, issuers: IssuerDirectory) -> None:
    header, payload, _ = idp.token().split(".")
    assert_refused(f"{header}.{payload}.***", issuers)


# --- time ---------------------------------------------------------------------------------------


def test_token_without_exp_is_refused(idp: TestIdP, issuers: IssuerDirectory) -> None:
    assert_refused(idp.token(omit=("exp",)), issuers)


def test_expired_token_is_refused(idp: TestIdP, issuers: IssuerDirectory) -> None:
    now = int(time.time())
    assert_refused(idp.token(iat=now - 3600, exp=now - 600), issuers)


def test_exp_slightly_in_the_past_within_leeway_is_accepted(
    idp: TestIdP, issuers: IssuerDirectory
) -> None:
    now = int(time.time())
    token = idp.token(iat=now - 600, exp=now - 10)
    assert verify(token, issuers, leeway=30).expires_at == now - 10


def test_exp_in_the_past_beyond_leeway_is_refused(idp: TestIdP, issuers: IssuerDirectory) -> None:
    now = int(time.time())
    token = idp.token(iat=now - 600, exp=now - 10)
    assert_refused(token, issuers, leeway=0)
    assert_refused(idp.token(iat=now - 600, exp=now - 60), issuers, leeway=30)


@pytest.mark.parametrize("exp", ["9999999999", "soon", None, [9999999999], {"at": 1}])
def test_exp_that_is_not_a_number_is_refused(
    exp: Any, idp: TestIdP, issuers: IssuerDirectory
) -> None:
    assert_refused(idp.token(exp=exp), issuers)


@pytest.mark.parametrize("exp", [float("inf"), float("nan"), float("-inf")])
def test_non_finite_exp_is_refused(exp: float, idp: TestIdP, issuers: IssuerDirectory) -> None:
    # json.dumps writes Infinity / NaN, which Python's JSON parser reads back.
    assert_refused(
        compact({"alg": "RS256", "kid": "rsa-1"}, claims(idp, exp=exp), idp.rsa_key), issuers
    )


def test_overflowing_exp_is_refused(idp: TestIdP, issuers: IssuerDirectory) -> None:
    header = b64(json.dumps({"alg": "RS256", "kid": "rsa-1"}).encode())
    body = json.dumps(claims(idp, exp=0)).replace('"exp": 0', '"exp": 1e999')
    signing_input = f"{header}.{b64(body.encode())}"
    signature = get_default_algorithms()["RS256"].sign(signing_input.encode(), idp.rsa_key)
    assert_refused(f"{signing_input}.{b64(signature)}", issuers)


def test_very_large_exp_does_not_break_verification(idp: TestIdP, issuers: IssuerDirectory) -> None:
    # Far-future but finite: valid as far as the token goes; the policy's lifetime rule caps the
    # minted token. What matters is a clean integer, not an overflow downstream.
    verified = verify(idp.token(exp=10**20), issuers)
    assert verified.expires_at == 10**20
    assert isinstance(verified.expires_at, int)


def test_nbf_in_the_future_is_refused(idp: TestIdP, issuers: IssuerDirectory) -> None:
    assert_refused(idp.token(nbf=int(time.time()) + 600), issuers)


def test_nbf_slightly_in_the_future_within_leeway_is_accepted(
    idp: TestIdP, issuers: IssuerDirectory
) -> None:
    assert verify(idp.token(nbf=int(time.time()) + 10), issuers, leeway=30)


def test_iat_in_the_future_is_refused(idp: TestIdP, issuers: IssuerDirectory) -> None:
    assert_refused(idp.token(iat=int(time.time()) + 600), issuers)


def test_iat_slightly_in_the_future_within_leeway_is_accepted(
    idp: TestIdP, issuers: IssuerDirectory
) -> None:
    assert verify(idp.token(iat=int(time.time()) + 10), issuers, leeway=30)


@pytest.mark.parametrize("claim", ["nbf", "iat"])
def test_non_numeric_nbf_or_iat_is_refused(
    claim: str, idp: TestIdP, issuers: IssuerDirectory
) -> None:
    assert_refused(idp.token(**{claim: "yesterday"}), issuers)


# --- issuer -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "issuer",
    [
        "https://idp.test.example/",  # trailing slash
        "https://IDP.test.example",  # case
        "https://idp.test.example.evil",  # suffix
        "https://idp.test.exampl",  # prefix
        "https://idp.test.example/tenant",
        "http://idp.test.example",
        " https://idp.test.example",
        "https://idp.test.example\u0000",
    ],
)
def test_near_miss_issuers_are_refused(issuer: str, idp: TestIdP, issuers: IssuerDirectory) -> None:
    # Signed with the real issuer's real key: only the iss comparison can refuse it.
    assert_refused(idp.token(iss=issuer), issuers, because="issuer is not trusted")


@pytest.mark.parametrize("iss", [None, 42, ["https://idp.test.example"]])
def test_missing_or_non_string_iss_is_refused(
    iss: Any, idp: TestIdP, issuers: IssuerDirectory
) -> None:
    payload = claims(idp, iss=iss)
    if iss is None:
        del payload["iss"]
    assert_refused(compact({"alg": "RS256", "kid": "rsa-1"}, payload, idp.rsa_key), issuers)


# --- audience -----------------------------------------------------------------------------------


def test_foreign_audience_is_refused(idp: TestIdP, issuers: IssuerDirectory) -> None:
    assert_refused(idp.token(aud="https://someone-else.example"), issuers)


def test_missing_audience_is_refused(idp: TestIdP, issuers: IssuerDirectory) -> None:
    assert_refused(idp.token(omit=("aud",)), issuers)


def test_audience_list_containing_the_gateway_is_accepted(
    idp: TestIdP, issuers: IssuerDirectory
) -> None:
    token = idp.token(aud=["https://other.example", idp.audience])
    assert verify(token, issuers).subject == "alice@example.com"


@pytest.mark.parametrize("aud", [[], ["https://other.example"], "https://gateway.test.example/", 7])
def test_audience_list_without_the_gateway_is_refused(
    aud: Any, idp: TestIdP, issuers: IssuerDirectory
) -> None:
    assert_refused(idp.token(aud=aud), issuers)


def test_audience_of_another_issuer_entry_is_refused(idp: TestIdP, config: dict[str, Any]) -> None:
    # Each issuer entry accepts only its own audiences.
    config["trusted_issuers"][1]["audiences"] = ["https://other-gateway.example"]
    issuers = IssuerDirectory(settings_from_mapping(config, env={}), clock=time.time)
    assert verify(idp.token(), issuers)
    assert_refused(idp.token(aud="https://other-gateway.example"), issuers)


# --- subject and token kind ---------------------------------------------------------------------


@pytest.mark.parametrize("claim", ["nonce", "at_hash", "c_hash", "s_hash"])
def test_id_tokens_are_refused(claim: str, idp: TestIdP, issuers: IssuerDirectory) -> None:
    assert_refused(idp.token(**{claim: "value"}), issuers, because="ID token")


def test_missing_sub_is_refused(idp: TestIdP, issuers: IssuerDirectory) -> None:
    assert_refused(idp.token(omit=("sub",)), issuers)


@pytest.mark.parametrize("sub", ["", 123, None, ["alice"], {"id": "alice"}, True])
def test_empty_or_non_string_sub_is_refused(
    sub: Any, idp: TestIdP, issuers: IssuerDirectory
) -> None:
    assert_refused(idp.token(sub=sub), issuers)


# --- scopes and fingerprint ---------------------------------------------------------------------


def test_scope_claim_as_a_space_separated_string(idp: TestIdP, issuers: IssuerDirectory) -> None:
    verified = verify(idp.token(scope="a b  c"), issuers)
    assert verified.scopes == frozenset({"a", "b", "c"})


def test_scp_claim_as_a_list(idp: TestIdP, issuers: IssuerDirectory) -> None:
    verified = verify(idp.token(omit=("scope",), scp=["code.read", "tickets.read"]), issuers)
    assert verified.scopes == frozenset({"code.read", "tickets.read"})


def test_scp_claim_as_a_string(idp: TestIdP, issuers: IssuerDirectory) -> None:
    verified = verify(idp.token(omit=("scope",), scp="code.read tickets.read"), issuers)
    assert verified.scopes == frozenset({"code.read", "tickets.read"})


def test_scope_claim_wins_over_scp(idp: TestIdP, issuers: IssuerDirectory) -> None:
    verified = verify(idp.token(scope="a", scp=["b"]), issuers)
    assert verified.scopes == frozenset({"a"})


@pytest.mark.parametrize("scp", [["a", 1], [["a"]], 5])
def test_malformed_scp_grants_no_scope(scp: Any, idp: TestIdP, issuers: IssuerDirectory) -> None:
    verified = verify(idp.token(omit=("scope",), scp=scp), issuers)
    assert verified.scopes == frozenset()


def test_no_scope_claim_means_no_scopes(idp: TestIdP, issuers: IssuerDirectory) -> None:
    assert verify(idp.token(omit=("scope",)), issuers).scopes == frozenset()


def test_fingerprint_is_a_16_hex_char_sha256_prefix_that_differs_per_token(
    idp: TestIdP, issuers: IssuerDirectory
) -> None:
    first, second = idp.token(), idp.token()

    fingerprint = verify(first, issuers).fingerprint

    assert re.fullmatch(r"[0-9a-f]{16}", fingerprint)
    assert fingerprint == hashlib.sha256(first.encode()).hexdigest()[:16]
    assert verify(second, issuers).fingerprint != fingerprint


def test_verified_token_repr_does_not_show_claims(idp: TestIdP, issuers: IssuerDirectory) -> None:
    verified = verify(idp.token(email="secret-mail@example.com"), issuers)
    assert "secret-mail@example.com" not in repr(verified)


def test_actor_role_is_named_in_the_reason(idp: TestIdP, issuers: IssuerDirectory) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        verify_token(idp.token(aud="https://elsewhere.example"), issuers, leeway=0, role="actor")
    assert caught.value.reason.startswith("actor token")


# --- jwk_algorithms -----------------------------------------------------------------------------

EVERYTHING = frozenset({"RS256", "RS384", "PS256", "ES256", "ES384", "ES512", "EdDSA"})


@pytest.mark.parametrize(
    ("jwk", "expected"),
    [
        ({"kty": "RSA", "alg": "RS256"}, {"RS256"}),
        ({"kty": "RSA", "alg": "HS256"}, set()),
        ({"kty": "RSA"}, {"RS256", "RS384", "PS256"}),
        ({"kty": "EC", "crv": "P-256"}, {"ES256"}),
        ({"kty": "EC", "crv": "P-384"}, {"ES384"}),
        ({"kty": "EC", "crv": "P-521"}, {"ES512"}),
        ({"kty": "EC", "crv": "secp256k1"}, set()),
        ({"kty": "EC"}, set()),
        ({"kty": "OKP", "crv": "Ed25519"}, {"EdDSA"}),
        ({"kty": "OKP", "crv": "X25519"}, set()),
        ({"kty": "oct"}, set()),
        ({}, set()),
    ],
)
def test_jwk_algorithms_are_the_stated_alg_or_the_key_family_within_the_allowlist(
    jwk: dict[str, Any], expected: set[str]
) -> None:
    assert jwk_algorithms(jwk, EVERYTHING) == frozenset(expected)


def test_jwk_algorithms_never_exceed_the_allowlist() -> None:
    allowed = frozenset({"ES256"})
    assert jwk_algorithms({"kty": "RSA"}, allowed) == frozenset()
    assert jwk_algorithms({"kty": "RSA", "alg": "RS256"}, allowed) == frozenset()
    assert jwk_algorithms({"kty": "EC", "crv": "P-256"}, allowed) == frozenset({"ES256"})
