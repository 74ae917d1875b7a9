"""The OpenAPI document of the admin API (sidecar/web/openapi.py): served without credentials,
a valid OpenAPI 3.1 document, describing every route the admin blueprint registers, with schemas
the real responses conform to."""

from __future__ import annotations

import re
from typing import Any

import pytest
import requests
from flask import Flask
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate as validate_spec

from tests.conftest import CODE_SEARCH, LiveServer
from tests.functional.http.admin_support import AdminClient, enable_admin

CODE_SEARCH_POLICY = f"gateway -> {CODE_SEARCH}"
IGNORED_METHODS = {"HEAD", "OPTIONS"}


@pytest.fixture
def config(config: dict[str, Any], credentials: dict[str, str]) -> dict[str, Any]:
    return enable_admin(config, credentials)


@pytest.fixture
def document(server: LiveServer) -> dict[str, Any]:
    response = requests.get(f"{server.url}/admin/openapi.json", timeout=10)
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body


def conforms(document: dict[str, Any], schema_name: str, instance: Any) -> list[str]:
    """The errors of ``instance`` against ``#/components/schemas/NAME`` of the document."""
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": document["components"]}
    return [error.message for error in OAS31Validator(schema).iter_errors(instance)]


def test_openapi_document_is_served_without_credentials(server: LiveServer) -> None:
    response = requests.get(f"{server.url}/admin/openapi.json", timeout=10)

    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    assert re.fullmatch(r"3\.1\.\d+", response.json()["openapi"])


def test_openapi_document_is_a_valid_openapi_3_1_document(document: dict[str, Any]) -> None:
    validate_spec(document)  # raises on any violation of the OpenAPI 3.1 schema


def test_every_admin_route_is_described(app: Flask, document: dict[str, Any]) -> None:
    registered = {
        (re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule), method.lower())
        for rule in app.url_map.iter_rules()
        if rule.rule.startswith("/admin")
        for method in (rule.methods or set()) - IGNORED_METHODS
    }
    described = {
        (path, method)
        for path, item in document["paths"].items()
        for method in item
        if method in {"get", "put", "post", "delete", "patch"}
    }

    assert registered  # the blueprint is there
    assert registered == described


def test_only_the_openapi_document_is_described_as_unauthenticated(
    document: dict[str, Any],
) -> None:
    assert document["security"] == [{"adminToken": []}]
    open_operations = [
        (path, method)
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if isinstance(operation, dict) and operation.get("security") == []
    ]
    assert open_operations == [("/admin/openapi.json", "get")]
    assert document["components"]["securitySchemes"]["adminToken"]["scheme"] == "bearer"


def test_responses_conform_to_the_documented_schemas(
    server: LiveServer, document: dict[str, Any], credentials: dict[str, str]
) -> None:
    admin = AdminClient(server.url, credentials["ops"])
    read = admin.get(CODE_SEARCH_POLICY)
    admin.put(CODE_SEARCH_POLICY, {**read.json(), "subject": {"tenant": {"equals": "acme"}}}, '"1"')

    policy = admin.get(CODE_SEARCH_POLICY).json()
    listed = admin.list().json()
    history = admin.history(CODE_SEARCH_POLICY).json()
    errors = [
        admin.get("gateway -> https://nowhere.internal/mcp").json(),
        admin.put(CODE_SEARCH_POLICY, policy, '"1"').json(),
        requests.get(f"{server.url}/admin/policies", timeout=10).json(),
    ]

    assert "subject" in policy  # the richest shape: conditions included
    assert conforms(document, "Policy", policy) == []
    for listed_policy in listed["policies"]:
        assert conforms(document, "Policy", listed_policy) == []
    assert conforms(document, "History", history) == []
    for error in errors:
        assert conforms(document, "Error", error) == []


def test_the_documented_policy_schema_is_the_accepted_one(
    server: LiveServer, document: dict[str, Any], credentials: dict[str, str]
) -> None:
    # A body the schema accepts is created; one it refuses is refused by the service too.
    admin = AdminClient(server.url, credentials["ops"])
    accepted = {
        "client_id": "gateway",
        "audience": "https://wiki.internal/mcp",
        "subject": {"groups": {"contains": "eng"}, "tenant": {"one_of": ["acme", "beta"]}},
        "scopes": ["wiki.read"],
        "ttl": 60,
    }
    refused = {**accepted, "name": "other", "subject": {"groups": {"matches": "e.*"}}}

    assert conforms(document, "Policy", accepted) == []
    assert admin.create(accepted).status_code == 201
    assert conforms(document, "Policy", refused) != []
    assert admin.create(refused).status_code == 400


@pytest.mark.parametrize("value", [0, 1, "false", "true", None, [False]])
def test_reuse_tokens_must_be_a_json_boolean_in_the_schema_and_the_service(
    server: LiveServer, document: dict[str, Any], credentials: dict[str, str], value: Any
) -> None:
    admin = AdminClient(server.url, credentials["ops"])
    body = {
        "client_id": "gateway",
        "audience": "https://wiki.internal/mcp",
        "scopes": ["wiki.read"],
        "reuse_tokens": value,
    }

    assert conforms(document, "Policy", body) != []
    assert admin.create(body).status_code == 400


def test_reuse_tokens_is_an_optional_boolean_defaulting_to_true(
    server: LiveServer, document: dict[str, Any], credentials: dict[str, str]
) -> None:
    admin = AdminClient(server.url, credentials["ops"])
    described = document["components"]["schemas"]["Policy"]
    body = {
        "client_id": "gateway",
        "audience": "https://wiki.internal/mcp",
        "scopes": ["wiki.read"],
    }

    assert described["properties"]["reuse_tokens"]["type"] == "boolean"
    assert described["properties"]["reuse_tokens"]["default"] is True
    assert "reuse_tokens" not in described["required"]
    assert conforms(document, "Policy", {**body, "reuse_tokens": False}) == []
    created = admin.create({**body, "reuse_tokens": False})
    assert (created.status_code, created.json()["reuse_tokens"]) == (201, False)
    assert conforms(document, "Policy", created.json()) == []
