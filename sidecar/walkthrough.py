"""``sidecar demo`` (``make demo``): the whole idea of this project in one command, on loopback.

In this process: a demo identity provider (:mod:`sidecar.demo`) signing user tokens, a gateway
using :mod:`sidecar.client`, and two upstreams: *code-search*, which verifies the sidecar's
tokens with :mod:`sidecar.verify`, and *vendor*, which knows only its own static API key. In a
child process: ``sidecar serve``, configured for them in a temporary directory. A short script
of user calls goes through the gateway, and each hop says what it was presented and why it
accepted or refused.

The point (docs/design.md §1): the gateway never forwards the user's token (*token
passthrough*); each upstream gets a credential for itself only. Both upstreams record every
request they receive, so :func:`run_demo`'s report lets a test check exactly that. Nothing
printed is a whole token or key: SHA-256 fingerprints and masked forms only.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

import jwt
import requests
from flask import Flask, Response, g, jsonify, request
from werkzeug.serving import WSGIRequestHandler, make_server
from werkzeug.wrappers import Request

from sidecar.client import ExchangeError, TokenExchangeClient
from sidecar.demo import demo_token, init_demo_idp
from sidecar.verify import TokenVerifier, VerificationError, VerifiedToken, bearer_token

IDP_ISSUER = "https://idp.demo.local"
GATEWAY = "https://gateway.demo.local"  # the audience of user tokens: the gateway's own name
CODE_SEARCH = "https://code-search.internal/mcp"
VENDOR = "https://api.vendor.example/tickets"
API_KEY_TYPE = "urn:token-exchange-sidecar:token-type:api-key"
USERS = {  # user -> (scope, email_verified) of the token the demo IdP signs
    "alice": ("code.read tickets.read", True),
    "mallory": ("code.read", False),
}
# The gateway's routes: path -> (upstream, audience, the scope the call needs, upstream path).
ROUTES = {
    "/code-search/search": ("code-search", CODE_SEARCH, "code.read", "/search"),
    "/code-search/reindex": ("code-search", CODE_SEARCH, "code.admin", "/reindex"),
    "/vendor/tickets": ("vendor", VENDOR, "tickets.read", "/tickets"),
}
# The calls through the gateway: (step name, user, route, what the step shows).
SCRIPT = (
    ("code-search", "alice", "/code-search/search", "the sidecar mints a token for code-search"),
    ("vendor", "alice", "/vendor/tickets", "the sidecar hands out the vendor's own API key"),
    ("invalid-scope", "alice", "/code-search/reindex", "needs code.admin, which no policy allows"),
    ("refused-by-policy", "mallory", "/vendor/tickets", "the vendor policy wants verified emails"),
)
READY_TIMEOUT = 45.0


class DemoFailed(Exception):
    """The demo could not run (the sidecar did not start); the message says why."""


@dataclass(frozen=True)
class RecordedRequest:
    """One request exactly as an upstream received it, before the upstream looked at it."""

    step: str
    method: str
    path: str  # with the query string
    headers: list[tuple[str, str]]
    body: bytes

    def text(self) -> str:
        """Everything the request carried, for searching."""
        lines = [self.method, self.path, *(f"{k}: {v}" for k, v in self.headers)]
        return "\n".join([*lines, self.body.decode("latin-1")])


@dataclass
class StepOutcome:
    name: str  # a SCRIPT step name, or "passthrough"
    title: str
    exchange: str | None = None  # "mint", "static", an OAuth error code; None: no exchange
    upstream: str | None = None  # the upstream called; None when none was
    upstream_status: int | None = None
    reason: str = ""  # why the upstream accepted or refused


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


def fingerprint(secret: str) -> str:
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()[:12]


def masked(key: str) -> str:
    return f"{key[:3]}...{key[-4:]}"


class _Story:
    """The narration, and the step under way (the calls are sequential: one step at a time)."""

    def __init__(self, out: TextIO) -> None:
        self.out, self.steps, self._lock = out, [StepOutcome("setup", "")], threading.Lock()

    @property
    def step(self) -> StepOutcome:
        return self.steps[-1]

    def begin(self, name: str, title: str) -> None:
        self.steps.append(StepOutcome(name, title))
        self.say(f"\n[{len(self.steps) - 1}] {title}")

    def say(self, line: str, who: str | None = None) -> None:
        """A line; with ``who``, a hop's line, its text in a column of its own."""
        with self._lock:
            print(line if who is None else f"  {who:<24}{line}", file=self.out, flush=True)

    def more(self, line: str) -> None:
        self.say(f"  {line}", "")

    def verdict(self, who: str, reason: str) -> None:
        self.step.reason = reason
        self.say(reason, who)


