"""PyJWT's JWT decoder, with the base64url alphabet check of its segments made in C.

PyJWT (2.13 and later) refuses a compact JWS whose segments hold anything but the base64url
alphabet (GHSA-hxm8-2xgr-2p9m) with a Python generator over every byte of every segment: about
30 µs of the ~80 µs that verifying an RS256 subject token takes here (``make bench``). The
decoder below is PyJWT's own, with one method replaced by the same checks, in the same order,
raising the same errors, where the alphabet test is one ``bytes.translate`` call. Everything else
(the header, the algorithm allowlist, the signature, every claim) is PyJWT's code, as called in
:mod:`sidecar.exchange.subject`. ``tests/unit/exchange/test_jws.py`` checks the replacement against
PyJWT's method on a corpus of valid and hostile segments.

If a PyJWT release no longer has the method (or the decoder attribute) this relies on, the stock
decoder is used: slower, never laxer.
"""

from __future__ import annotations

import binascii
from typing import Any

import jwt
from jwt.api_jws import PyJWS
from jwt.exceptions import DecodeError
from jwt.utils import base64url_decode, base64url_encode

BASE64URL_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def decode_base64url_segment(segment: bytes, name: str) -> bytes:
    """PyJWS._decode_base64url_segment of PyJWT 2.15, with the alphabet test in C."""
    # Trailing '=' (some issuers send it) is accepted, at most two, and only on a whole quantum.
    padding = 0
    stripped = segment
    while stripped.endswith(b"="):
        stripped = stripped[:-1]
        padding += 1
        if padding > 2:
            raise DecodeError(f"Invalid {name} padding")
    if padding and len(segment) % 4 != 0:
        raise DecodeError(f"Invalid {name} padding")
    # translate(None, alphabet) deletes every alphabet byte: anything left is junk.
    if len(stripped) % 4 == 1 or stripped.translate(None, BASE64URL_ALPHABET):
        raise DecodeError(f"Invalid {name} padding")
    try:
        decoded = base64url_decode(stripped)
    except (TypeError, binascii.Error) as err:
        raise DecodeError(f"Invalid {name} padding") from err
    # Canonical encodings only: no stray bits in the last character.
    if base64url_encode(decoded) != stripped:
        raise DecodeError(f"Invalid {name} padding")
    return decoded


class _JWS(PyJWS):
    _decode_base64url_segment = staticmethod(decode_base64url_segment)


def _decoder() -> Any:
    decoder = jwt.PyJWT()
    if not (
        callable(getattr(PyJWS, "_decode_base64url_segment", None))
        and isinstance(getattr(decoder, "_jws", None), PyJWS)
        and hasattr(decoder, "_get_sig_options")
    ):
        return decoder  # a PyJWT this was not written against: its own checks, unchanged
    decoder._jws = _JWS(options=decoder._get_sig_options())
    return decoder


DECODER = _decoder()
decode = DECODER.decode
