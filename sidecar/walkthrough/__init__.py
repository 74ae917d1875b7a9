"""``sidecar demo`` (``make demo``): the whole idea of this project in one command, on loopback.

In this process: a demo identity provider (:mod:`sidecar.demo`) signing user tokens, a gateway
using :mod:`sidecar.client`, and two upstreams: *code-search*, which verifies the sidecar's
tokens with :mod:`sidecar.verify`, and *vendor*, which knows only its own static API key. In a
child process: ``sidecar serve``, configured for them in a temporary directory. A short script
of user calls goes through the gateway, and each hop says what it was presented and why it
accepted or refused.

The point (docs/design.md §1): the gateway never forwards the user's token (*token
passthrough*); each upstream gets a credential for itself only. Both upstreams record every
request they receive, so :func:`run_demo`'s report lets a test check exactly that. Nothing
printed is a whole token or key: SHA-256 fingerprints and masked forms only.

Its modules: :mod:`.world` (the names, the sidecar's configuration and process, the serving
threads), :mod:`.apps` (the upstreams, their recorders, the gateway), :mod:`.narration` (what
each hop says) and :mod:`.story` (the script, the report, :func:`run_demo`).
"""

from __future__ import annotations

from .narration import StepOutcome, fingerprint, masked
from .story import SCRIPT, DemoReport, main, run_demo, stop_on_sigterm
from .world import (
    API_KEY_TYPE,
    CODE_SEARCH,
    GATEWAY,
    IDP_ISSUER,
    READY_TIMEOUT,
    ROUTES,
    USERS,
    VENDOR,
    DemoFailed,
    RecordedRequest,
)

__all__ = [
    "API_KEY_TYPE",
    "CODE_SEARCH",
    "GATEWAY",
    "IDP_ISSUER",
    "READY_TIMEOUT",
    "ROUTES",
    "SCRIPT",
    "USERS",
    "VENDOR",
    "DemoFailed",
    "DemoReport",
    "RecordedRequest",
    "StepOutcome",
    "fingerprint",
    "main",
    "masked",
    "run_demo",
    "stop_on_sigterm",
]
