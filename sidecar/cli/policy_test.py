"""``sidecar policy test``: policy tests kept as files. A YAML file of cases (a client, the
subject's claims or token, the request, the decision expected) is run through
:func:`sidecar.cli.explain.explain`, the decision ``/token`` makes, against a proposed policy file
or the live table: a security engineer shows what a policy change does before it ships, and CI
refuses a change that breaks a case. The format is in docs/policies.md, its models and loading
in :mod:`sidecar.cli.policy_cases`; the runner, its reports and the command are here.

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
from typing import TYPE_CHECKING, Any

import click

from sidecar.cli import fail, services_of
from sidecar.cli.policy import policy
from sidecar.cli.policy_cases import (
    OF_A_GRANT,
    CaseFileError,
    CaseSuite,
    Expectation,
    load_cases,
)
from sidecar.config import ConfigError
from sidecar.errors import ProtocolError
from sidecar.exchange.policy import PolicySet

if TYPE_CHECKING:
    from sidecar.services import Services


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
    invalid or the live table cannot be read.
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
    # 1 is a failed case: a table that cannot be read is not one.
    services = services_of(ctx, needs_schema=source is None, unready_exit=2)
    try:
        if source is None:
            policies = services.policies.get()
        else:
            policies = policies_from_file(source, services.settings)
    except ConfigError as exc:
        fail("invalid policies: " + "; ".join(str(exc).splitlines()), 2)
    except ProtocolError as exc:  # the table could not be read (fail closed: no verdict)
        fail(f"cannot read the policy table: {exc.reason}", 2)
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
