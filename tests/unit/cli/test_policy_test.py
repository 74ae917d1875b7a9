"""``sidecar policy test`` (sidecar/cli/policy_test.py), in-process through click: case files
that pass and fail, against a proposed policy file and against the live table; the diff printed,
the strict validation of the case file, the ``--json`` and JUnit reports; and the shipped example
(deploy/policies.example.test.yaml) passing under deploy/demo.yaml.
tests/functional/test_policy_test_cli.py runs the installed command for its exit codes."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.cli.policy_cases import Expectation
from sidecar.cli.policy_test import differences
from tests.conftest import CODE_SEARCH, TICKETS, TestIdP, write_config
from tests.unit.support import cli, one_line_error

REPO_ROOT = Path(__file__).resolve().parents[3]
ENGINEER = {"iss": TestIdP.issuer, "sub": "alice", "groups": ["eng"], "email": "a@example.com"}
SALES = {"iss": TestIdP.issuer, "sub": "bob", "groups": ["sales"]}
# The proposed policies: code search for engineers only, for 90 s; tickets for anyone.
PROPOSED = [
    {
        "name": "code-search",
        "client_id": "gateway",
        "audience": CODE_SEARCH,
        "issuer": TestIdP.issuer,
        "subject": {"groups": {"contains": "eng"}},
        "scopes": ["code.read", "code.search"],
        "default_scopes": ["code.read"],
        "copy_claims": ["email"],
        "ttl": 90,
    },
    {
        "name": "tickets",
        "client_id": "gateway",
        "audience": TICKETS,
        "scopes": ["tickets.read"],
        "default_scopes": ["tickets.read"],
        "ttl": 60,
    },
]


def case(name: str, subject: dict[str, Any], expect: dict[str, Any], **fields: Any) -> Any:
    return {
        "name": name,
        "client": "gateway",
        "subject": subject,
        "audience": CODE_SEARCH,
        **fields,
        "expect": expect,
    }


ENGINEER_SEARCHES = case(
    "engineers may search code",
    ENGINEER,
    {
        "decision": "granted",
        "scopes": ["code.search", "code.read"],  # a set: the order does not matter
        "lifetime": 90,
        "policies": ["code-search"],
        "audiences": [CODE_SEARCH],
        "copied_claims": ["email"],
        "credential": "mint",
    },
    scope="code.read code.search",
)
SALES_MAY_NOT = case(
    "sales may not",
    SALES,
    {"decision": "denied", "error": "invalid_target", "reason": "groups contains 'eng'"},
)


@pytest.fixture
def proposed(tmp_path: Path) -> Path:
    return write_config(tmp_path / "policies.yaml", {"policies": PROPOSED})


def write_cases(path: Path, cases: list[Any], **top: Any) -> Path:
    """The cases as a case file (a claims dict used twice is written once, with an alias)."""
    path.write_text(yaml.safe_dump({**top, "cases": cases}, sort_keys=False))
    return path


@pytest.fixture
def passing(tmp_path: Path, proposed: Path) -> Path:
    """Cases that pass against ``proposed``, which the file names (relative to itself)."""
    tickets = case("anyone reads tickets", SALES, {"decision": "granted", "lifetime": 60},
                   audience=TICKETS)  # fmt: skip
    return write_cases(
        tmp_path / "cases.yaml", [ENGINEER_SEARCHES, SALES_MAY_NOT, tickets], policies=proposed.name
    )


@pytest.fixture
def failing(tmp_path: Path, proposed: Path) -> Path:
    """One case passing, two failing against ``proposed``."""
    wrong_lifetime = case(
        "engineers get two minutes",
        ENGINEER,
        {"decision": "granted", "lifetime": 120, "scopes": ["code.read"], "copied_claims": []},
    )
    sales_granted = case("sales may search", SALES, {"decision": "granted"})
    return write_cases(
        tmp_path / "failing.yaml",
        [ENGINEER_SEARCHES, wrong_lifetime, sales_granted],
        policies=str(proposed),
    )


# --- passing and failing --------------------------------------------------------------------


def test_passing_cases_against_a_policy_file_exit_0(config_file: Path, passing: Path) -> None:
    result = cli(config_file, "policy", "test", str(passing))

    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "PASS engineers may search code",
        "PASS sales may not",
        "PASS anyone reads tickets",
        f"3 passed, 0 failed, 3 case(s) against {passing.parent / 'policies.yaml'}",
    ]


def test_a_policy_file_needs_no_database(
    config_file: Path, config: dict[str, Any], passing: Path
) -> None:
    result = cli(config_file, "policy", "test", str(passing))

    assert result.exit_code == 0, result.output
    assert not Path(config["database_url"].removeprefix("sqlite:///")).exists()


def test_failing_cases_exit_1_with_only_the_fields_that_differ(
    config_file: Path, failing: Path, proposed: Path
) -> None:
    result = cli(config_file, "policy", "test", str(failing))

    assert result.exit_code == 1, result.output
    assert result.stdout.splitlines() == [
        "PASS engineers may search code",
        "FAIL engineers get two minutes",
        "    lifetime: expected 120, got 90",
        "    copied_claims: expected [], got [email]",
        "FAIL sales may search",
        "    decision: expected granted, got denied (invalid_target: policy code-search: "
        "condition failed: groups contains 'eng')",
        f"1 passed, 2 failed, 3 case(s) against {proposed}",
    ]


def test_policies_option_overrides_the_case_files_policies(
    config_file: Path, passing: Path, tmp_path: Path
) -> None:
    longer = [{**PROPOSED[0], "ttl": 100}, PROPOSED[1]]
    other = write_config(tmp_path / "other.yaml", {"policies": longer})

    result = cli(config_file, "policy", "test", str(passing), "--policies", str(other))

    assert result.exit_code == 1
    assert "    lifetime: expected 90, got 100" in result.stdout.splitlines()
    assert result.stdout.endswith(f"against {other}\n")


def test_a_whole_config_file_serves_as_the_policy_file(config_file: Path, tmp_path: Path) -> None:
    # Its policies: code search for anyone, two minutes.
    cases = write_cases(
        tmp_path / "c.yaml", [case("anyone", SALES, {"decision": "granted", "lifetime": 120})]
    )

    result = cli(config_file, "policy", "test", str(cases), "--policies", str(config_file))

    assert result.exit_code == 0, result.output


def test_denied_cases_compare_error_and_reason(config_file: Path, tmp_path: Path) -> None:
    cases = write_cases(
        tmp_path / "c.yaml",
        [
            case(
                "wrong error and reason",
                SALES,
                {"decision": "denied", "error": "invalid_scope", "reason": "scope not in"},
            ),
            case("wrong error", SALES, {"decision": "denied", "error": "invalid_client"}),
        ],
    )
    proposed = write_config(tmp_path / "p.yaml", {"policies": PROPOSED})

    result = cli(config_file, "policy", "test", str(cases), "--policies", str(proposed))

    assert result.exit_code == 1
    reason = "policy code-search: condition failed: groups contains 'eng'"
    assert result.stdout.splitlines()[:5] == [
        "FAIL wrong error and reason",
        "    error: expected invalid_scope, got invalid_target",
        f'    reason: expected to contain "scope not in", got "{reason}"',
        "FAIL wrong error",
        f"    error: expected invalid_client, got invalid_target ({reason})",
    ]


def test_a_granted_case_expected_denied_shows_what_was_granted() -> None:
    result = {"decision": "granted", "policies": ["p"], "scope": ["a", "b"], "lifetime": 60}

    [difference] = differences(Expectation(decision="denied"), result)

    assert difference.message == (
        "decision: expected denied, got granted (policies [p], scopes [a, b], lifetime 60)"
    )


# --- the live table -------------------------------------------------------------------------


def test_cases_run_against_the_live_table_without_a_policy_file(
    started: Path, tmp_path: Path
) -> None:
    # The table as bootstrapped from the config: code search for anyone, default scope only.
    cases = write_cases(
        tmp_path / "live.yaml",
        [
            case("anyone searches", SALES, {"decision": "granted", "scopes": ["code.read"],
                 "policies": [f"gateway -> {CODE_SEARCH}"], "lifetime": 120}),
            case("no policy for payroll", SALES,
                 {"decision": "denied", "error": "invalid_target", "reason": "no policy"},
                 audience="https://payroll.internal/mcp"),
        ],
    )  # fmt: skip

    result = cli(started, "policy", "test", str(cases))

    assert result.exit_code == 0, result.output
    assert result.stdout.endswith("2 passed, 0 failed, 2 case(s) against the live policy table\n")


def test_live_tests_the_table_even_when_the_case_file_names_a_policy_file(
    started: Path, passing: Path
) -> None:
    result = cli(started, "policy", "test", str(passing), "--live")

    # The table lets sales search code, for 120 s, and copies no claim of theirs.
    assert result.exit_code == 1
    assert "FAIL sales may not" in result.stdout.splitlines()
    assert result.stdout.endswith("against the live policy table\n")


def test_the_live_table_needs_a_current_schema(config_file: Path, tmp_path: Path) -> None:
    cases = write_cases(tmp_path / "c.yaml", [SALES_MAY_NOT])

    result = cli(config_file, "policy", "test", str(cases))

    assert result.exit_code == 2  # not 1: no case ran, so none failed
    assert "sidecar db upgrade" in one_line_error(result)


def test_policies_and_live_together_are_refused(
    config_file: Path, passing: Path, proposed: Path
) -> None:
    result = cli(config_file, "policy", "test", str(passing), "--live", "--policies", str(proposed))

    assert result.exit_code == 2
    assert one_line_error(result) == "sidecar: error: give --policies FILE or --live, not both"


# --- subject and actor tokens ---------------------------------------------------------------


def test_a_subject_token_file_is_verified_as_the_token_endpoint_verifies_it(
    config_file: Path, tmp_path: Path, proposed: Path, idp: TestIdP
) -> None:
    (tmp_path / "alice.jwt").write_text(idp.token(groups=["eng"]) + "\n")
    (tmp_path / "expired.jwt").write_text(idp.token(groups=["eng"], exp=1_000_000_000))
    cases = write_cases(
        tmp_path / "c.yaml",
        [
            {"name": "signed", "client": "gateway", "subject_token_file": "alice.jwt",
             "resource": CODE_SEARCH, "expect": {"decision": "granted", "scopes": ["code.read"]}},
            {"name": "expired", "client": "gateway", "subject_token_file": "expired.jwt",
             "resources": [CODE_SEARCH],
             "expect": {"decision": "denied", "error": "invalid_request"}},
        ],
        policies=proposed.name,
    )  # fmt: skip

    result = cli(config_file, "policy", "test", str(cases))

    assert result.exit_code == 0, result.output


def test_actor_claims_are_checked_against_may_act(
    config_file: Path, tmp_path: Path, proposed: Path, idp: TestIdP
) -> None:
    subject = {**ENGINEER, "may_act": {"sub": "svc-gateway"}}
    actor = {"iss": TestIdP.issuer, "sub": "svc-gateway"}
    (tmp_path / "actor.jwt").write_text(idp.token(sub="svc-gateway"))
    denied = {"decision": "denied", "error": "invalid_request", "reason": "not allowed by may_act"}
    cases = write_cases(
        tmp_path / "c.yaml",
        [
            case("the named actor", subject, {"decision": "granted"}, actor=actor),
            case("the named actor's token", subject, {"decision": "granted"},
                 actor_token_file="actor.jwt"),
            case("another actor", subject, denied, actor={**actor, "sub": "svc-other"}),
        ],
        policies=proposed.name,
    )  # fmt: skip

    result = cli(config_file, "policy", "test", str(cases))

    assert result.exit_code == 0, result.output


# --- invalid files --------------------------------------------------------------------------

VALID = {"name": "ok", "client": "gateway", "subject": SALES, "audience": CODE_SEARCH,
         "expect": {"decision": "denied"}}  # fmt: skip


@pytest.mark.parametrize(
    ("second", "named"),
    [
        ({**VALID, "name": "typo", "scopes": ["a"]},
         "c.yaml:17: cases[1] (typo): scopes: unknown key"),
        ({**VALID, "name": "bad", "expect": {"decision": "refused"}},
         "c.yaml:17: cases[1] (bad): expect.decision: Input should be 'granted' or 'denied'"),
        ({**VALID, "name": "x", "expect": {"decision": "denied", "lifetime": 60}},
         "cases[1] (x): expect: lifetime: describe a grant, but decision is denied"),
        ({**VALID, "name": "x", "expect": {"decision": "granted", "error": "invalid_target"}},
         "cases[1] (x): expect: error and reason describe a denial, but decision is granted"),
        ({**VALID, "name": "x", "expect": {"decision": "denied", "error": "access_denied"}},
         "cases[1] (x): expect.error: Input should be 'invalid_request', "),
        ({**VALID, "name": "x", "expect": {"decision": "granted", "lifetime": "60"}},
         "cases[1] (x): expect.lifetime: Input should be a valid integer"),
        ({**VALID, "name": "x", "subject_token_file": "t.jwt"},
         "cases[1] (x): give subject (its claims) or subject_token_file: exactly one"),
        ({**VALID, "name": "x", "subject": {"sub": "bob"}},
         "cases[1] (x): subject: needs the string claims iss and sub"),
        ({**VALID, "name": "x", "audience": None},
         "cases[1] (x): name an audience or a resource"),
        ({**VALID, "name": "x", "audiences": [TICKETS]},
         "cases[1] (x): give audience or audiences, not both"),
        ({key: value for key, value in VALID.items() if key != "client"},
         "c.yaml:12: cases[1] (ok): client: Field required"),  # the case's line
        (VALID, "cases[1]: name 'ok' is also that of cases[0]"),
        ({**VALID, "name": "x", "subject": None, "subject_token_file": "missing.jwt"},
         "cases[1] (x): subject_token_file: cannot read "),
    ],
    ids=["unknown-key", "bad-decision", "grant-field-of-a-denial", "denial-field-of-a-grant",
         "unknown-error", "lifetime-a-string", "two-subjects", "no-iss", "no-target",
         "audience-and-audiences", "no-client", "name-twice", "unreadable-token-file"],
)  # fmt: skip
def test_an_invalid_case_file_exits_2_naming_the_case_and_key(
    config_file: Path, tmp_path: Path, second: dict[str, Any], named: str
) -> None:
    cases = write_cases(tmp_path / "c.yaml", [VALID, second])

    result = cli(config_file, "policy", "test", str(cases))

    assert result.exit_code == 2, result.output
    line = one_line_error(result)
    assert line.startswith(f"sidecar: error: invalid test cases: {cases}")
    assert named in line


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("cases: [\n", "is not valid YAML"),
        ("cases: []\n", "cases: List should have at least 1 item"),
        ("- a list\n", "the top level must be a mapping"),
        ("cases:\n  - name: a\n    name: b\n", "duplicate key 'name' (line 3)"),
        ("policies: p.yaml\ncases: []\ntests: []\n", "c.yaml:3: tests: unknown key"),
    ],
    ids=["yaml", "no-cases", "a-list", "duplicate-key", "unknown-top-level-key"],
)
def test_an_unreadable_case_file_exits_2(
    config_file: Path, tmp_path: Path, text: str, named: str
) -> None:
    (tmp_path / "c.yaml").write_text(text)

    result = cli(config_file, "policy", "test", str(tmp_path / "c.yaml"))

    assert result.exit_code == 2, result.output
    assert named in one_line_error(result)


def test_a_missing_case_file_exits_2(config_file: Path, tmp_path: Path) -> None:
    result = cli(config_file, "policy", "test", str(tmp_path / "none.yaml"))

    assert result.exit_code == 2
    assert "cannot read" in one_line_error(result)


def test_an_invalid_policy_file_exits_2_before_any_case_runs(
    config_file: Path, passing: Path, tmp_path: Path
) -> None:
    unknown_client = [{**PROPOSED[0], "client_id": "stranger"}]
    bad = write_config(tmp_path / "bad.yaml", {"policies": unknown_client})

    result = cli(config_file, "policy", "test", str(passing), "--policies", str(bad))

    assert result.exit_code == 2
    line = one_line_error(result)
    assert line.startswith("sidecar: error: invalid policies: ")
    assert "stranger" in line


# --- reports --------------------------------------------------------------------------------


def test_json_reports_every_case_with_its_differences_and_result(
    config_file: Path, failing: Path, proposed: Path
) -> None:
    result = cli(config_file, "policy", "test", str(failing), "--json")

    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert {k: report[k] for k in ("file", "policies", "passed", "failed")} == {
        "file": str(failing),
        "policies": str(proposed),
        "passed": 1,
        "failed": 2,
    }
    first, second, third = report["cases"]
    assert (first["name"], first["passed"], first["differences"]) == (
        "engineers may search code", True, [],
    )  # fmt: skip
    assert first["result"]["lifetime"] == 90
    assert second["differences"][0] == {
        "field": "lifetime",
        "expected": 120,
        "got": 90,
        "message": "lifetime: expected 120, got 90",
    }
    assert [d["field"] for d in third["differences"]] == ["decision"]
    assert third["result"]["error"] == "invalid_target"


def test_json_of_the_live_table_has_null_policies(started: Path, tmp_path: Path) -> None:
    cases = write_cases(tmp_path / "c.yaml", [case("x", SALES, {"decision": "granted"})])

    result = cli(started, "policy", "test", str(cases), "--json")

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["policies"] is None


def test_junit_xml_has_a_testcase_per_case_and_the_diff_as_failure(
    config_file: Path, failing: Path, tmp_path: Path
) -> None:
    report = tmp_path / "report.xml"

    result = cli(config_file, "policy", "test", str(failing), "--junit", str(report))

    assert result.exit_code == 1
    assert result.stdout.startswith("PASS ")  # the text report is still printed
    suite = ET.parse(report).getroot()
    assert suite.tag == "testsuite"
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("3", "2", "0")
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == [
        "engineers may search code", "engineers get two minutes", "sales may search",
    ]  # fmt: skip
    assert cases[0].find("failure") is None
    failure = cases[1].find("failure")
    assert failure is not None
    assert failure.get("message") == (
        "lifetime: expected 120, got 90; copied_claims: expected [], got [email]"
    )
    assert failure.text == "lifetime: expected 120, got 90\ncopied_claims: expected [], got [email]"


# --- the shipped example --------------------------------------------------------------------


def test_the_example_policies_pass_their_tests_under_the_demo_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Run elsewhere: the demo's relative sqlite:///var/demo.db is never opened, but its
    # directory would be made in the working directory.
    monkeypatch.chdir(tmp_path)
    example = REPO_ROOT / "deploy" / "policies.example.test.yaml"

    result = cli(REPO_ROOT / "deploy" / "demo.yaml", "policy", "test", str(example), "--json")

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["policies"] == str(REPO_ROOT / "deploy" / "policies.example.yaml")
    assert report["failed"] == 0
    assert report["passed"] == len(yaml.safe_load(example.read_text())["cases"]) >= 10


def test_the_example_tests_catch_a_change_to_the_example_policies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    text = (REPO_ROOT / "deploy" / "policies.example.yaml").read_text()
    changed = tmp_path / "changed.yaml"
    changed.write_text(
        text.replace("require_subject_scopes: true", "require_subject_scopes: false")
    )
    example = REPO_ROOT / "deploy" / "policies.example.test.yaml"

    result = cli(
        REPO_ROOT / "deploy" / "demo.yaml", "policy", "test", str(example), "--policies",
        str(changed),
    )  # fmt: skip

    assert result.exit_code == 1
    assert (
        "FAIL a scope the user's own token lacks is refused (require_subject_scopes)"
        in result.stdout.splitlines()
    )