class _Recorder:
    """WSGI middleware: records every request an upstream receives, then passes it on."""

    def __init__(self, app: WSGIApplication, into: list[RecordedRequest], story: _Story) -> None:
        self.app, self.into, self.story = app, into, story

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        received = Request(environ)
        body = received.get_data()
        environ["wsgi.input"] = io.BytesIO(body)  # read here; the app reads it again
        path, headers = environ.get("REQUEST_URI") or received.full_path, received.headers
        self.into.append(
            RecordedRequest(self.story.step.name, received.method, path, list(headers), body)
        )
        return self.app(environ, start_response)


class _ExplainingVerifier(TokenVerifier):
    """code-search's verifier, remembering why it last refused (a real upstream logs it)."""

    refusal = ""

    def verify(self, token: str, *, scopes: Iterable[str] = ()) -> VerifiedToken:
        try:
            return super().verify(token, scopes=scopes)
        except VerificationError as exc:
            self.refusal = str(exc)
            raise


def _code_search_app(story: _Story, verifier: _ExplainingVerifier) -> Flask:
    app = Flask("demo-code-search")

    @app.get("/search")
    @verifier.require("code.read")
    def search() -> Any:
        token: VerifiedToken = g.token
        scope, actors = " ".join(sorted(token.scopes)), " > ".join(token.actors)
        story.verdict("code-search", f"accepted (sub={token.subject}, scope={scope}, act={actors})")
        story.more("checked with the sidecar's JWKS: signature, typ, iss, aud, exp, scope")
        return {"results": ["sidecar/client.py", "sidecar/verify.py"]}

    @app.after_request
    def explain_refusal(response: Response) -> Response:
        if response.status_code >= 400:
            error = (response.get_json(silent=True) or {}).get("error")
            reason = f"refused {response.status_code} {error} ({verifier.refusal})"
            story.verdict("code-search", reason)
        return response

    return app


def _vendor_app(story: _Story, api_key: str) -> Flask:
    app = Flask("demo-vendor")
    expected = f"Bearer {api_key}".encode()

    @app.get("/tickets")
    def tickets() -> Any:
        if hmac.compare_digest(request.headers.get("Authorization", "").encode(), expected):
            story.verdict("vendor", "accepted (its own API key: it knows no users and no JWTs)")
            return {"tickets": ["DEMO-1", "DEMO-2"]}
        story.verdict("vendor", "refused 401 (not its API key)")
        return {"error": "unauthorized"}, 401

    return app


