"""The OpenAPI 3.1 description of the policy admin API, served at ``GET /admin/openapi.json``."""

from __future__ import annotations

from typing import Any

_CLAIM_VALUE: dict[str, Any] = {"type": ["string", "integer", "boolean"]}
_ERROR = {"$ref": "#/components/schemas/Error"}
_POLICY_NAME = {
    "name": "name",
    "in": "path",
    "required": True,
    "description": "The policy's name, percent-encoded (it may contain '/').",
    "schema": {"type": "string"},
}
_IF_MATCH = {
    "name": "If-Match",
    "in": "header",
    "required": True,
    "description": 'The ETag read from the policy, e.g. "3".',
    "schema": {"type": "string"},
}


_VERSION_QUERY = {
    "in": "query",
    "required": False,
    "description": "With the other of from/to: the fields that differ between the two versions.",
    "schema": {"type": "integer", "minimum": 1},
}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ERROR}}}


def _policy(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "headers": {"ETag": {"schema": {"type": "string"}, "description": "The version."}},
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Policy"}}},
    }


ADMIN_OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "token-exchange-sidecar policy admin API",
        "version": "1",
        "description": (
            "Exchange policies as JSON. Every change is recorded in the policy history with the "
            "admin credential's name, as `sidecar policy` records its --actor. Changes reach "
            "every worker within policy_refresh_interval."
        ),
    },
    "security": [{"adminToken": []}],
    "paths": {
        "/admin/openapi.json": {
            "get": {
                "summary": "This document",
                "security": [],
                "responses": {
                    "200": {
                        "description": "The OpenAPI document of the admin API.",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            },
        },
        "/admin/export": {
            "get": {
                "summary": "Every policy as a policy file",
                "responses": {
                    "200": {
                        "description": (
                            "YAML `policies:`, sorted by name, no versions, as `sidecar policy "
                            "export` writes it; `sidecar policy apply` takes it as it is."
                        ),
                        "content": {"application/yaml": {"schema": {"type": "string"}}},
                    },
                    "401": _error("Missing or wrong admin credentials."),
                },
            },
        },
        "/admin/policies": {
            "get": {
                "summary": "List policies",
                "responses": {
                    "200": {
                        "description": "Every policy with its version.",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "properties": {
                                        "policies": {
                                            "type": "array",
                                            "items": {"$ref": "#/components/schemas/Policy"},
                                        }
                                    },
                                }
                            }
                        },
                    },
                    "401": _error("Missing or wrong admin credentials."),
                },
            },
            "post": {
                "summary": "Create a policy",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Policy"}}
                    },
                },
                "responses": {
                    "201": _policy("Created (version in ETag)."),
                    "400": _error("The policy is invalid, or overlaps another (description)."),
                    "401": _error("Missing or wrong admin credentials."),
                    "409": _error("A policy with this name exists."),
                },
            },
        },
        "/admin/policies/{name}": {
            "parameters": [_POLICY_NAME],
            "get": {
                "summary": "Get a policy",
                "responses": {
                    "200": _policy("The policy (version in ETag)."),
                    "401": _error("Missing or wrong admin credentials."),
                    "404": _error("No such policy."),
                },
            },
            "put": {
                "summary": "Replace a policy (optimistic concurrency)",
                "parameters": [_IF_MATCH],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Policy"}}
                    },
                },
                "responses": {
                    "200": _policy("Updated (new version in ETag)."),
                    "400": _error("The policy is invalid, or overlaps another."),
                    "401": _error("Missing or wrong admin credentials."),
                    "404": _error("No such policy."),
                    "412": _error("Stale If-Match: the policy changed (current ETag returned)."),
                    "428": _error("If-Match is required."),
                },
            },
            "delete": {
                "summary": "Delete a policy (optimistic concurrency; its history stays)",
                "parameters": [_IF_MATCH],
                "responses": {
                    "204": {"description": "Deleted (a new version records it)."},
                    "401": _error("Missing or wrong admin credentials."),
                    "404": _error("No such policy."),
                    "412": _error("Stale If-Match: the policy changed (current ETag returned)."),
                    "428": _error("If-Match is required."),
                },
            },
        },
        "/admin/policies/{name}/enable": {
            "parameters": [_POLICY_NAME],
            "post": {
                "summary": "Enable a policy (optimistic concurrency)",
                "parameters": [_IF_MATCH],
                "responses": {
                    "200": _policy("Enabled (new version in ETag; the same if it was)."),
                    "400": _error("Enabled, it would overlap another enabled policy."),
                    "401": _error("Missing or wrong admin credentials."),
                    "404": _error("No such policy."),
                    "412": _error("Stale If-Match."),
                    "428": _error("If-Match is required."),
                },
            },
        },
        "/admin/policies/{name}/rollback": {
            "parameters": [_POLICY_NAME],
            "post": {
                "summary": "Restore an earlier version, as a new version (optimistic concurrency)",
                "parameters": [
                    {
                        **_IF_MATCH,
                        "description": (
                            'The policy\'s ETag, e.g. "3"; for a deleted policy, the version of '
                            "its deletion (from its history)."
                        ),
                    }
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/RollbackRequest"}
                        }
                    },
                },
                "responses": {
                    "200": _policy("Restored (new version in ETag)."),
                    "400": _error("No version in the body, a deletion, or an overlap."),
                    "401": _error("Missing or wrong admin credentials."),
                    "404": _error("No such policy, or no such version."),
                    "412": _error("Stale If-Match (current version returned)."),
                    "428": _error("If-Match is required."),
                },
            },
        },
        "/admin/policies/{name}/disable": {
            "parameters": [_POLICY_NAME],
            "post": {
                "summary": "Disable a policy (optimistic concurrency)",
                "parameters": [_IF_MATCH],
                "responses": {
                    "200": _policy("Disabled (new version in ETag; the same if it was)."),
                    "401": _error("Missing or wrong admin credentials."),
                    "404": _error("No such policy."),
                    "412": _error("Stale If-Match."),
                    "428": _error("If-Match is required."),
                },
            },
        },
        "/admin/policies/{name}/history": {
            "parameters": [_POLICY_NAME],
            "get": {
                "summary": "Every version of a policy, or the diff of two",
                "parameters": [
                    {**_VERSION_QUERY, "name": "from"},
                    {**_VERSION_QUERY, "name": "to"},
                ],
                "responses": {
                    "200": {
                        "description": "Versions, oldest first; with from and to, their diff.",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "oneOf": [
                                        {"$ref": "#/components/schemas/History"},
                                        {"$ref": "#/components/schemas/HistoryDiff"},
                                    ]
                                }
                            }
                        },
                    },
                    "400": _error("from or to is not a version number, or one is missing."),
                    "401": _error("Missing or wrong admin credentials."),
                    "404": _error("No such policy, or no such version."),
                },
            },
        },
    },
    "components": {
        "securitySchemes": {
            "adminToken": {
                "type": "http",
                "scheme": "bearer",
                "description": "A token of admin.credentials (never a gateway credential).",
            }
        },
        "schemas": {
            "Condition": {
                "type": "object",
                "description": "Exactly one operator.",
                "properties": {
                    "equals": _CLAIM_VALUE,
                    "one_of": {"type": "array", "items": _CLAIM_VALUE, "minItems": 1},
                    "contains": _CLAIM_VALUE,
                },
                "minProperties": 1,
                "maxProperties": 1,
                "additionalProperties": False,
            },
            "Policy": {
                "type": "object",
                "required": ["client_id", "audience", "scopes"],
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string", "description": 'Default "CLIENT -> AUDIENCE".'},
                    "client_id": {"type": "string"},
                    "audience": {"type": "string"},
                    "issuer": {"type": "string", "description": "Only this trusted issuer."},
                    "subject": {
                        "type": "object",
                        "description": "Conditions on verified subject claims; all must hold.",
                        "additionalProperties": {"$ref": "#/components/schemas/Condition"},
                    },
                    "scopes": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                    "default_scopes": {"type": "array", "items": {"type": "string"}},
                    "ttl": {"type": "integer", "minimum": 1},
                    "enabled": {"type": "boolean"},
                    "require_subject_scopes": {"type": "boolean"},
                    "reuse_tokens": {
                        "type": "boolean",
                        "default": True,
                        "description": "False: a minted token is never handed out again.",
                    },
                    "copy_claims": {"type": "array", "items": {"type": "string"}},
                    "credential": {
                        "enum": ["mint", "static", "client_credentials"],
                        "default": "mint",
                        "description": "What the client gets: our token, or the upstream's own.",
                    },
                    "upstream": {
                        "type": "string",
                        "description": "For static and client_credentials: an upstreams: name.",
                    },
                    "version": {"type": "integer", "readOnly": True},
                },
            },
            "History": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "versions": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "version": {"type": "integer"},
                                "action": {
                                    "enum": [
                                        "create",
                                        "update",
                                        "enable",
                                        "disable",
                                        "delete",
                                        "rollback",
                                    ]
                                },
                                "changed_at": {"type": "number"},
                                "changed_by": {"type": "string"},
                                "policy": {"$ref": "#/components/schemas/Policy"},
                            },
                        },
                    },
                },
            },
            "HistoryDiff": {
                "type": "object",
                "required": ["name", "from", "to", "changes"],
                "properties": {
                    "name": {"type": "string"},
                    "from": {"type": "integer"},
                    "to": {"type": "integer"},
                    "changes": {
                        "type": "array",
                        "description": "The fields that differ, in document order.",
                        "items": {
                            "type": "object",
                            "required": ["field", "before", "after"],
                            "properties": {
                                "field": {"type": "string"},
                                "before": {"description": "null where the field is absent."},
                                "after": {"description": "null where the field is absent."},
                            },
                        },
                    },
                },
            },
            "RollbackRequest": {
                "type": "object",
                "required": ["version"],
                "additionalProperties": False,
                "properties": {"version": {"type": "integer", "minimum": 1}},
            },
            "Error": {
                "type": "object",
                "required": ["error"],
                "properties": {
                    "error": {"type": "string"},
                    "error_description": {"type": "string"},
                },
            },
        },
    },
}
