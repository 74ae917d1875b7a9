"""``sidecar demo`` (sidecar/walkthrough/) as a test of the topology it shows: a demo IdP, a
real ``sidecar serve``, a gateway using sidecar.client and two upstreams that record every
request they receive. The user's token never reaches an upstream through the gateway; each
upstream sees only its own credential; the demo prints no secret and leaves no process behind."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
from dataclasses import dataclass

import jwt
import pytest

from sidecar.walkthrough.narration import fingerprint, masked
from sidecar.walkthrough.story import DemoReport, run_demo
from sidecar.walkthrough.world import CODE_SEARCH, RecordedRequest
from tests.launcher import SIDECAR

STEP_LINES = (
    "[1] alice -> /code-search/search",
    "[2] alice -> /vendor/tickets",
    "[3] alice -> /code-search/reindex",
    "[4] mallory -> /vendor/tickets",
    "[5] passthrough attempt",
    "sidecar -> gateway      200 (mint)",
    "sidecar -> gateway      200 (static)",
    "sidecar -> gateway      400 invalid_scope",
    "sidecar -> gateway      400 invalid_target",
    "code-search             accepted (sub=alice@example.com, scope=code.read, act=gateway)",
    "vendor                  accepted",
    "code-search             refused 401 invalid_token",
)


@dataclass
class Demo:
    report: DemoReport
    output: str


@pytest.fixture(scope="module")
def demo() -> Demo:
    out = io.StringIO()
    report = run_demo(out)
    return Demo(report, out.getvalue())


def through_gateway(report: DemoReport) -> list[RecordedRequest]:
    return [r for records in report.received.values() for r in records if r.step != "passthrough"]


def authorization(record: RecordedRequest) -> str:
    values = [v for k, v in record.headers if k.lower() == "authorization"]
    assert len(values) == 1, record.headers
    return values[0]


def user_token_traces(report: DemoReport) -> list[str]:
    """Each user token, and its payload segment (base64url of the user's claims) alone."""
    return [piece for t in report.user_tokens.values() for piece in (t, t.split(".")[1])]


def test_users_sign_in_at_a_demo_idp_on_loopback_whose_jwks_the_sidecar_fetches(
    demo: Demo,
) -> None:
    [idp_line] = [line for line in demo.output.splitlines() if "demo IdP     " in line]
    assert re.search(
        r"demo IdP +http://127\.0\.0\.1:\d+: issuer https://idp\.demo\.local", idp_line
    )
    signed_in = re.findall(r"demo IdP -> user +POST /login (\w+): token (sha256:\w+)", demo.output)
    assert signed_in == [
        (user, fingerprint(token)) for user, token in demo.report.user_tokens.items()
    ]


def test_no_user_token_reaches_an_upstream_through_the_gateway(demo: Demo) -> None:
    records = through_gateway(demo.report)

    assert len(records) == 2  # alice's two allowed calls: one per upstream
    for record in records:
        for trace in user_token_traces(demo.report):
            assert trace not in record.path
            assert trace.encode() not in record.body
            assert all(trace not in f"{name}: {value}" for name, value in record.headers)


def test_code_search_receives_only_a_token_the_sidecar_minted_for_it(demo: Demo) -> None:
    (record,) = [r for r in demo.report.received["code-search"] if r.step == "code-search"]

    scheme, token = authorization(record).split(" ")
    assert scheme == "Bearer"
    assert jwt.get_unverified_header(token)["typ"] == "at+jwt"
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["iss"] == demo.report.sidecar_issuer
    assert claims["aud"] == CODE_SEARCH
    assert (claims["sub"], claims["scope"], claims["act"]) == (
        "alice@example.com",
        "code.read",
        {"sub": "gateway"},
    )
    assert demo.report.vendor_key not in record.text()
    assert demo.report.step("code-search").upstream_status == 200
    assert demo.report.step("code-search").exchange == "mint"


def test_vendor_receives_only_its_own_key(demo: Demo) -> None:
    (record,) = demo.report.received["vendor"]

    assert record.step == "vendor"
    assert authorization(record) == f"Bearer {demo.report.vendor_key}"
    assert "eyJ" not in record.text()  # no JWT of any kind (a JSON header starts so)
    assert demo.report.step("vendor").exchange == "static"
    assert demo.report.step("vendor").upstream_status == 200


@pytest.mark.parametrize(
    ("step", "error"), [("invalid-scope", "invalid_scope"), ("refused-by-policy", "invalid_target")]
)
def test_a_call_the_policy_refuses_reaches_no_upstream(demo: Demo, step: str, error: str) -> None:
    outcome = demo.report.step(step)

    assert outcome.exchange == error
    assert (outcome.upstream, outcome.upstream_status) == (None, None)
    assert not [r for records in demo.report.received.values() for r in records if r.step == step]


def test_the_passthrough_attempt_is_refused_by_the_verifier(demo: Demo) -> None:
    outcome = demo.report.step("passthrough")
    (record,) = [r for r in demo.report.received["code-search"] if r.step == "passthrough"]

    assert authorization(record) == f"Bearer {demo.report.user_tokens['alice']}"
    assert (outcome.upstream, outcome.upstream_status) == ("code-search", 401)
    assert outcome.reason.startswith("refused 401 invalid_token")
    assert outcome.exchange is None


def test_the_output_tells_each_step_and_shows_no_token_or_key(demo: Demo) -> None:
    for line in STEP_LINES:
        assert line in demo.output
    assert "sha256:" in demo.output
    assert f"vk_...{demo.report.vendor_key[-4:]}" in demo.output
    minted = authorization(demo.report.received["code-search"][0]).split(" ")[1]
    secrets = [
        *user_token_traces(demo.report),
        minted,
        minted.split(".")[1],
        demo.report.vendor_key,
        demo.report.client_secret,
    ]
    for secret in secrets:
        assert secret not in demo.output


def test_the_demo_stops_the_sidecar_it_started(demo: Demo) -> None:
    with pytest.raises(ProcessLookupError):
        os.killpg(demo.report.sidecar_pid, 0)


def test_sidecar_demo_command_runs_the_story_and_leaves_no_process() -> None:
    environment = {k: v for k, v in os.environ.items() if k != "SIDECAR_CONFIG"}
    process = subprocess.Popen(
        [*SIDECAR, "demo"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    assert process.returncode == 0, stderr
    for line in STEP_LINES:
        assert line in stdout
    assert "step 5: a user token: refused" in stdout
    pid = re.search(r"\(sidecar serve, pid (\d+)\)", stdout)
    assert pid is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(int(pid.group(1)), 0)
    with pytest.raises(ProcessLookupError):
        os.killpg(process.pid, 0)


def test_the_narration_shows_a_secret_only_as_a_fingerprint_or_a_masked_key() -> None:
    key = "vk_" + "s" * 28 + "a083"

    assert masked(key) == "vk_...a083"
    assert fingerprint(key).startswith("sha256:")
    assert key[3:-4] not in masked(key) + fingerprint(key)