def _gateway_app(
    story: _Story, exchanger: TokenExchangeClient, http: requests.Session, urls: dict[str, str]
) -> Flask:
    """The gateway: exchanges the user's token for the upstream's credential and calls the
    upstream with that credential only, in a request built afresh: nothing of the user's is
    forwarded. (A real gateway also validates the user's token; the sidecar does it again.)"""
    app = Flask("demo-gateway")

    @app.get("/<upstream>/<operation>")
    def forward(upstream: str, operation: str) -> Any:
        user_token = bearer_token(request.headers.get("Authorization"))
        if request.path not in ROUTES or user_token is None:
            return {"error": "not_found"}, 404
        name, audience, scope, path = ROUTES[request.path]
        story.say(
            f"GET {request.path} with user token {fingerprint(user_token)}", "user -> gateway"
        )
        story.say(f"POST /token audience={audience} scope={scope}", "gateway -> sidecar")
        try:
            credential = exchanger.exchange(user_token, audience, scope=scope)
        except ExchangeError as exc:
            story.step.exchange = exc.error
            story.say(f"{exc.status} {exc.error}: nothing is sent upstream", "sidecar -> gateway")
            return jsonify(error=exc.error), 403
        if credential.issued_token_type == API_KEY_TYPE:
            story.step.exchange, shown = "static", masked(credential.access_token)
            story.say(f"200 (static): the {name} API key {shown}", "sidecar -> gateway")
        else:
            story.step.exchange, shown = "mint", fingerprint(credential.access_token)
            story.say(f"200 (mint): a token {shown} for {name} only", "sidecar -> gateway")
            _show_claims(story, credential.access_token)
        story.say(f"GET {path} with Authorization: Bearer {shown}", f"gateway -> {name}")
        story.step.upstream = name
        answer = http.get(urls[name] + path, headers=credential.headers(), timeout=10)
        story.step.upstream_status = answer.status_code
        return Response(answer.content, answer.status_code, content_type="application/json")

    return app


def _show_claims(story: _Story, token: str) -> None:
    # Decoded for display only: verifying is code-search's business.
    claims = jwt.decode(token, options={"verify_signature": False})
    act = json.dumps(claims.get("act"), separators=(",", ":"))
    story.more(f"iss={claims['iss']} sub={claims['sub']}")
    story.more(f"aud={claims['aud']} scope={claims.get('scope')}")
    story.more(f"act={act} exp=in {int(claims['exp']) - int(time.time())} s")


def _sidecar_config(directory: Path, issuer: str, idp_jwks: Path) -> dict[str, Any]:
    """The sidecar's configuration (JSON is YAML); the two secrets come from the environment."""
    trusted = {"issuer": IDP_ISSUER, "jwks_file": str(idp_jwks), "audiences": [GATEWAY]}
    vendor = {"type": "bearer", "token": "${VENDOR_API_KEY}"}
    return {
        "issuer": issuer,
        "database_url": f"sqlite:///{directory / 'sidecar.db'}",
        "trusted_issuers": [{**trusted, "algorithms": ["ES256"]}],
        "clients": [{"client_id": "gateway", "client_secret": "${GATEWAY_CLIENT_SECRET}"}],
        "upstreams": [{"name": "vendor", "credentials": vendor}],
        "policies": [
            {"client_id": "gateway", "audience": CODE_SEARCH, "scopes": ["code.read"], "ttl": 120},
            {
                "client_id": "gateway",
                "audience": VENDOR,
                "scopes": ["tickets.read"],
                "require_subject_scopes": True,
                "subject": {"email_verified": {"equals": True}},  # who may have the key
                "credential": "static",
                "upstream": "vendor",
            },
        ],
    }


