"""The policy admin API (sidecar/web/admin.py) through Flask's test client: its own bearer
credentials, reads, writes under optimistic concurrency (If-Match), history, and the guard that
keeps a percent-encoded slash in a policy name from reaching another route.
tests/functional/http/test_admin_api.py drives it over HTTP and through /token."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from sidecar.services import Services
from tests.conftest import CODE_SEARCH, GATEWAY_SECRET, TICKETS
from tests.functional.http.admin_support import (
    AdminCalls,
    enable_admin,
    policy_path,
    table_state,
)

CODE_SEARCH_POLICY = f"gateway -> {CODE_SEARCH}"
TICKETS_POLICY = f"gateway -> {TICKETS}"
WIKI = "https://wiki.internal/mcp"
REALM = 'Bearer realm="token-exchange-sidecar-admin"'


@pytest.fixture
def config(config: dict[str, Any], credentials: dict[str, str]) -> dict[str, Any]:
    return enable_admin(config, credentials)


class Admin(AdminCalls[TestResponse]):
    """The admin API's calls (tests/functional/http/admin_support.py) through the test client,
    with one credential."""

    def __init__(self, client: FlaskClient, token: str) -> None:
        self.client = client
        self.token = token

    def send(self, method: str, path: str, headers: dict[str, str], **kwargs: Any) -> TestResponse:
        return self.client.open(path, method=method, headers=headers, **kwargs)


@pytest.fixture
def admin(app: Flask, credentials: dict[str, str]) -> Admin:
    return Admin(app.test_client(), credentials["ops"])


def wiki_policy(**changes: Any) -> dict[str, Any]:
    return {
        "name": "wiki",
        "client_id": "gateway",
        "audience": WIKI,
        "scopes": ["wiki.read"],
        "ttl": 60,
        **changes,
    }


def document_of(admin: Admin, name: str) -> dict[str, Any]:
    response = admin.get(name)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json
    return body


def error_of(response: TestResponse) -> str:
    assert response.headers["Cache-Control"] == "no-store"
    assert set(response.json) == {"error", "error_description"}
    return str(response.json["error"])


# --- credentials ------------------------------------------------------------------------------


def test_a_request_without_credentials_is_401_with_a_bearer_challenge(app: Flask) -> None:
    response = app.test_client().get("/admin/policies")

    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == REALM
    assert error_of(response) == "invalid_token"


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer not-an-admin-token-but-long-enough-0123",
        "Basic {ops}",
        "Bearer",
        "Bearer ",
        "Bearer {ops}x",
        "{ops}",
        f"Bearer {GATEWAY_SECRET}",
    ],
    ids=["unknown", "basic scheme", "no token", "empty token", "longer", "no scheme", "client"],
)
def test_anything_but_an_admin_bearer_token_is_401(
    app: Flask, credentials: dict[str, str], authorization: str
) -> None:
    headers = {"Authorization": authorization.format(ops=credentials["ops"])}

    response = app.test_client().get("/admin/policies", headers=headers)

    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == REALM


def test_the_bearer_scheme_is_case_insensitive(app: Flask, credentials: dict[str, str]) -> None:
    headers = {"Authorization": f"bEaReR {credentials['ops']}"}

    assert app.test_client().get("/admin/policies", headers=headers).status_code == 200


def test_a_write_without_credentials_changes_nothing(app: Flask, services: Services) -> None:
    before = table_state(services.engine)
    client = app.test_client()

    responses = [
        client.post("/admin/policies", json=wiki_policy()),
        client.put(policy_path(TICKETS_POLICY), json=wiki_policy(), headers={"If-Match": '"1"'}),
        client.post(policy_path(TICKETS_POLICY, "/disable"), headers={"If-Match": '"1"'}),
        client.post(policy_path(TICKETS_POLICY, "/enable"), headers={"If-Match": '"1"'}),
        client.delete(policy_path(TICKETS_POLICY), headers={"If-Match": '"1"'}),
        client.post(
            policy_path(TICKETS_POLICY, "/rollback"),
            json={"version": 1},
            headers={"If-Match": '"1"'},
        ),
        client.get("/admin/export"),
    ]

    assert [r.status_code for r in responses] == [401] * 7
    assert table_state(services.engine) == before


def test_each_credential_is_accepted_and_named_in_the_history(
    admin: Admin, credentials: dict[str, str]
) -> None:
    created = admin.create(wiki_policy(), token=credentials["ci"])
    updated = admin.put("wiki", wiki_policy(ttl=30), '"1"', token=credentials["ops"])

    assert (created.status_code, updated.status_code) == (201, 200)
    versions = admin.history("wiki").json["versions"]
    assert [v["changed_by"] for v in versions] == ["admin:ci", "admin:ops"]


def test_the_openapi_document_needs_no_credentials(app: Flask) -> None:
    response = app.test_client().get("/admin/openapi.json")

    assert response.status_code == 200
    assert response.json["openapi"].startswith("3.1")


# --- reads ------------------------------------------------------------------------------------


def test_list_returns_every_policy_with_its_version(admin: Admin, config: dict[str, Any]) -> None:
    response = admin.list()

    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "no-store"
    policies = response.json["policies"]
    assert len(policies) == len(config["policies"])
    assert {p["version"] for p in policies} == {1}
    assert CODE_SEARCH_POLICY in {p["name"] for p in policies}


def test_get_returns_the_document_with_its_version_as_a_strong_etag(admin: Admin) -> None:
    response = admin.get(TICKETS_POLICY)

    assert response.status_code == 200
    assert response.headers["ETag"] == '"1"'
    assert response.headers["Cache-Control"] == "no-store"
    document = response.json
    assert (document["client_id"], document["audience"], document["ttl"]) == (
        "gateway",
        TICKETS,
        60,
    )
    assert document["version"] == 1


def test_get_of_an_unknown_policy_is_404(admin: Admin) -> None:
    response = admin.get("nope")

    assert response.status_code == 404
    assert error_of(response) == "not_found"


def test_a_name_with_a_slash_is_read_back_percent_encoded(admin: Admin) -> None:
    assert admin.create(wiki_policy(name="team/wiki")).status_code == 201

    assert document_of(admin, "team/wiki")["audience"] == WIKI


# --- create -----------------------------------------------------------------------------------


def test_create_stores_the_policy_at_version_1(admin: Admin) -> None:
    response = admin.create(wiki_policy())

    assert response.status_code == 201
    assert response.headers["ETag"] == '"1"'
    assert document_of(admin, "wiki")["scopes"] == ["wiki.read"]


def test_create_of_an_existing_name_is_409(admin: Admin) -> None:
    admin.create(wiki_policy())

    response = admin.create(wiki_policy(ttl=30))

    assert response.status_code == 409
    assert error_of(response) == "conflict"
    assert document_of(admin, "wiki")["ttl"] == 60


@pytest.mark.parametrize(
    "document",
    [wiki_policy(ttl="60"), wiki_policy(scopes="wiki.read"), ["not", "an", "object"], None],
    ids=["string ttl", "string scopes", "a list", "no body"],
)
def test_create_of_an_invalid_document_is_400(admin: Admin, document: Any) -> None:
    response = admin.create(document)

    assert response.status_code == 400
    assert error_of(response) == "invalid_policy"
    assert admin.get("wiki").status_code == 404


# --- update: If-Match -------------------------------------------------------------------------


def test_update_without_if_match_is_428_and_changes_nothing(admin: Admin) -> None:
    response = admin.put(TICKETS_POLICY, wiki_policy(name=TICKETS_POLICY), None)

    assert response.status_code == 428
    assert error_of(response) == "precondition_required"
    assert document_of(admin, TICKETS_POLICY)["version"] == 1


@pytest.mark.parametrize("if_match", ['"7"', 'W/"1"', '"0"'], ids=["stale", "weak", "zero"])
def test_update_with_an_etag_that_is_not_the_current_one_is_412(
    admin: Admin, if_match: str
) -> None:
    response = admin.put(
        TICKETS_POLICY, {**document_of(admin, TICKETS_POLICY), "ttl": 30}, if_match
    )

    assert response.status_code == 412
    assert response.headers["ETag"] == '"1"'
    assert error_of(response) == "precondition_failed"
    assert document_of(admin, TICKETS_POLICY)["ttl"] == 60


def test_update_with_the_current_etag_replaces_the_policy_everywhere_at_once(
    admin: Admin, services: Services
) -> None:
    services.policies.get()  # this worker holds the policies
    document = {**document_of(admin, TICKETS_POLICY), "ttl": 30}

    response = admin.put(TICKETS_POLICY, document, '"1"')

    assert response.status_code == 200
    assert response.headers["ETag"] == '"2"'
    assert response.json["ttl"] == 30
    assert document_of(admin, TICKETS_POLICY)["version"] == 2
    held = services.policies.get().find("gateway", TICKETS)
    assert held is not None
    assert held.ttl == 30  # not after policy_refresh_interval (an hour here): at once


def test_update_with_the_name_in_the_path_only_is_accepted(admin: Admin) -> None:
    document = document_of(admin, TICKETS_POLICY)
    del document["name"]

    response = admin.put(TICKETS_POLICY, {**document, "ttl": 45}, '"1"')

    assert response.status_code == 200
    assert response.json["name"] == TICKETS_POLICY


def test_update_with_another_name_in_the_body_is_400(admin: Admin) -> None:
    document = {**document_of(admin, TICKETS_POLICY), "name": "renamed"}

    response = admin.put(TICKETS_POLICY, document, '"1"')

    assert response.status_code == 400
    assert error_of(response) == "invalid_policy"
    assert admin.get("renamed").status_code == 404


@pytest.mark.parametrize(("padding", "status"), [(60_000, 200), (70_000, 400)])
def test_an_update_body_is_read_up_to_64_kib(admin: Admin, padding: int, status: int) -> None:
    document = {**document_of(admin, TICKETS_POLICY), "ttl": 30}
    body = json.dumps(document) + " " * padding  # the same document, padded with whitespace

    response = admin.request(
        "PUT",
        policy_path(TICKETS_POLICY),
        if_match='"1"',
        data=body,
        content_type="application/json",
    )

    assert response.status_code == status
    assert document_of(admin, TICKETS_POLICY)["ttl"] == (30 if status == 200 else 60)


def test_update_of_an_unknown_policy_is_404(admin: Admin) -> None:
    response = admin.put("wiki", wiki_policy(), '"1"')

    assert response.status_code == 404
    assert error_of(response) == "not_found"


# --- disable ----------------------------------------------------------------------------------


def test_disable_without_if_match_is_428(admin: Admin) -> None:
    response = admin.disable(TICKETS_POLICY, None)

    assert response.status_code == 428
    assert document_of(admin, TICKETS_POLICY)["enabled"] is True


def test_disable_with_the_current_etag_disables_the_policy(admin: Admin) -> None:
    response = admin.disable(TICKETS_POLICY, '"1"')

    assert response.status_code == 200
    assert response.headers["ETag"] == '"2"'
    assert response.json["enabled"] is False
    assert document_of(admin, TICKETS_POLICY)["enabled"] is False


def test_disable_with_a_stale_etag_is_412(admin: Admin) -> None:
    admin.disable(TICKETS_POLICY, '"1"')

    response = admin.disable(TICKETS_POLICY, '"1"')

    assert response.status_code == 412
    assert response.headers["ETag"] == '"2"'


def test_disable_of_an_unknown_policy_is_404(admin: Admin) -> None:
    assert admin.disable("nope", '"1"').status_code == 404


# --- enable, delete, rollback -----------------------------------------------------------------


def enable(admin: Admin, name: str, if_match: str | None) -> TestResponse:
    return admin.request("POST", policy_path(name, "/enable"), if_match=if_match)


def delete(admin: Admin, name: str, if_match: str | None) -> TestResponse:
    return admin.request("DELETE", policy_path(name), if_match=if_match)


def rollback(admin: Admin, name: str, if_match: str | None, body: Any) -> TestResponse:
    return admin.request("POST", policy_path(name, "/rollback"), if_match=if_match, json=body)


def test_enable_of_a_disabled_policy_is_a_version_of_its_own(admin: Admin) -> None:
    admin.disable(TICKETS_POLICY, '"1"')

    response = enable(admin, TICKETS_POLICY, '"2"')

    assert (response.status_code, response.headers["ETag"]) == (200, '"3"')
    assert response.json["enabled"] is True
    versions = admin.history(TICKETS_POLICY).json["versions"]
    assert [(v["action"], v["changed_by"]) for v in versions][1:] == [
        ("disable", "admin:ops"),
        ("enable", "admin:ops"),
    ]


def test_enable_of_an_enabled_policy_keeps_its_version(admin: Admin) -> None:
    response = enable(admin, TICKETS_POLICY, '"1"')

    assert (response.status_code, response.headers["ETag"]) == (200, '"1"')
    assert len(admin.history(TICKETS_POLICY).json["versions"]) == 1


def test_enable_that_would_overlap_is_400(admin: Admin) -> None:
    twin = wiki_policy(name="twin", audience=CODE_SEARCH, scopes=["code.read"], enabled=False)
    assert admin.create(twin).status_code == 201

    response = enable(admin, "twin", '"1"')

    assert response.status_code == 400
    assert error_of(response) == "invalid_policy"
    assert document_of(admin, "twin")["enabled"] is False


def test_delete_is_204_without_a_body_and_recorded(admin: Admin) -> None:
    response = delete(admin, TICKETS_POLICY, '"1"')

    assert response.status_code == 204
    assert response.data == b""
    assert "Content-Type" not in response.headers
    assert admin.get(TICKETS_POLICY).status_code == 404
    versions = admin.history(TICKETS_POLICY).json["versions"]
    assert [(v["version"], v["action"]) for v in versions] == [(1, "create"), (2, "delete")]


def test_rollback_restores_a_version_as_a_new_one(admin: Admin) -> None:
    admin.put(TICKETS_POLICY, {**document_of(admin, TICKETS_POLICY), "ttl": 30}, '"1"')

    response = rollback(admin, TICKETS_POLICY, '"2"', {"version": 1})

    assert (response.status_code, response.headers["ETag"]) == (200, '"3"')
    assert (response.json["ttl"], response.json["version"]) == (60, 3)
    assert admin.history(TICKETS_POLICY).json["versions"][-1]["action"] == "rollback"


def test_rollback_of_a_deleted_policy_names_the_deletion_s_version(admin: Admin) -> None:
    delete(admin, TICKETS_POLICY, '"1"')

    stale = rollback(admin, TICKETS_POLICY, '"1"', {"version": 1})
    restored = rollback(admin, TICKETS_POLICY, '"2"', {"version": 1})

    assert (stale.status_code, stale.headers["ETag"]) == (412, '"2"')
    assert (restored.status_code, restored.headers["ETag"]) == (200, '"3"')
    assert document_of(admin, TICKETS_POLICY)["ttl"] == 60


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        ({"version": 9}, 404, "not_found"),
        ({"version": 2}, 400, "invalid_policy"),  # the deletion
        ({"version": "1"}, 400, "invalid_request"),
        ({"version": 1.0}, 400, "invalid_request"),
        ({"version": True}, 400, "invalid_request"),
        ({"version": 0}, 400, "invalid_request"),
        ({"version": 1, "ttl": 5}, 400, "invalid_request"),
        ([1], 400, "invalid_request"),
        (None, 400, "invalid_request"),
    ],
    ids=["missing", "deletion", "string", "float", "bool", "zero", "extra", "list", "no body"],
)
def test_a_rollback_that_names_no_restorable_version_changes_nothing(
    admin: Admin, services: Services, body: Any, status: int, error: str
) -> None:
    delete(admin, TICKETS_POLICY, '"1"')
    before = table_state(services.engine)

    response = rollback(admin, TICKETS_POLICY, '"2"', body)

    assert response.status_code == status
    assert error_of(response) == error
    assert table_state(services.engine) == before


@pytest.mark.parametrize("write", [enable, delete], ids=["enable", "delete"])
def test_enable_and_delete_need_the_current_version(
    admin: Admin, services: Services, write: Any
) -> None:
    admin.disable(TICKETS_POLICY, '"1"')
    before = table_state(services.engine)

    missing, stale, weak = (write(admin, TICKETS_POLICY, tag) for tag in (None, '"1"', 'W/"2"'))

    assert (missing.status_code, error_of(missing)) == (428, "precondition_required")
    assert (stale.status_code, stale.headers["ETag"]) == (412, '"2"')
    assert weak.status_code == 412
    assert table_state(services.engine) == before


def test_rollback_needs_the_current_version(admin: Admin, services: Services) -> None:
    before = table_state(services.engine)

    missing = rollback(admin, TICKETS_POLICY, None, {"version": 1})
    stale = rollback(admin, TICKETS_POLICY, '"7"', {"version": 1})

    assert (missing.status_code, stale.status_code) == (428, 412)
    assert table_state(services.engine) == before


@pytest.mark.parametrize("write", [enable, delete], ids=["enable", "delete"])
def test_enable_and_delete_of_an_unknown_policy_are_404(admin: Admin, write: Any) -> None:
    response = write(admin, "nope", '"1"')

    assert (response.status_code, error_of(response)) == (404, "not_found")


def test_the_status_line_carries_the_reason_phrase(admin: Admin) -> None:
    assert admin.put(TICKETS_POLICY, wiki_policy(), None).status == "428 Precondition Required"
    assert enable(admin, TICKETS_POLICY, '"9"').status == "412 Precondition Failed"
    assert delete(admin, TICKETS_POLICY, '"1"').status == "204 No Content"


# --- history between two versions, export -------------------------------------------------------


def test_history_from_to_is_the_diff_of_two_versions(admin: Admin) -> None:
    admin.put(TICKETS_POLICY, {**document_of(admin, TICKETS_POLICY), "ttl": 30}, '"1"')

    response = admin.request("GET", policy_path(TICKETS_POLICY, "/history?from=1&to=2"))

    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "no-store"
    assert response.json == {
        "name": TICKETS_POLICY,
        "from": 1,
        "to": 2,
        "changes": [{"field": "ttl", "before": 60, "after": 30}],
    }


@pytest.mark.parametrize(
    ("query", "status"),
    [("from=1", 400), ("from=1&to=x", 400), ("from=0&to=1", 400), ("from=-1&to=1", 400),
     ("from=1&to=5", 404)],
)  # fmt: skip
def test_history_from_to_needs_two_versions_the_policy_has(
    admin: Admin, query: str, status: int
) -> None:
    response = admin.request("GET", policy_path(TICKETS_POLICY, f"/history?{query}"))

    assert response.status_code == status
    assert error_of(response) == ("not_found" if status == 404 else "invalid_request")


def test_export_is_the_policy_file_of_every_policy(admin: Admin, config: dict[str, Any]) -> None:
    response = admin.request("GET", "/admin/export")

    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/yaml")
    assert response.headers["Cache-Control"] == "no-store"
    exported = yaml.safe_load(response.text)["policies"]
    assert [p["name"] for p in exported] == sorted(p["name"] for p in admin.list().json["policies"])
    assert len(exported) == len(config["policies"])
    assert all("version" not in p for p in exported)


# --- history ----------------------------------------------------------------------------------


def test_history_lists_every_version_oldest_first(admin: Admin) -> None:
    admin.disable(TICKETS_POLICY, '"1"')

    response = admin.history(TICKETS_POLICY)

    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "no-store"
    body = response.json
    assert body["name"] == TICKETS_POLICY
    versions = body["versions"]
    assert [(v["version"], v["action"], v["changed_by"]) for v in versions] == [
        (1, "create", "bootstrap"),
        (2, "disable", "admin:ops"),
    ]
    assert [v["policy"]["enabled"] for v in versions] == [True, False]
    assert versions[0]["changed_at"] <= versions[1]["changed_at"]


def test_history_of_an_unknown_policy_is_404(admin: Admin) -> None:
    assert admin.history("nope").status_code == 404


def test_a_refused_write_records_no_version(admin: Admin) -> None:
    admin.put(TICKETS_POLICY, {**document_of(admin, TICKETS_POLICY), "ttl": "30"}, '"1"')
    admin.disable(TICKETS_POLICY, '"9"')

    assert len(admin.history(TICKETS_POLICY).json["versions"]) == 1


# --- an encoded slash in the name -------------------------------------------------------------


@pytest.fixture
def wiki(admin: Admin) -> Admin:
    assert admin.create(wiki_policy()).status_code == 201
    return admin


def test_a_post_to_name_percent_2f_disable_is_405_and_disables_nothing(wiki: Admin) -> None:
    # The router sees "/admin/policies/wiki/disable"; the raw URI says "wiki%2Fdisable".
    response = wiki.request("POST", "/admin/policies/wiki%2Fdisable", if_match='"1"')

    assert response.status_code == 405
    allowed = {m.strip() for m in response.headers["Allow"].split(",")}
    assert "POST" not in allowed
    assert document_of(wiki, "wiki")["enabled"] is True
    assert len(wiki.history("wiki").json["versions"]) == 1


@pytest.mark.parametrize("word", ["enable", "rollback"])
def test_a_post_to_name_percent_2f_enable_or_rollback_is_405(wiki: Admin, word: str) -> None:
    wiki.disable("wiki", '"1"')

    response = wiki.request(
        "POST", f"/admin/policies/wiki%2F{word}", if_match='"2"', json={"version": 1}
    )

    assert response.status_code == 405
    assert "POST" not in {m.strip() for m in response.headers["Allow"].split(",")}
    assert len(wiki.history("wiki").json["versions"]) == 2


def test_a_get_of_name_percent_2f_history_reads_that_name_not_the_history(wiki: Admin) -> None:
    response = wiki.request("GET", "/admin/policies/wiki%2Fhistory")

    assert response.status_code == 404  # no policy is named "wiki/history"
    assert error_of(response) == "not_found"


def test_the_request_uri_serves_when_the_raw_uri_is_absent(wiki: Admin) -> None:
    response = wiki.request(
        "POST",
        "/admin/policies/wiki%2Fdisable",
        if_match='"1"',
        environ_overrides={"RAW_URI": None},
    )

    assert response.status_code == 405
    assert document_of(wiki, "wiki")["enabled"] is True


def test_the_real_sub_resources_still_answer_beside_the_guard(wiki: Admin) -> None:
    assert wiki.request("GET", "/admin/policies/wiki/history").status_code == 200
    assert wiki.request("POST", "/admin/policies/wiki/disable", if_match='"1"').status_code == 200


@pytest.fixture
def without_request_uri(app: Flask) -> Iterator[None]:
    """A server that gives the app neither RAW_URI nor REQUEST_URI."""
    inner = app.wsgi_app

    def strip(environ: dict[str, Any], start_response: Any) -> Any:
        environ.pop("RAW_URI", None)
        environ.pop("REQUEST_URI", None)
        return inner(environ, start_response)

    app.wsgi_app = strip  # type: ignore[method-assign]
    yield
    app.wsgi_app = inner  # type: ignore[method-assign]


def test_without_the_raw_uri_the_router_is_trusted(wiki: Admin, without_request_uri: None) -> None:
    # What the server decoded is all there is to go by: the request disables "wiki".
    response = wiki.request("POST", "/admin/policies/wiki%2Fdisable", if_match='"1"')

    assert response.status_code == 200
    assert document_of(wiki, "wiki")["enabled"] is False
