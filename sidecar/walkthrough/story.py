"""The demo's script: the calls through the gateway (and one past it), what each hop said,
and what each upstream received, reported and printed."""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TextIO

import jwt

from sidecar.client import TokenExchangeClient
from sidecar.demo import demo_token, init_demo_idp

from .apps import (
    ExplainingVerifier,
    Recorder,
    code_search_app,
    gateway_app,
    idp_app,
    vendor_app,
)
from .narration import StepOutcome, Story, fingerprint, masked
from .world import (
    CODE_SEARCH,
    GATEWAY,
    IDP_ISSUER,
    USERS,
    DemoFailed,
    RecordedRequest,
    direct,
    serve_app,
    sidecar_config,
    sidecar_serving,
)

# The calls through the gateway: (step name, user, route, what the step shows).
SCRIPT = (
    ("code-search", "alice", "/code-search/search", "the sidecar mints a token for code-search"),
    ("vendor", "alice", "/vendor/tickets", "the sidecar hands out the vendor's own API key"),
    ("invalid-scope", "alice", "/code-search/reindex", "needs code.admin, which no policy allows"),
    ("refused-by-policy", "mallory", "/vendor/tickets", "the vendor policy wants verified emails"),
)


@dataclass
class DemoReport:
    sidecar_issuer: str
    sidecar_pid: int
    steps: list[StepOutcome]
    received: dict[str, list[RecordedRequest]]  # upstream -> every request it received
    user_tokens: dict[str, str] = field(repr=False)  # user -> the token the demo IdP signed
    vendor_key: str = field(repr=False)
    client_secret: str = field(repr=False)
    kept: Path | None = None  # the temporary directory, when kept

    def step(self, name: str) -> StepOutcome:
        return next(s for s in self.steps if s.name == name)


def run_demo(out: TextIO = sys.stdout, *, keep: bool = False) -> DemoReport:
    """Run the story, printing it to ``out``; everything started is stopped before returning.
    ``keep`` keeps the temporary directory (configuration, database, ``sidecar.log``)."""
    directory = Path(tempfile.mkdtemp(prefix="sidecar-demo-"))
    try:
        with contextlib.ExitStack() as stack:
            report = _run(Story(out), directory, stack)
    finally:
        if not keep:
            shutil.rmtree(directory, ignore_errors=True)
    if keep:
        report.kept = directory
        print(f"\nkept {directory}: config, database, sidecar.log (audit trail)", file=out)
    return report