@contextlib.contextmanager
def _sidecar_serving(config_file: Path, port: int, env: dict[str, str]) -> Iterator[int]:
    """``sidecar serve`` in a process group of its own, so that stopping it stops its workers
    too; stopped on the way out, whatever happened (an error, Ctrl-C). Yields its pid."""
    environment = {k: v for k, v in os.environ.items() if k != "SIDECAR_CONFIG"} | env
    log_file = config_file.with_name("sidecar.log")
    command = [sys.executable, "-m", "sidecar", "--config", str(config_file), "serve"]
    with log_file.open("wb") as log:
        process = subprocess.Popen(
            [*command, "--bind", f"127.0.0.1:{port}", "--workers", "1"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=environment,
            cwd=config_file.parent,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while not _ready(f"http://127.0.0.1:{port}/readyz"):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log_file.read_text(errors="replace").strip().splitlines()[-5:]
                raise DemoFailed("sidecar serve did not start:\n" + "\n".join(tail))
            time.sleep(0.1)
        yield process.pid
    finally:
        _stop(process)


def _ready(url: str) -> bool:
    try:
        with _direct() as http:
            return http.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def _direct() -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # no HTTP(S)_PROXY from the environment: all of it is loopback
    return session


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server (it stops its workers), then SIGKILL to whatever is left of its
    process group; returns once the group is gone (or after 10 s of trying)."""
    process.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=15)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            break
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=0.1)
    process.wait()


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # the story says what happened: no access log in the middle of it


def _serve_app(stack: contextlib.ExitStack, app: WSGIApplication) -> str:
    """Serve ``app`` on a free loopback port, in a thread, until ``stack`` closes."""
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=_QuietHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    stack.callback(server.server_close)
    stack.callback(server.shutdown)
    return f"http://127.0.0.1:{server.server_port}"


def run_demo(out: TextIO = sys.stdout, *, keep: bool = False) -> DemoReport:
    """Run the story, printing it to ``out``; everything started is stopped before returning.
    ``keep`` keeps the temporary directory (configuration, database, ``sidecar.log``)."""
    directory = Path(tempfile.mkdtemp(prefix="sidecar-demo-"))
    try:
        with contextlib.ExitStack() as stack:
            report = _run(_Story(out), directory, stack)
    finally:
        if not keep:
            shutil.rmtree(directory, ignore_errors=True)
    if keep:
        report.kept = directory
        print(f"\nkept {directory}: config, database, sidecar.log (audit trail)", file=out)
    return report


def _run(story: _Story, directory: Path, stack: contextlib.ExitStack) -> DemoReport:
    idp_key, idp_jwks = directory / "idp.key.pem", directory / "idp.jwks.json"
    init_demo_idp(idp_key, idp_jwks)  # a fresh key pair; the sidecar trusts its JWKS file
    tokens = {
        user: demo_token(
            idp_key,
            issuer=IDP_ISSUER,
            audience=GATEWAY,
            subject=f"{user}@example.com",
            scope=scope,
            ttl=600,
            extra={"email_verified": verified},
        )
        for user, (scope, verified) in USERS.items()
    }
    vendor_key, client_secret = "vk_" + secrets.token_hex(16), secrets.token_urlsafe(32)
    with socket.socket() as probe:  # a free port, so that the issuer URL is known beforehand
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    issuer = f"http://127.0.0.1:{port}"
    config_file = directory / "sidecar.yaml"
    config_file.write_text(json.dumps(_sidecar_config(directory, issuer, idp_jwks), indent=1))
    env = {"VENDOR_API_KEY": vendor_key, "GATEWAY_CLIENT_SECRET": client_secret}
    story.say("Starting sidecar serve ...")
    pid = stack.enter_context(_sidecar_serving(config_file, port, env))

    received: dict[str, list[RecordedRequest]] = {"code-search": [], "vendor": []}
    # A session for each caller (sessions are not shared between threads).
    jwks_http, token_http, gateway_http, user_http = (
        stack.enter_context(_direct()) for _ in range(4)
    )
    verifier = _ExplainingVerifier(issuer=issuer, audience=CODE_SEARCH, session=jwks_http)
    apps = {
        "code-search": _code_search_app(story, verifier),
        "vendor": _vendor_app(story, vendor_key),
    }
    urls = {
        name: _serve_app(stack, _Recorder(app, received[name], story)) for name, app in apps.items()
    }
    exchanger = TokenExchangeClient(
        f"{issuer}/token", "gateway", client_secret, timeout=10, session=token_http
    )
    stack.callback(exchanger.close)
    gateway = _serve_app(stack, _gateway_app(story, exchanger, gateway_http, urls))
    for line in (
        "\nOne credential per hop; the user's token never leaves the gateway. On loopback:",
        f"  demo IdP     {IDP_ISSUER}: signs user tokens for the gateway, {GATEWAY}",
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

    for name, user, route, shows in SCRIPT:
        story.begin(name, f"{user} -> {route}: {shows}")
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


if __name__ == "__main__":
    sys.exit(main())
