"""``sidecar policy test``: policy tests kept as files. A YAML file of cases (a client, the
subject's claims or token, the request, the decision expected) is run through
:func:`sidecar.cli.explain.explain`, the decision ``/token`` makes, against a proposed policy file
or the live table: a security engineer shows what a policy change does before it ships, and CI
refuses a change that breaks a case. The format is in docs/policies.md.

Exit status 0 when every case passed, 1 when one failed, 2 when the case or policy file is
invalid (nothing was run).
"""

from __future__ import annotations

import json
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import click
import yaml
from pydantic import Field, StrictInt, ValidationError, model_validator

from sidecar.cli import fail, services_of
from sidecar.cli.policy import policy
from sidecar.config import ConfigError, read_yaml
from sidecar.config.common import StrictModel
from sidecar.errors import ProtocolError
from sidecar.exchange.policy import PolicySet

if TYPE_CHECKING:
    from sidecar.services import Services

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


# --- running and comparing -----------------------------------------------------------------


@dataclass(frozen=True)
class Difference:
    field: str
    expected: Any
    got: Any
    message: str


@dataclass(frozen=True)
class Outcome:
    name: str
    result: dict[str, Any]
    differences: list[Difference]

    @property
    def passed(self) -> bool:
        return not self.differences


def _listed(values: Any) -> str:
    return "[" + ", ".join(str(v) for v in values) + "]"


def _summary(result: Mapping[str, Any]) -> str:
    if result["decision"] != "granted":
        return f"{result['error']}: {result['reason']}"
    return (
        f"policies {_listed(result['policies'])}, scopes {_listed(result['scope'])}, "
        f"lifetime {result['lifetime']}"
    )


def differences(expect: Expectation, result: Mapping[str, Any]) -> list[Difference]:
    """What the result has that the expectation does not: only the fields that differ."""
    got = result["decision"]
    if got != expect.decision:
        message = f"decision: expected {expect.decision}, got {got} ({_summary(result)})"
        return [Difference("decision", expect.decision, got, message)]
    found = []
    if got == "denied":
        error, reason, wanted_reason = result["error"], result["reason"], expect.reason
        reason_differs = wanted_reason is not None and wanted_reason not in reason
        if expect.error is not None and expect.error != error:
            message = f"error: expected {expect.error}, got {error}"
            message += "" if reason_differs else f" ({reason})"  # else the next line says it
            found.append(Difference("error", expect.error, error, message))
        if reason_differs:
            quoted = [json.dumps(text, ensure_ascii=False) for text in (wanted_reason, reason)]
            message = f"reason: expected to contain {quoted[0]}, got {quoted[1]}"
            found.append(Difference("reason", wanted_reason, reason, message))
        return found
    for name, (key, is_list) in OF_A_GRANT.items():
        wanted, actual = getattr(expect, name), result.get(key)
        if wanted is None:
            continue
        if is_list and sorted(set(wanted)) != sorted(set(actual or ())):
            message = f"{name}: expected {_listed(wanted)}, got {_listed(actual or ())}"
        elif not is_list and wanted != actual:
            message = f"{name}: expected {wanted}, got {'null' if actual is None else actual}"
        else:
            continue
        found.append(Difference(name, wanted, actual, message))
    return found


def run_cases(services: Services, suite: CaseSuite, policies: PolicySet, now: int) -> list[Outcome]:
    from sidecar.cli.explain import explain

    outcomes = []
    for prepared in suite.cases:
        case = prepared.case
        result = explain(
            services,
            client_id=case.client,
            audiences=case.all_audiences,
            resources=case.all_resources,
            scope=case.scope,
            subject=prepared.subject,
            actor=prepared.actor,
            now=now,
            policies=policies,
        )
        outcomes.append(Outcome(case.name, result, differences(case.expect, result)))
    return outcomes


# --- reports ---------------------------------------------------------------------------------


