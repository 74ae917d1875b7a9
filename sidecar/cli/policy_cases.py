"""The case files of ``sidecar policy test`` (:mod:`sidecar.cli.policy_test`): their format, as
strict pydantic models (docs/policies.md), and their loading, with the token files they name
read and every error named by file, line, case and key."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, StrictInt, ValidationError, model_validator

from sidecar.config import ConfigError, read_yaml
from sidecar.config.common import StrictModel

Claims = dict[str, Any]
# The errors a decision can refuse with (explain stops before minting, so never server_error).
ErrorCode = Literal[
    "invalid_request", "invalid_client", "unauthorized_client", "invalid_scope", "invalid_target"
]
# What a grant may be expected to have: field -> the key of explain's result holding it (in the
# order explain prints them), and whether it is a list (compared as a set).
OF_A_GRANT = {
    "policies": ("policies", True),
    "audiences": ("audience", True),
    "scopes": ("scope", True),
    "lifetime": ("lifetime", False),
    "copied_claims": ("copied_claims", True),
    "credential": ("credential", False),
    "upstream": ("upstream", False),
}


class CaseFileError(Exception):
    """The case file is not a valid one; the message names the file, line, case and key."""


class Expectation(StrictModel):
    decision: Literal["granted", "denied"]
    scopes: list[str] | None = None
    lifetime: StrictInt | None = None
    policies: list[str] | None = None
    audiences: list[str] | None = None
    copied_claims: list[str] | None = None
    credential: Literal["mint", "static", "client_credentials"] | None = None
    upstream: str | None = None
    error: ErrorCode | None = None
    reason: str | None = Field(default=None, min_length=1)  # a substring of the reason

    @model_validator(mode="after")
    def _fits_the_decision(self) -> Expectation:
        # An expectation that can never be checked would pass silently: refuse it.
        of_a_grant = [name for name in OF_A_GRANT if getattr(self, name) is not None]
        if self.decision == "denied" and of_a_grant:
            raise ValueError(f"{', '.join(of_a_grant)}: describe a grant, but decision is denied")
        if self.decision == "granted" and (self.error or self.reason):
            raise ValueError("error and reason describe a denial, but decision is granted")
        return self


class Case(StrictModel):
    name: str = Field(min_length=1)
    client: str = Field(min_length=1)
    subject: Claims | None = None  # taken as verified, as `explain --claims`
    subject_token_file: str | None = None  # verified as /token verifies it
    actor: Claims | None = None
    actor_token_file: str | None = None
    audience: str | None = None
    audiences: list[str] = Field(default_factory=list)
    resource: str | None = None
    resources: list[str] = Field(default_factory=list)
    scope: str | None = None  # space-separated, as /token takes it; none: the default scopes
    expect: Expectation

    @model_validator(mode="after")
    def _complete(self) -> Case:
        if (self.subject is None) == (self.subject_token_file is None):
            raise ValueError("give subject (its claims) or subject_token_file: exactly one")
        if self.actor is not None and self.actor_token_file is not None:
            raise ValueError("give actor or actor_token_file, not both")
        for role, claims in (("subject", self.subject), ("actor", self.actor)):
            if claims is not None and not (
                isinstance(claims.get("iss"), str) and isinstance(claims.get("sub"), str)
            ):
                raise ValueError(f"{role}: needs the string claims iss and sub")
        if self.audience is not None and self.audiences:
            raise ValueError("give audience or audiences, not both")
        if self.resource is not None and self.resources:
            raise ValueError("give resource or resources, not both")
        if not (self.all_audiences or self.all_resources):
            raise ValueError("name an audience or a resource")
        return self

    @property
    def all_audiences(self) -> tuple[str, ...]:
        return (self.audience,) if self.audience is not None else tuple(self.audiences)

    @property
    def all_resources(self) -> tuple[str, ...]:
        return (self.resource,) if self.resource is not None else tuple(self.resources)


class CaseFile(StrictModel):
    policies: str | None = Field(default=None, min_length=1)  # relative to the case file
    cases: list[Case] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> CaseFile:
        first: dict[str, int] = {}
        for index, case in enumerate(self.cases):
            if case.name in first:
                raise ValueError(
                    f"cases[{index}]: name {case.name!r} is also that of cases[{first[case.name]}]"
                )
            first[case.name] = index
        return self


@dataclass(frozen=True)
class Prepared:
    """A case with its token files read: what :func:`explain` takes."""

    case: Case
    subject: Claims | str
    actor: Claims | str | None


@dataclass(frozen=True)
class CaseSuite:
    path: Path
    policies: Path | None  # the file's `policies:`, resolved
    cases: list[Prepared]


def load_cases(path: Path) -> CaseSuite:
    """The cases of a case file, validated strictly (unknown keys refused), token files read."""
    try:
        data = read_yaml(path)
    except ConfigError as exc:
        raise CaseFileError(str(exc) if str(path) in str(exc) else f"{path}: {exc}") from None
    try:
        suite = CaseFile.model_validate(data)
    except ValidationError as exc:
        root = _nodes(path)
        raise CaseFileError(
            "\n".join(_described(error, data, path, root) for error in exc.errors())
        ) from None
    base = path.parent

    def read(index: int, case: Case, key: str, name: str) -> str:
        try:
            return (base / name).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            where = f"{path}: cases[{index}] ({case.name}): {key}"
            raise CaseFileError(f"{where}: cannot read {base / name}: {exc}") from None

    prepared = []
    for index, case in enumerate(suite.cases):
        subject: Claims | str
        if case.subject is not None:
            subject = case.subject
        else:
            subject = read(index, case, "subject_token_file", str(case.subject_token_file))
        actor: Claims | str | None = case.actor
        if case.actor_token_file is not None:
            actor = read(index, case, "actor_token_file", case.actor_token_file)
        prepared.append(Prepared(case, subject, actor))
    return CaseSuite(path, base / suite.policies if suite.policies else None, prepared)


def _nodes(path: Path) -> yaml.Node | None:
    try:  # only for line numbers: read_yaml has already parsed the file
        return yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None


def _line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """The line (1-based) of the deepest node of ``loc`` that the file has."""
    line = None if node is None else node.start_mark.line + 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            found = [(k, v) for k, v in node.value if k.value == part]
            if not found:
                break
            line, node = found[0][0].start_mark.line + 1, found[0][1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(node.value):
                break
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _described(error: Mapping[str, Any], data: Any, path: Path, root: yaml.Node | None) -> str:
    """One validation error as ``FILE:LINE: cases[I] (NAME): KEY.PATH: message``."""
    loc = tuple(error["loc"])
    message = "unknown key" if error["type"] == "extra_forbidden" else error["msg"]
    where, rest = [], loc
    if loc[:1] == ("cases",) and len(loc) > 1 and isinstance(loc[1], int):
        raw = data["cases"][loc[1]]  # pydantic validated a list to have this item
        name = raw.get("name") if isinstance(raw, dict) else None
        where.append(f"cases[{loc[1]}]" + (f" ({name})" if isinstance(name, str) else ""))
        rest = loc[2:]
    if rest:
        where.append(
            "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in rest).removeprefix(".")
        )
    line = _line_of(root, loc) if loc else None
    return ": ".join(
        [f"{path}:{line}" if line else str(path), *where, message.removeprefix("Value error, ")]
    )