def _run(story: Story, directory: Path, stack: contextlib.ExitStack) -> DemoReport:
    idp_key, idp_jwks = directory / "idp.key.pem", directory / "idp.jwks.json"
    init_demo_idp(idp_key, idp_jwks)  # a fresh key pair, published by the demo IdP

    def sign(user: str) -> str | None:
        if user not in USERS:
            return None
        scope, verified = USERS[user]
        return demo_token(
            idp_key,
            issuer=IDP_ISSUER,
            audience=GATEWAY,
            subject=f"{user}@example.com",
            scope=scope,
            ttl=600,
            extra={"email_verified": verified},
        )

    idp = serve_app(stack, idp_app(story, idp_jwks.read_bytes(), sign))
    vendor_key, client_secret = "vk_" + secrets.token_hex(16), secrets.token_urlsafe(32)
    with socket.socket() as probe:  # a free port, so that the issuer URL is known beforehand
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    issuer = f"http://127.0.0.1:{port}"
    config_file = directory / "sidecar.yaml"
    idp_jwks_uri = f"{idp}/.well-known/jwks.json"
    config_file.write_text(json.dumps(sidecar_config(directory, issuer, idp_jwks_uri), indent=1))
    env = {"VENDOR_API_KEY": vendor_key, "GATEWAY_CLIENT_SECRET": client_secret}
    story.say("Starting sidecar serve ...")
    pid = stack.enter_context(sidecar_serving(config_file, port, env))

    received: dict[str, list[RecordedRequest]] = {"code-search": [], "vendor": []}
    # A session for each caller (sessions are not shared between threads).
    jwks_http, token_http, gateway_http, user_http = (
        stack.enter_context(direct()) for _ in range(4)
    )
    verifier = ExplainingVerifier(issuer=issuer, audience=CODE_SEARCH, session=jwks_http)
    apps = {
        "code-search": code_search_app(story, verifier),
        "vendor": vendor_app(story, vendor_key),
    }
    urls = {
        name: serve_app(stack, Recorder(app, received[name], story)) for name, app in apps.items()
    }
    exchanger = TokenExchangeClient(
        f"{issuer}/token", "gateway", client_secret, timeout=10, session=token_http
    )
    stack.callback(exchanger.close)
    gateway = serve_app(stack, gateway_app(story, exchanger, gateway_http, urls))
    for line in (
        "\nOne credential per hop; the user's token never leaves the gateway. On loopback:",
        f"  demo IdP     {idp}: issuer {IDP_ISSUER}, signs user tokens for the gateway",
        f"  sidecar      {issuer} (sidecar serve, pid {pid}): trusts the demo IdP",
        f"  gateway      {gateway}: the sidecar's client 'gateway'",
        f"  code-search  {urls['code-search']}: accepts tokens minted for {CODE_SEARCH}",
        f"  vendor       {urls['vendor']}: accepts only its static API key {masked(vendor_key)}",
        *(
            f"  {u:<12} scope '{s}', email {'' if v else 'not '}verified"
            for u, (s, v) in USERS.items()
        ),
    ):
        story.say(line)

    tokens: dict[str, str] = {}
    for name, user, route, shows in SCRIPT:
        story.begin(name, f"{user} -> {route}: {shows}")
        if user not in tokens:  # the user signs in once, at the demo IdP
            login = user_http.post(f"{idp}/login", data={"username": user}, timeout=10)
            login.raise_for_status()
            tokens[user] = login.json()["access_token"]
        bearer = {"Authorization": f"Bearer {tokens[user]}"}
        answer = user_http.get(gateway + route, headers=bearer, timeout=30)
        story.say(f"{answer.status_code} {answer.text.strip()[:60]}", "gateway -> user")

    story.begin("passthrough", "passthrough attempt: a careless gateway forwards alice's token")
    story.step.upstream, alice = "code-search", tokens["alice"]
    story.say(f"GET /search with alice's own token {fingerprint(alice)}", "gateway -> code-search")
    bearer = {"Authorization": f"Bearer {alice}"}
    answer = user_http.get(f"{urls['code-search']}/search", headers=bearer, timeout=30)
    story.step.upstream_status = answer.status_code
    story.more("why: the demo IdP signed it, for the gateway's audience; code-search takes only")
    story.more("tokens the sidecar signs for code-search (were it accepted, any upstream holding")
    story.more("it could replay it against every service that trusts the gateway's audience)")

    report = DemoReport(issuer, pid, story.steps[1:], received, tokens, vendor_key, client_secret)
    story.say("\nWhat each upstream received (all it was sent, as its recorder saw it):")
    numbers = {step.name: (number, step) for number, step in enumerate(story.steps)}
    for name, records in received.items():
        for record in records:
            number, step = numbers[record.step]
            verdict = step.reason.split(" ")[0]
            story.say(f"step {number}: {_presented(record, report)}: {verdict}", name)
    return report


def _presented(record: RecordedRequest, report: DemoReport) -> str:
    """What a recorded request presented, found in the request itself."""
    if any(token in record.text() for token in report.user_tokens.values()):
        return "a user token"
    authorization = {k.lower(): v for k, v in record.headers}.get("authorization", "")
    if authorization == f"Bearer {report.vendor_key}":
        return "the vendor's API key"
    try:
        claims = jwt.decode(authorization[7:], options={"verify_signature": False})
    except jwt.PyJWTError:
        return "no credential it knows"
    return f"a token from {claims.get('iss')} for {claims.get('aud')}"


def stop_on_sigterm() -> None:
    """Make SIGTERM unwind like Ctrl-C, so that the demo's sidecar is stopped too."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def main() -> int:
    stop_on_sigterm()
    try:
        run_demo()
    except DemoFailed as exc:
        print(f"sidecar demo: {exc}", file=sys.stderr)
        return 1
    return 0
