"""The layering of docs/architecture.md, enforced: every import of every module under sidecar/,
read from its source (module level and inside functions alike)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "sidecar"

# docs/architecture.md, bottom up: a module may import its own layer and the ones below.
LAYERS: dict[str, int] = {
    "sidecar.errors": 0,
    "sidecar.exchange": 1,
    "sidecar.keys": 1,
    "sidecar.config": 2,
    "sidecar.store": 3,
    "sidecar.migrations": 3,
    "sidecar.audit": 3,
    "sidecar.jwks": 3,
    "sidecar.issuers": 3,
    "sidecar.clients": 3,
    "sidecar.ratelimit": 3,
    "sidecar.refreshing": 3,
    "sidecar.metrics": 3,
    "sidecar.demo": 3,
    "sidecar.logs": 3,
    "sidecar.upstream_tokens": 3,
    "sidecar.upstreams": 3,
    # For gateways and upstreams: standalone (they import no other sidecar module).
    "sidecar.client": 0,
    "sidecar.verify": 0,
    "sidecar.services": 4,
    "sidecar.web": 5,
    "sidecar.serving": 6,
    "sidecar.cli": 6,
    "sidecar.walkthrough": 6,
    "sidecar.__main__": 6,
}
# The protocol core does no I/O: none of these, whatever layer they would sit in.
CORE_FORBIDDEN = ("sqlalchemy", "flask", "werkzeug", "granian", "gunicorn", "requests", "psycopg")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int | None:
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return LAYERS[prefix]
    return None


def imports_of(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
            # "from sidecar import x" imports the module sidecar.x
            if node.module == "sidecar":
                found.extend(f"sidecar.{alias.name}" for alias in node.names)
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer() -> None:
    unplaced = [module_name(p) for p in MODULES if module_name(p) != "sidecar"]
    assert [m for m in unplaced if layer_of(m) is None] == []


@pytest.mark.parametrize("path", MODULES, ids=[module_name(p) for p in MODULES])
def test_no_module_imports_a_higher_layer(path: Path) -> None:
    own = layer_of(module_name(path))
    if own is None:  # sidecar/__init__.py
        return
    upward = [
        imported
        for imported in imports_of(path)
        if (layer := layer_of(imported)) is not None and layer > own
    ]
    assert upward == []


@pytest.mark.parametrize(
    "path",
    [p for p in MODULES if layer_of(module_name(p)) == 1],
    ids=[module_name(p) for p in MODULES if layer_of(module_name(p)) == 1],
)
def test_the_protocol_core_imports_no_io_library(path: Path) -> None:
    forbidden = [
        imported
        for imported in imports_of(path)
        if imported.split(".")[0] in CORE_FORBIDDEN or (layer_of(imported) or 0) > 1
    ]
    assert forbidden == []


def test_only_the_command_line_imports_the_serving_boundary() -> None:
    importers = {
        module_name(path)
        for path in MODULES
        if any(i.startswith("sidecar.serving") for i in imports_of(path))
        and not module_name(path).startswith("sidecar.serving")
    }
    assert importers <= {"sidecar.cli"}


def test_the_check_itself_sees_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from sidecar.store.db import make_engine\n")
    assert "sidecar.store.db" in imports_of(bad)
    assert layer_of("sidecar.store.db") == 3
    assert layer_of("sidecar.exchange.grant") == 1