def json_report(outcomes: list[Outcome], suite: CaseSuite, source: Path | None) -> dict[str, Any]:
    return {
        "file": str(suite.path),
        "policies": None if source is None else str(source),  # None: the live table
        "passed": sum(o.passed for o in outcomes),
        "failed": sum(not o.passed for o in outcomes),
        "cases": [
            {
                "name": o.name,
                "passed": o.passed,
                "differences": [vars(d) for d in o.differences],
                "result": o.result,
            }
            for o in outcomes
        ],
    }


def junit_report(outcomes: list[Outcome], suite: CaseSuite, seconds: float) -> ET.ElementTree:
    """JUnit XML, as CI systems read it: one <testsuite>, a <testcase> per case, a <failure>
    whose message is the diff."""
    failed = sum(not o.passed for o in outcomes)
    root = ET.Element(
        "testsuite",
        name=f"sidecar policy test {suite.path}",
        tests=str(len(outcomes)),
        failures=str(failed),
        errors="0",
        skipped="0",
        time=f"{seconds:.3f}",
    )
    for outcome in outcomes:
        case = ET.SubElement(root, "testcase", name=outcome.name, classname=suite.path.stem)
        if not outcome.passed:
            lines = [d.message for d in outcome.differences]
            failure = ET.SubElement(
                case, "failure", message="; ".join(lines), type="PolicyTestFailure"
            )
            failure.text = "\n".join(lines)
    ET.indent(root)
    return ET.ElementTree(root)


@policy.command("test")
@click.argument("cases_file", metavar="CASES", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--policies",
    "policies_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A policy (or config) file to test, instead of the case file's `policies:`.",
)
@click.option(
    "--live", is_flag=True, help="Test the live policy table, even if CASES names a policy file."
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report.")
@click.option(
    "--junit",
    "junit_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write a JUnit XML report to this file.",
)
@click.pass_context
def policy_test(
    ctx: click.Context,
    cases_file: Path,
    policies_file: Path | None,
    live: bool,
    as_json: bool,
    junit_file: Path | None,
) -> None:
    """Run the test cases of CASES (YAML) through the decision /token makes, against a policy
    file (--policies, or the case file's `policies:`) or else the live policy table.

    Exit status: 0 when every case passed, 1 when one failed, 2 when CASES or the policy file is
    invalid.
    """
    from sidecar.cli.explain import policies_from_file

    if live and policies_file is not None:
        fail("give --policies FILE or --live, not both", 2)
    try:
        suite = load_cases(cases_file)
    except CaseFileError as exc:
        fail("invalid test cases: " + "; ".join(str(exc).splitlines()), 2)
    source = None if live else policies_file or suite.policies
    # A policy file needs no database: a proposed change is tested before it is applied.
    services = services_of(ctx, needs_schema=source is None)
    try:
        if source is None:
            policies = services.policies.get()
        else:
            policies = policies_from_file(source, services.settings)
    except ConfigError as exc:
        fail("invalid policies: " + "; ".join(str(exc).splitlines()), 2)
    except ProtocolError as exc:  # the table could not be read (fail closed: no verdict)
        fail(f"cannot read the policy table: {exc.reason}")
    started = time.monotonic()
    outcomes = run_cases(services, suite, policies, int(time.time()))
    if junit_file is not None:
        try:
            junit_report(outcomes, suite, time.monotonic() - started).write(
                junit_file, encoding="utf-8", xml_declaration=True
            )
        except OSError as exc:
            fail(f"cannot write {junit_file}: {exc.strerror}", 2)
    if as_json:
        click.echo(json.dumps(json_report(outcomes, suite, source), indent=2))
    else:
        for outcome in outcomes:
            click.echo(f"{'PASS' if outcome.passed else 'FAIL'} {outcome.name}")
            for difference in outcome.differences:
                click.echo(f"    {difference.message}")
        failed = sum(not o.passed for o in outcomes)
        label = "the live policy table" if source is None else str(source)
        click.echo(
            f"{len(outcomes) - failed} passed, {failed} failed, {len(outcomes)} case(s) "
            f"against {label}"
        )
    sys.exit(1 if any(not o.passed for o in outcomes) else 0)
