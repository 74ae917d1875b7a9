"""JSON responses, and the headers every token-endpoint answer carries."""

from __future__ import annotations

import json
from typing import Any

from flask import Response

# RFC 6749 §5.1: "Cache-Control: no-store" and "Pragma: no-cache" on every token response.
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        json.dumps(body, separators=(",", ":")),
        status=status,
        mimetype="application/json",
        headers=headers,
    )
