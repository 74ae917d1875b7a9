"""The policy admin API (``/admin``), for tooling: list, get, create, update, enable, disable,
delete and roll back policies as JSON, read their history and the diff of two versions, export
them as a policy file. Disabled (404) unless ``admin:`` is configured. The same operations as
``sidecar policy``, on the same store, so either leaves the same history.

- Authenticated by its own bearer tokens (``admin.credentials``), never by the gateway's client
  credentials; the credential's name is recorded in the policy history as ``admin:NAME``.
- Optimistic concurrency: a policy's ``ETag`` is its version; every write but a create must send
  ``If-Match`` with it (428 without, 412 when stale); creating an existing policy is 409.
- With ``admin.listen``, the API answers only on that listener and the listener answers nothing
  else, so the gateway's network path cannot reach it.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

from flask import Blueprint, Response, request
from werkzeug.exceptions import MethodNotAllowed

from sidecar.config import AdminConfig
from sidecar.services import Services
from sidecar.store.policies import (
    PolicyExists,
    PolicyInvalid,
    PolicyNotFound,
    StaleVersion,
    StoredPolicy,
    VersionNotFound,
    policy_document,
    policy_file_text,
    policy_from_document,
)
from sidecar.web.openapi import ADMIN_OPENAPI
from sidecar.web.responses import NO_STORE, STATUS_LINES, json_response

# RFC 9110 §13.1.1: If-Match uses the strong comparison; a weak tag never matches.
_ETAG = re.compile(r'^\s*"(\d+)"\s*$')
_WEAK_ETAG = re.compile(r'^\s*W/"\d+"\s*$')
_VERSION = re.compile(r"^[1-9][0-9]{0,9}$")
MAX_ADMIN_BODY_BYTES = 64 * 1024
# The methods of /admin/policies/NAME: what a POST to NAME%2Fdisable (no route) is told.
_POLICY_METHODS = ["DELETE", "GET", "HEAD", "PUT"]


def admin_error(status: int, error: str, description: str, **headers: str) -> Response:
    return json_response(
        {"error": error, "error_description": description}, status, {**NO_STORE, **headers}
    )


def _stored_response(stored: StoredPolicy, status: int = 200) -> Response:
    body = {**policy_document(stored.policy), "version": stored.version}
    return json_response(body, status, {**NO_STORE, "ETag": f'"{stored.version}"'})


def _authenticate(config: AdminConfig) -> str | None:
    """The name of the credential the request carries, or None."""
    header = request.headers.get("Authorization", "")
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented:
        return None
    found = None
    for credential in config.credentials:
        # Compare against every credential: the time taken does not tell which one matched.
        if hmac.compare_digest(
            presented.encode("utf-8", "surrogatepass"),
            credential.token.get_secret_value().encode("utf-8"),
        ):
            found = credential.name
    return found


def _if_match() -> int | None:
    """The version named by If-Match: None when absent or unusable; -1 for a weak tag, which
    matches no version (412)."""
    header = request.headers.get("If-Match", "")
    if _WEAK_ETAG.match(header):
        return -1
    match = _ETAG.match(header)
    return int(match.group(1)) if match else None


def _body() -> Any:
    if (request.content_length or 0) > MAX_ADMIN_BODY_BYTES:
        return None
    document = request.get_json(silent=True)
    if isinstance(document, dict):
        document.pop("version", None)  # read-only: the ETag carries it
    return document


def _rollback_version() -> int | None:
    """The version a rollback body (``{"version": N}``) names; None when it names none."""
    if (request.content_length or 0) > MAX_ADMIN_BODY_BYTES:
        return None
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or set(body) != {"version"}:
        return None
    version = body["version"]
    # Strict JSON types, as for policy documents: not "3", not 3.0, not true.
    return version if type(version) is int and version >= 1 else None


def _version_argument(name: str) -> int | None:
    value = request.args.get(name, "")
    return int(value) if _VERSION.match(value) else None


def _precondition_required() -> Response:
    return admin_error(428, "precondition_required", "If-Match with the ETag is required.")


def _sent_as_path_segment(word: str) -> bool:
    """Whether the request path as sent ends with ``/word``, a real path segment. The router sees
    the decoded path, where the policy named ``a/history`` (sent as ``a%2Fhistory``) and the
    history of ``a`` look the same."""
    raw = request.environ.get("RAW_URI") or request.environ.get("REQUEST_URI")
    if raw is None:
        return True  # the server does not say: trust the router
    _, slash, last = urlsplit(raw).path.rpartition("/")
    return bool(slash) and unquote(last) == word


def admin_blueprint(services: Services, config: AdminConfig) -> Blueprint:
    admin = Blueprint("admin", __name__, url_prefix="/admin")
    store = services.policy_store

    def changed(stored: StoredPolicy, status: int = 200) -> Response:
        services.policies.invalidate()  # this worker at once; the others within the interval
        return _stored_response(stored, status)

    @admin.before_request
    def require_credentials() -> Response | None:
        if request.endpoint == "admin.openapi":
            return None
        actor = _authenticate(config)
        if actor is None:
            return admin_error(
                401,
                "invalid_token",
                "Admin credentials required.",
                **{"WWW-Authenticate": 'Bearer realm="token-exchange-sidecar-admin"'},
            )
        request.environ["sidecar.admin"] = f"admin:{actor}"
        return None

    def actor() -> str:
        return str(request.environ["sidecar.admin"])

    def guarded(write: Callable[[], Response]) -> Response:
        try:
            return write()
        except PolicyInvalid as exc:
            return admin_error(400, "invalid_policy", str(exc))
        except PolicyExists:
            return admin_error(409, "conflict", "A policy with this name exists.")
        except VersionNotFound:
            return admin_error(404, "not_found", "No such version of the policy.")
        except PolicyNotFound:
            return admin_error(404, "not_found", "No such policy.")
        except StaleVersion as exc:
            return admin_error(
                412, "precondition_failed", "The policy changed.", ETag=f'"{exc.current}"'
            )

    @admin.get("/openapi.json")
    def openapi() -> Response:
        return json_response(ADMIN_OPENAPI)

    @admin.get("/policies")
    def list_policies() -> Response:
        listed = [{**policy_document(s.policy), "version": s.version} for s in store.all()]
        return json_response({"policies": listed}, headers=NO_STORE)

    @admin.get("/policies/<path:name>")
    def get_policy(name: str) -> Response:
        stored = store.get(name)
        if stored is None:
            return admin_error(404, "not_found", "No such policy.")
        return _stored_response(stored)

    @admin.get("/policies/<path:name>/history")
    def policy_history(name: str) -> Response:
        if not _sent_as_path_segment("history"):
            return get_policy(f"{name}/history")
        if "from" in request.args or "to" in request.args:
            return history_diff(name)
        versions = store.history(name)
        if not versions:
            return admin_error(404, "not_found", "No such policy.")
        return json_response(
            {
                "name": name,
                "versions": [
                    {
                        "version": v.version,
                        "action": v.action,
                        "changed_at": v.changed_at,
                        "changed_by": v.changed_by,
                        "policy": v.document,
                    }
                    for v in versions
                ],
            },
            headers=NO_STORE,
        )

    def history_diff(name: str) -> Response:
        from_version, to_version = _version_argument("from"), _version_argument("to")
        if from_version is None or to_version is None:
            return admin_error(400, "invalid_request", "from and to must both be version numbers.")

        def read() -> Response:
            changes = store.diff(name, from_version, to_version)
            body = {"name": name, "from": from_version, "to": to_version,
                    "changes": [change.as_dict() for change in changes]}  # fmt: skip
            return json_response(body, headers=NO_STORE)

        return guarded(read)

    @admin.get("/export")
    def export() -> Response:
        # The policy file `sidecar policy export` writes, which `sidecar policy apply` takes.
        text = policy_file_text(s.policy for s in store.all())
        response = Response(text, status=STATUS_LINES[200], content_type="application/yaml")
        response.headers.update(NO_STORE)
        return response

    @admin.post("/policies")
    def create_policy() -> Response:
        def write() -> Response:
            policy = policy_from_document(_body(), strict=True)
            return changed(store.put(policy, actor=actor(), if_version=None, create=True), 201)

        return guarded(write)

    @admin.put("/policies/<path:name>")
    def update_policy(name: str) -> Response:
        version = _if_match()
        if version is None:
            return admin_error(428, "precondition_required", "If-Match with the ETag is required.")
        document = _body()
        if isinstance(document, dict):
            document = {"name": name, **document}
            if document["name"] != name:
                return admin_error(400, "invalid_policy", "The name in the body differs.")

        def write() -> Response:
            policy = policy_from_document(document, strict=True)
            return changed(store.put(policy, actor=actor(), if_version=version, create=False))

        return guarded(write)

    def set_enabled(name: str, enabled: bool) -> Response:
        word = "enable" if enabled else "disable"
        if not _sent_as_path_segment(word):
            # A POST to the policy named "NAME/disable", which is not a route: never a change
            # of the policy NAME.
            raise MethodNotAllowed(valid_methods=_POLICY_METHODS)
        version = _if_match()
        if version is None:
            return _precondition_required()
        return guarded(
            lambda: changed(store.set_enabled(name, enabled, actor=actor(), if_version=version))
        )

    @admin.post("/policies/<path:name>/disable")
    def disable_policy(name: str) -> Response:
        return set_enabled(name, False)

    @admin.post("/policies/<path:name>/enable")
    def enable_policy(name: str) -> Response:
        return set_enabled(name, True)

    @admin.post("/policies/<path:name>/rollback")
    def rollback_policy(name: str) -> Response:
        if not _sent_as_path_segment("rollback"):
            raise MethodNotAllowed(valid_methods=_POLICY_METHODS)
        version = _if_match()
        if version is None:
            return _precondition_required()
        target = _rollback_version()
        if target is None:
            return admin_error(400, "invalid_request", 'The body must be {"version": N}.')
        return guarded(
            lambda: changed(store.rollback(name, target, actor=actor(), if_version=version))
        )

    @admin.delete("/policies/<path:name>")
    def delete_policy(name: str) -> Response:
        version = _if_match()
        if version is None:
            return _precondition_required()

        def write() -> Response:
            store.delete(name, actor=actor(), if_version=version)
            services.policies.invalidate()
            response = Response(status=STATUS_LINES[204], headers=NO_STORE)
            del response.headers["Content-Type"]  # no content, so no type
            return response

        return guarded(write)

    return admin
