"""Emulation of Envoy's ext_authz HTTP filter with an ``http_service``, for tests.

Grounded in Envoy v1.38.0 (release commit f1dd21b16c); paths are relative to the Envoy repo:
  HTTP  = source/extensions/filters/common/ext_authz/ext_authz_http_impl.cc
  CRU   = source/extensions/filters/common/ext_authz/check_request_utils.cc
  FLT   = source/extensions/filters/http/ext_authz/ext_authz.cc
Not modelled: with_request_body (the body is never sent), retries, gRPC, header mutation
rules, validate_mutations, and what the HTTP connection manager and router add by themselves
(x-request-id, x-forwarded-proto, date, server, ...). Multiple values of a header are joined
with ", " in the returned dicts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

import requests
import yaml
from urllib3.util import SKIP_HEADER

_HEADERS_TO_REMOVE = "x-envoy-auth-headers-to-remove"
# CRU 299-317: for an HTTP service these are always forwarded, whatever allowed_headers says.
ALWAYS_FORWARDED = ("authorization", ":method", ":path", ":authority")
# HTTP 261-263: added to allowed_client_headers whenever that list is non-empty.
CLIENT_DEFAULTS = (":status", "content-length", "www-authenticate", "location")


@dataclass
class Checked:
    allowed: bool
    # Allowed: the request Envoy sends upstream (lower-case keys, "host" for :authority).
    upstream_headers: dict[str, str] = field(default_factory=dict)
    # Denied (or error): what the downstream client receives. None when allowed.
    status: int | None = None
    body: bytes = b""
    # Denied: the reply's headers; allowed: headers added via allowed_client_headers_on_success.
    client_headers: dict[str, str] = field(default_factory=dict)
    error: bool = False  # True when Envoy took its error path (5xx, timeout, connect failure)
    check_status: int | None = None  # status our service answered (None if no answer)
    check_path: str = ""  # path of the check request
    check_headers: dict[str, str] = field(default_factory=dict)  # headers of the check request


def _upper_snake(code: str) -> str:
    """Envoy's StatusCode enum name (``ServiceUnavailable``) as http.HTTPStatus's."""
    return "".join(f"_{c}" if c.isupper() and i else c for i, c in enumerate(code)).upper()


def _add(headers: dict[str, str], key: str, value: str) -> None:
    headers[key] = f"{headers[key]}, {value}" if key in headers else value


@dataclass
class EnvoyExtAuthz:
    service_url: str  # e.g. http://127.0.0.1:PORT (our ext_authz listener)
    path_prefix: str = ""  # http_service.path_prefix
    # ExtAuthz.allowed_headers (or the deprecated authorization_request.allowed_headers), exact.
    allowed_headers: tuple[str, ...] = ("authorization",)
    allowed_upstream_headers: tuple[str, ...] = ("authorization", "x-api-key")
    allowed_client_headers: tuple[str, ...] = ("www-authenticate",)
    timeout: float = 2.0  # http_service.server_uri.timeout
    allowed_upstream_headers_to_append: tuple[str, ...] = ()
    allowed_client_headers_on_success: tuple[str, ...] = ()
    headers_to_add: tuple[tuple[str, str], ...] = ()  # authorization_request.headers_to_add
    failure_mode_allow: bool = False
    status_on_error: int = 403

    @classmethod
    def from_envoy_config(
        cls, path: Path, service_url: str, *, secret: str | None = None
    ) -> EnvoyExtAuthz:
        """The filter as an Envoy configuration file (static_resources) sets it up: its first
        ``envoy.filters.http.ext_authz`` filter, with exact-match header patterns. ``secret``
        replaces the value of every ``headers_to_add`` entry (the file holds a placeholder)."""
        document = yaml.safe_load(path.read_text())
        [ext_authz] = [
            f["typed_config"]
            for listener in document["static_resources"]["listeners"]
            for chain in listener["filter_chains"]
            for network in chain["filters"]
            for f in network["typed_config"].get("http_filters", [])
            if f["name"] == "envoy.filters.http.ext_authz"
        ]
        service = ext_authz["http_service"]
        request = service.get("authorization_request", {})
        response = service.get("authorization_response", {})

        def exact(patterns: dict[str, Any] | None) -> tuple[str, ...]:
            return tuple(p["exact"] for p in (patterns or {}).get("patterns", []))

        status = ext_authz.get("status_on_error", {}).get("code", "Forbidden")
        return cls(
            service_url,
            path_prefix=service.get("path_prefix", ""),
            allowed_headers=exact(ext_authz.get("allowed_headers")),
            allowed_upstream_headers=exact(response.get("allowed_upstream_headers")),
            allowed_client_headers=exact(response.get("allowed_client_headers")),
            timeout=float(str(service["server_uri"]["timeout"]).removesuffix("s")),
            headers_to_add=tuple(
                (h["key"], h["value"] if secret is None else secret)
                for h in request.get("headers_to_add", [])
            ),
            failure_mode_allow=bool(ext_authz.get("failure_mode_allow", False)),
            status_on_error=int(HTTPStatus[_upper_snake(status)]),
        )

    def check(self, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> Checked:
        """Run one downstream request through the filter. ``headers`` must include Host.

        ``body`` is accepted for symmetry but, as with_request_body is unset, Envoy never sends
        it to the service (it goes upstream untouched, so it is not part of the result).
        """
        original = {k.lower(): v for k, v in headers.items()}
        if "host" not in original:
            raise ValueError("an HTTP/1.1 request needs a Host header")
        pseudo = {":method": method.upper(), ":path": path, ":authority": original["host"]}
        allowed = {h.lower() for h in (*self.allowed_headers, *ALWAYS_FORWARDED)}
        # HTTP 307-312, 318-321: Content-Length is always Envoy's own, 0 without a body.
        sent: dict[str, str] = {"content-length": "0"}
        # CRU 149-179: pseudo-headers first, then allow-listed ones; skip x-envoy-auth-partial-body
        # and the client's content-length (HTTP 340-342); duplicates are merged with ",".
        for key, value in [*pseudo.items(), *original.items()]:
            if key in ("host", "content-length", "x-envoy-auth-partial-body"):
                continue
            if key in allowed:
                sent[key] = value
        # HTTP 344-351: path_prefix is prepended to the original path, query string included.
        sent[":path"] = self.path_prefix + sent[":path"]
        # HTTP 358 / proto AuthorizationRequest.headers_to_add: OVERWRITE_IF_EXISTS_OR_ADD.
        for key, value in self.headers_to_add:
            sent[key.lower()] = value
        # async_client_impl.cc 246-253: x-envoy-internal, no x-forwarded-for (HTTP 384);
        # router.cc 299-301: the timeout is announced (suppress_envoy_headers is false).
        sent["x-envoy-internal"] = "true"
        if self.timeout > 0:
            sent["x-envoy-expected-rq-timeout-ms"] = str(int(self.timeout * 1000))
        method_, path_ = sent.pop(":method"), sent.pop(":path")
        wire = {"host": sent.pop(":authority"), **sent}
        result = Checked(allowed=False, check_path=path_, check_headers=dict(wire))
        session = requests.Session()
        session.headers.clear()  # no requests/urllib3 defaults Envoy would not send
        wire.setdefault("user-agent", SKIP_HEADER)
        wire.setdefault("accept-encoding", SKIP_HEADER)
        try:
            resp = session.request(
                method_,
                self.service_url.rstrip("/") + path_,
                headers=wire,
                allow_redirects=False,
                timeout=self.timeout or None,
            )
        except requests.RequestException:
            return self._error(result, original)  # HTTP 402-409: reset/timeout -> Error
        finally:
            session.close()
        result.check_status = resp.status_code
        answer: list[tuple[str, str]] = [(k.lower(), v) for k, v in resp.raw.headers.items()]
        if 500 <= resp.status_code <= 599:  # HTTP 429-431
            return self._error(result, original)
        if resp.status_code == 200:  # HTTP 459: only exactly 200 is OK
            return self._ok(result, original, answer)
        return self._denied(result, resp.status_code, resp.content, answer)

    def _ok(self, res: Checked, original: dict[str, str], answer: list[tuple[str, str]]) -> Checked:
        # HTTP 439-456: x-envoy-auth-headers-to-remove, comma-split and trimmed, then dropped.
        remove = [
            name.strip().lower()
            for k, v in answer
            if k == _HEADERS_TO_REMOVE
            for name in v.split(",")
            if name.strip()
        ]
        answer = [(k, v) for k, v in answer if k != _HEADERS_TO_REMOVE]
        up = dict(original)
        to_set = [(k, v) for k, v in answer if k in self._lower(self.allowed_upstream_headers)]
        to_add = [
            (k, v) for k, v in answer if k in self._lower(self.allowed_upstream_headers_to_append)
        ]
        # FLT 710-736: setCopy = remove + add (header_map_impl.cc 326-329), so the last value
        # wins; FLT 737-763: addCopy adds one more value.
        for k, v in to_set:
            up[k] = v
        for k, v in to_add:
            _add(up, k, v)
        # FLT 812-853, after set/add: ':'-prefixed names and Host cannot be removed (819-826).
        for name in remove:
            if not name.startswith(":") and name != "host":
                up.pop(name, None)
        res.allowed, res.upstream_headers = True, up
        on_success = self._lower(self.allowed_client_headers_on_success)
        for k, v in answer:  # HTTP 89-93, FLT 511-518: added to the client response.
            if k in on_success:
                _add(res.client_headers, k, v)
        return res

    def _denied(
        self, res: Checked, status: int, body: bytes, answer: list[tuple[str, str]]
    ) -> Checked:
        # HTTP 243-272: an empty list passes everything but Host; else the list + CLIENT_DEFAULTS.
        # (Envoy 1.37.0 used allowed_upstream_headers here by mistake; fixed in 1.37.x/1.38.)
        names = self._lower(self.allowed_client_headers)
        answer = [(k, v) for k, v in answer if k != _HEADERS_TO_REMOVE]  # HTTP 456
        picked = [
            (k, v)
            for k, v in answer
            if (k != ":authority" if not names else k in names + CLIENT_DEFAULTS)
        ]
        # FLT 1041-1067 and source/common/http/utility.cc 727-791 (the local reply).
        headers: dict[str, str] = {}
        for k, v in picked:
            if k != ":status":
                _add(headers, k, v)
        if body:
            headers["content-length"] = str(len(body))
            headers.setdefault("content-type", "text/plain")
        else:
            headers.pop("content-length", None)
            headers.pop("content-type", None)
        res.status, res.body, res.client_headers = status, body, headers
        return res

    def _error(self, res: Checked, original: dict[str, str]) -> Checked:
        # FLT 1071-1133: failure_mode_allow lets it through untouched; else status_on_error
        # (ext_authz.h 291-297: an unset/invalid code means 403) with an empty body.
        res.error = True
        if self.failure_mode_allow:
            res.allowed, res.upstream_headers = True, dict(original)
            return res
        code = self.status_on_error if 100 <= self.status_on_error <= 511 else 403
        res.status, res.body = code, b""
        return res

    @staticmethod
    def _lower(names: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(n.lower() for n in names)
