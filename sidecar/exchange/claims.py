"""The claims of a minted token: an RFC 9068 JWT access token
(https://www.rfc-editor.org/rfc/rfc9068#section-2.2) with the RFC 8693 §4.1 ``act`` claim
(https://www.rfc-editor.org/rfc/rfc8693#section-4.1).

RFC 9068 §2.2: ``iss``, ``exp``, ``aud``, ``sub``, ``client_id``, ``iat`` and ``jti`` are REQUIRED;
``scope`` is present whenever scopes were granted. RFC 8693 §4.1: "the act claim ... identif[ies]
the acting party to whom authority has been delegated"; "a chain of delegation can be expressed by
nesting one act claim within another", with the outermost the current actor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sidecar.errors import InvalidRequestError
from sidecar.exchange.policy import Decision
from sidecar.exchange.subject import VerifiedToken

# Claims the sidecar sets itself, or that would carry authority from the subject token into the
# minted one; no policy may copy them.
RESERVED_CLAIMS = frozenset(
    {
        "iss", "sub", "aud", "exp", "iat", "nbf", "jti", "scope", "scp", "client_id",
        "act", "may_act", "cnf", "typ", "azp",
    }
)  # fmt: skip
# The depth at which a nested `act` chain is refused rather than copied.
MAX_ACT_DEPTH = 5
_ACT_MEMBERS = ("sub", "iss", "client_id")


def _copy_act_chain(act: Any, depth: int) -> dict[str, Any]:
    """Copy a prior ``act`` chain, keeping only identity members, refusing deep or odd chains."""
    if depth > MAX_ACT_DEPTH:
        raise InvalidRequestError("The token is invalid.", reason="act chain too deep")
    if not isinstance(act, Mapping) or not isinstance(act.get("sub"), str):
        raise InvalidRequestError("The token is invalid.", reason="act claim is malformed")
    copied: dict[str, Any] = {
        name: act[name] for name in _ACT_MEMBERS if isinstance(act.get(name), str)
    }
    if "act" in act:
        copied["act"] = _copy_act_chain(act["act"], depth + 1)
    return copied


def check_may_act(subject: VerifiedToken, actor: VerifiedToken) -> None:
    """RFC 8693 §4.4: when the subject token carries ``may_act``, the actor must be the party it
    names (its ``sub``, and its ``iss`` when stated)."""
    may_act = subject.claims.get("may_act")
    if may_act is None:
        return
    if not isinstance(may_act, Mapping):
        raise InvalidRequestError("The token is invalid.", reason="may_act claim is malformed")
    if may_act.get("sub") != actor.subject:
        raise InvalidRequestError("The token is invalid.", reason="actor not allowed by may_act")
    if "iss" in may_act and may_act["iss"] != actor.issuer:
        raise InvalidRequestError("The token is invalid.", reason="actor not allowed by may_act")


def build_act(
    client_id: str, subject: VerifiedToken, actor: VerifiedToken | None
) -> dict[str, Any]:
    """The ``act`` claim: the actor token's subject, or else the client, with any prior chain of
    the subject token nested inside."""
    if actor is not None:
        act: dict[str, Any] = {"sub": actor.subject, "iss": actor.issuer}
    else:
        act = {"sub": client_id}
    if "act" in subject.claims:
        act["act"] = _copy_act_chain(subject.claims["act"], depth=2)
    return act


def build_claims(
    *,
    issuer: str,
    client_id: str,
    subject: VerifiedToken,
    actor: VerifiedToken | None,
    decision: Decision,
    now: int,
    jti: str,
) -> dict[str, Any]:
    claims: dict[str, Any] = {
        name: subject.claims[name] for name in decision.copy_claims if name in subject.claims
    }
    audiences = decision.audiences
    claims.update(
        iss=issuer,
        sub=subject.subject,
        aud=audiences[0] if len(audiences) == 1 else list(audiences),
        client_id=client_id,
        scope=" ".join(decision.scopes),
        iat=now,
        exp=now + decision.lifetime,
        jti=jti,
        act=build_act(client_id, subject, actor),
    )
    return claims
