"""The OpenAPI document of the admin API (sidecar/web/openapi.py, ``ADMIN_OPENAPI``): a valid
OpenAPI 3.1 document that describes every route of the admin blueprint and nothing else, and the
one ``GET /admin/openapi.json`` serves. tests/functional/http/test_admin_openapi.py checks real
responses against its schemas."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from openapi_spec_validator import validate as validate_spec

from sidecar.services import Services
from sidecar.web.admin import admin_blueprint
from sidecar.web.app import create_app
from sidecar.web.openapi import ADMIN_OPENAPI
from tests.functional.http.admin_support import admin_credentials, enable_admin

HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
IMPLICIT_METHODS = {"HEAD", "OPTIONS"}  # added by Flask to every route


@pytest.fixture
def config(config: dict[str, Any]) -> dict[str, Any]:
    return enable_admin(config, admin_credentials())


@pytest.fixture
def admin_routes(services: Services) -> set[tuple[str, str]]:
    """(OpenAPI path template, method) of every route the admin blueprint registers, read from
    an app holding the blueprint alone."""
    assert services.settings.admin is not None
    app = Flask("admin-only")
    app.register_blueprint(admin_blueprint(services, services.settings.admin))
    return {
        (re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule), method.lower())
        for rule in app.url_map.iter_rules()
        if rule.endpoint.startswith("admin.")
        for method in (rule.methods or set()) - IMPLICIT_METHODS
    }


def operations() -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in ADMIN_OPENAPI["paths"].items():
        for method, operation in item.items():
            if method in HTTP_METHODS:
                yield path, method, operation


def test_the_document_is_a_valid_openapi_3_1_document() -> None:
    validate_spec(ADMIN_OPENAPI)  # raises on any violation

    assert re.fullmatch(r"3\.1\.\d+", ADMIN_OPENAPI["openapi"])


def test_every_admin_route_is_described(admin_routes: set[tuple[str, str]]) -> None:
    described = {(path, method) for path, method, _ in operations()}

    assert admin_routes  # the blueprint has routes
    assert admin_routes <= described


def test_nothing_is_described_that_the_blueprint_does_not_serve(
    admin_routes: set[tuple[str, str]],
) -> None:
    described = {(path, method) for path, method, _ in operations()}

    assert described <= admin_routes


def test_every_path_parameter_is_declared() -> None:
    for path, item in ADMIN_OPENAPI["paths"].items():
        named = set(re.findall(r"\{(\w+)\}", path))
        for method, operation in item.items():
            if method not in HTTP_METHODS:
                continue
            declared = {
                p["name"]
                for p in [*item.get("parameters", []), *operation.get("parameters", [])]
                if p["in"] == "path"
            }
            assert declared == named, (path, method)


def test_every_operation_but_the_document_itself_requires_the_admin_token() -> None:
    assert ADMIN_OPENAPI["security"] == [{"adminToken": []}]
    scheme = ADMIN_OPENAPI["components"]["securitySchemes"]["adminToken"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    for path, method, operation in operations():
        if (path, method) == ("/admin/openapi.json", "get"):
            assert operation["security"] == []
        else:
            assert "security" not in operation, (path, method)
            assert "401" in operation["responses"], (path, method)


def test_every_conditional_write_documents_its_preconditions() -> None:
    conditional = []
    for path, method, operation in operations():
        headers = {p["name"] for p in operation.get("parameters", []) if p["in"] == "header"}
        if "If-Match" in headers:
            conditional.append((path, method))
            assert {"412", "428"} <= set(operation["responses"]), (path, method)

    assert sorted(conditional) == [
        ("/admin/policies/{name}", "delete"),
        ("/admin/policies/{name}", "put"),
        ("/admin/policies/{name}/disable", "post"),
        ("/admin/policies/{name}/enable", "post"),
        ("/admin/policies/{name}/rollback", "post"),
    ]


def test_the_served_document_is_this_one(services: Services) -> None:
    app = create_app(services.settings, services)

    response = app.test_client().get("/admin/openapi.json")

    assert response.status_code == 200
    assert response.json == ADMIN_OPENAPI
