"""PyJWT's decoder with the alphabet check in C (sidecar/exchange/jws.py): the replaced method
refuses and returns exactly what PyJWT's own does, and the decoder in use is the fast one."""

from __future__ import annotations

import base64

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st
from jwt.api_jws import PyJWS
from jwt.exceptions import DecodeError

from sidecar.exchange import jws

ALPHABET = jws.BASE64URL_ALPHABET.decode()


def reference(segment: bytes) -> bytes | str:
    try:
        return PyJWS._decode_base64url_segment(segment, "payload")
    except DecodeError as exc:
        return f"DecodeError: {exc}"


def ours(segment: bytes) -> bytes | str:
    try:
        return jws.decode_base64url_segment(segment, "payload")
    except DecodeError as exc:
        return f"DecodeError: {exc}"


HOSTILE = [
    b"",
    b"e30",
    b"e30=",
    b"e30==",
    b"e30===",
    b"e3=0",
    b"!!!!",
    b"e30!",
    b"e3 0",
    b"e30\n",
    b"e30\x00",
    b"e+/0",  # the standard (not url-safe) alphabet
    b"a",
    b"ab",
    b"abc",
    b"abcd",
    b"abcde",
    b"e31",  # a stray bit in the last character: not canonical
    "é30".encode(),
    base64.urlsafe_b64encode(b'{"sub":"alice"}').rstrip(b"="),
    base64.urlsafe_b64encode(b'{"sub":"alice"}'),
]


@pytest.mark.parametrize("segment", HOSTILE)
def test_the_replacement_refuses_and_returns_what_pyjwt_does(segment: bytes) -> None:
    assert ours(segment) == reference(segment)


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=ALPHABET + "=!+/. \x00é", max_size=24))
def test_the_replacement_agrees_with_pyjwt_on_any_segment(text: str) -> None:
    segment = text.encode()
    assert ours(segment) == reference(segment)


def test_the_decoder_in_use_is_pyjwts_with_the_replacement() -> None:
    assert isinstance(jws.DECODER, jwt.PyJWT)
    assert jws.DECODER._jws._decode_base64url_segment is jws.decode_base64url_segment


def test_a_token_with_junk_in_its_signature_is_refused_by_the_decoder() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    token = jwt.encode({"sub": "alice"}, key, algorithm="ES256")
    assert jws.decode(token, key.public_key(), algorithms=["ES256"]) == {"sub": "alice"}

    with pytest.raises(DecodeError):
        jws.decode(token + "!", key.public_key(), algorithms=["ES256"])
