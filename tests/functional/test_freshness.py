"""The freshness bound, end to end: the real ``sidecar serve`` (2 workers each), changed by the
real CLI, the admin API and SIGHUP while it serves.

The promise (sidecar/refreshing.py): no decision is made on a policy table or keyring older than
``policy_refresh_interval`` / ``keys.refresh_interval``, counted from the commit of the change.
It is checked after the workers sat idle for several intervals (a policy removed, disabled and
tightened, a key retired), on SQLite and on PostgreSQL. On PostgreSQL a change made through one
instance reaches every worker of another in well under a second (LISTEN/NOTIFY,
sidecar/store/notify.py), with refresh intervals far too long for the timers to explain it.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from tests.conftest import (
    ACCESS_TOKEN_TYPE,
    CODE_SEARCH,
    GATEWAY_SECRET,
    TICKETS,
    TOKEN_EXCHANGE,
    ClientKeys,
    TestIdP,
    base_config,
    fresh_postgres_database,
)
from tests.launcher import SIDECAR, Served, start_serve

BOUND = 1.0  # policy_refresh_interval and keys.refresh_interval of the idle tests (seconds)
IDLE = 3.5  # several intervals without a single request
WATCH = 0.7  # requests keep coming this long after the bound
SLOW = 60.0  # intervals under which only a notification can explain a change seen at once
NOTIFIED_WITHIN = 0.5  # "well under a second"
WIKI = "https://wiki.internal/mcp"
SUBJECT_SCOPES = "code.read code.search tickets.read wiki.read"
ADMIN_TOKEN = "admin-" + "a" * 32
SECOND_CLIENT, SECOND_SECRET = "gateway-2", "second-gateway-secret-" + "z" * 24
DATABASES = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


# --- set-up -------------------------------------------------------------------------------------


def freshness_config(idp: TestIdP, database_url: str, interval: float = BOUND) -> dict[str, Any]:
    config = base_config(idp, ClientKeys(), database_url)
    config["policy_refresh_interval"] = interval
    config["keys"]["refresh_interval"] = interval  # publish_ahead (15m) >= 2 * interval
    config["policies"].append(
        {
            "client_id": "gateway",
            "audience": WIKI,
            "scopes": ["wiki.read"],
            "default_scopes": ["wiki.read"],
            "ttl": 60,
        }
    )
    config["admin"] = {"credentials": [{"name": "ops", "token": ADMIN_TOKEN}]}
    return config


@contextmanager
def database(kind: str, directory: Path) -> Iterator[str]:
    """A new database: a SQLite file (``serve`` migrates it), or a migrated PostgreSQL database
    dropped afterwards."""
    if kind == "sqlite":
        yield f"sqlite:///{directory / 'sidecar.db'}"
        return
    from sidecar.store import migrate
    from sidecar.store.db import make_engine

    with fresh_postgres_database("sidecar_freshness") as url:
        engine = make_engine(url)
        migrate.upgrade(engine)
        engine.dispose()
        yield url


@contextmanager
def serving(directory: Path, config: dict[str, Any], instances: int = 1) -> Iterator[list[Served]]:
    """``instances`` servers of the same configuration (and database), always killed."""
    started: list[Served] = []
    try:
        for index in range(instances):
            home = directory / f"instance-{index}"
            home.mkdir()
            started.append(start_serve(home, copy.deepcopy(config)))
        yield started
    finally:
        for served in started:
            served.kill()


def exchange(
    url: str,
    subject: str,
    audience: str = CODE_SEARCH,
    scope: str | None = None,
    client: tuple[str, str] = ("gateway", GATEWAY_SECRET),
) -> requests.Response:
    form = {
        "grant_type": TOKEN_EXCHANGE,
        "subject_token": subject,
        "subject_token_type": ACCESS_TOKEN_TYPE,
        "audience": audience,
    }
    if scope is not None:
        form["scope"] = scope
    # A new connection each time (no session): the requests spread over the workers.
    return requests.post(f"{url}/token", data=form, auth=client, timeout=10)


def sidecar(served: Served, *args: str) -> str:
    """The CLI on the server's configuration; its output."""
    env = {k: v for k, v in os.environ.items() if k != "SIDECAR_CONFIG"}
    done = subprocess.run(
        [*SIDECAR, "--config", str(served.config_file), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def kid_of(response: requests.Response) -> str:
    assert response.status_code == 200, response.text
    kid: str = jwt.get_unverified_header(response.json()["access_token"])["kid"]
    return kid


@dataclass(frozen=True)
class Seen:
    probe: str
    url: str
    sent: float  # time.monotonic() just before the request left
    status: int
    error: str | None
    kid: str | None


Probe = Callable[[str], requests.Response]


def watch(urls: list[str], probes: dict[str, Probe], until: float) -> list[Seen]:
    """Every probe against every server, over and over, until ``until``."""
    seen = []
    while time.monotonic() < until:
        for url in urls:
            for name, send in probes.items():
                sent = time.monotonic()
                response = send(url)
                body = response.json()
                kid = kid_of(response) if response.status_code == 200 else None
                seen.append(Seen(name, url, sent, response.status_code, body.get("error"), kid))
    return seen


def first(seen: list[Seen], probe: str, test: Callable[[Seen], bool]) -> float | None:
    times = [s.sent for s in seen if s.probe == probe and test(s)]
    return min(times) if times else None


def state_ages(served: Served) -> dict[tuple[str, str], float]:
    """``sidecar_state_age_seconds`` by (state, worker pid), from GET /metrics."""
    response = requests.get(f"{served.url}/metrics", timeout=10)
    assert response.status_code == 200
    ages = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == "sidecar_state_age_seconds":
                ages[(sample.labels["state"], sample.labels["pid"])] = sample.value
    return ages


def warm(urls: list[str], subject: str, rounds: int = 6) -> None:
    """Every worker has decided at least once (most likely): each holds loaded copies."""
    for _ in range(rounds):
        for url in urls:
            assert exchange(url, subject).status_code == 200


# --- idle workers: removal, disable, tightening, key retirement ----------------------------------


@pytest.mark.parametrize("kind", DATABASES)
def test_after_idle_workers_no_grant_or_signature_on_the_old_state_past_the_bound(
    tmp_path: Path, kind: str
) -> None:
    idp = TestIdP(tmp_path)
    subject = idp.token(scope=SUBJECT_SCOPES)
    probes: dict[str, Probe] = {
        "tightened": lambda url: exchange(url, subject, CODE_SEARCH, scope="code.search"),
        "disabled": lambda url: exchange(url, subject, TICKETS),
        "removed": lambda url: exchange(url, subject, WIKI),
        "unchanged": lambda url: exchange(url, subject, CODE_SEARCH, scope="code.read"),
    }
    with (
        database(kind, tmp_path) as url,
        serving(
            tmp_path, freshness_config(idp, url), instances=1 if kind == "sqlite" else 2
        ) as servers,
    ):
        urls = [served.url for served in servers]
        before = watch(urls, probes, time.monotonic() + 0.3)
        assert {s.status for s in before} == {200}
        old_kid = before[0].kid

        # Each worker's age of state, per pid over HTTP: the timers keep them within the bound.
        for served in servers:
            ages = state_ages(served)
            assert {state for state, _ in ages} == {"policies", "keyring"}
            assert len({pid for _, pid in ages}) == 2  # both workers of the instance
            assert all(age < BOUND for age in ages.values()), ages

        # One apply --prune: the wiki policy removed, tickets disabled, code-search tightened.
        time.sleep(IDLE)
        policies = copy.deepcopy(servers[0].config["policies"])
        for policy in policies:
            if policy["audience"] == CODE_SEARCH and policy["client_id"] == "gateway":
                policy["scopes"] = ["code.read"]
            if policy["audience"] == TICKETS:
                policy["enabled"] = False
        kept = [p for p in policies if p["audience"] != WIKI]
        policy_file = tmp_path / "policies.yaml"
        policy_file.write_text(yaml.safe_dump({"policies": kept}))
        sidecar(servers[0], "policy", "apply", "--prune", str(policy_file))
        committed = time.monotonic()  # the commit happened before the CLI returned
        seen = watch(urls, probes, committed + BOUND + WATCH)

        late = [s for s in seen if s.sent >= committed + BOUND]
        assert {s.probe for s in late} == set(probes)
        for s in late:
            expected = {
                "tightened": (400, "invalid_scope"),
                "disabled": (400, "invalid_target"),
                "removed": (400, "invalid_target"),
                "unchanged": (200, None),
            }[s.probe]
            assert (s.status, s.error) == expected, s
        for probe in ("tightened", "disabled", "removed"):
            refused = first(seen, probe, lambda s: s.status != 200)
            assert refused is not None
            print(f"{kind}: {probe} refused {refused - committed:.3f}s after the CLI returned")

        # Key retirement: `keys rotate --now` retires the signing key at once.
        time.sleep(IDLE)
        rotated = yaml.safe_load(sidecar(servers[0], "keys", "rotate", "--now", "--json"))
        committed = time.monotonic()
        seen = watch(urls, {"sign": probes["unchanged"]}, committed + BOUND + WATCH)

        assert rotated["kid"] != old_kid
        late = [s for s in seen if s.sent >= committed + BOUND]
        assert late
        assert {s.kid for s in late} == {rotated["kid"]}  # no worker signs with the retired key
        new_kid_at = first(seen, "sign", lambda s: s.kid == rotated["kid"])
        assert new_kid_at is not None
        print(f"{kind}: new key signing {new_kid_at - committed:.3f}s after the CLI returned")


# --- PostgreSQL: a change through one instance, at once in every worker of another -------------


def admin(url: str, method: str, path: str, **headers: str) -> requests.Response:
    return requests.request(
        method,
        f"{url}/admin{path}",
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}", **headers},
        timeout=10,
    )


@pytest.mark.postgres
def test_on_postgres_a_change_through_one_instance_reaches_every_worker_of_another_at_once(
    tmp_path: Path,
) -> None:
    idp = TestIdP(tmp_path)
    subject = idp.token(scope=SUBJECT_SCOPES)
    # Intervals of a minute: neither timers (every 30 s) nor the bound can explain a change
    # seen within a second; only the notification can.
    with (
        database("postgres", tmp_path) as url,
        serving(tmp_path, freshness_config(idp, url, interval=SLOW), instances=2) as (one, other),
    ):
        warm([one.url, other.url], subject)
        time.sleep(1.0)  # the copies loaded now are visibly older than a reload on notice

        name = "gateway -> " + CODE_SEARCH
        path = "/policies/" + requests.utils.quote(name, safe="")
        etag = admin(one.url, "GET", path).headers["ETag"]
        requested = time.time()
        disabled = admin(one.url, "POST", path + "/disable", **{"If-Match": etag})
        assert disabled.status_code == 200, disabled.text
        done, answered = time.monotonic(), time.time()
        seen = watch([other.url], {"code": lambda u: exchange(u, subject)}, done + WATCH)

        refused = first(seen, "code", lambda s: s.status != 200)
        assert refused is not None
        delay = refused - done
        print(f"NOTIFY: policy disabled through one instance, refused by the other {delay:.3f}s")
        assert delay < NOTIFIED_WITHIN
        late = [s for s in seen if s.sent >= done + NOTIFIED_WITHIN]
        assert late
        assert all((s.status, s.error) == (400, "invalid_target") for s in late)
        # Every worker of the other instance reloaded on the notification (both, requests or
        # not): its copy is younger than the change.
        scrape_from = time.time()
        ages = state_ages(other)
        scraped = (scrape_from + time.time()) / 2
        reloads = sorted(scraped - a for (state, _), a in ages.items() if state == "policies")
        assert len(reloads) == 2, ages
        assert all(reload > requested - 0.05 for reload in reloads), (requested, reloads)
        print(
            "NOTIFY: the other instance's workers reloaded "
            + ", ".join(f"{1000 * (r - answered):+.0f} ms" for r in reloads)
            + f" from the admin response ({1000 * (answered - requested):.0f} ms after the request)"
        )

        # A key rotation by the CLI: both instances sign with the new key at once.
        old_kid = kid_of(exchange(other.url, subject, TICKETS))
        rotated = yaml.safe_load(sidecar(one, "keys", "rotate", "--now", "--json"))
        done = time.monotonic()
        seen = watch(
            [one.url, other.url], {"sign": lambda u: exchange(u, subject, TICKETS)}, done + WATCH
        )
        assert rotated["kid"] != old_kid
        signing = first(seen, "sign", lambda s: s.kid == rotated["kid"])
        assert signing is not None
        print(f"NOTIFY: key rotated by the CLI, new key signing {signing - done:.3f}s after")
        late = [s for s in seen if s.sent >= done + NOTIFIED_WITHIN]
        assert late
        assert {s.kid for s in late} == {rotated["kid"]}


@pytest.mark.postgres
def test_the_listener_reconnects_and_catches_up_after_its_connection_is_killed(
    tmp_path: Path,
) -> None:
    from sidecar.config import settings_from_mapping
    from sidecar.services import Services
    from sidecar.store.notify import APPLICATION_NAME, POLL_SECONDS

    idp = TestIdP(tmp_path)
    with database("postgres", tmp_path) as url:
        settings = settings_from_mapping(freshness_config(idp, url, interval=SLOW), env={})
        services = Services(settings)
        services.prepare()
        services.start_background()
        try:
            listener = services.listener
            assert listener is not None
            assert listener.listening.wait(5)
            before = services.policies.get()
            time.sleep(3 * POLL_SECONDS)
            assert listener.connections == 1  # a wait without notifications is not a failure

            with services.engine.begin() as connection:
                killed = connection.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE application_name = :name AND datname = current_database()"
                    ),
                    {"name": APPLICATION_NAME},
                ).all()
            assert killed == [(True,)]
            deadline = time.monotonic() + 10
            while listener.connections < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert listener.connections == 2
            assert listener.listening.is_set()

            # A change by another process, announced on the new connection: reloaded at once,
            # though the interval is an hour.
            writer = Services(settings)
            try:
                kept = [p for p in before if p.audience != WIKI]
                writer.policy_store.apply(kept, actor="test", prune=True)
            finally:
                writer.close()
            deadline = time.monotonic() + 2
            while services.policies.current is before and time.monotonic() < deadline:
                time.sleep(0.01)
            now = services.policies.current
            assert now is not None
            assert now is not before
            assert WIKI not in {p.audience for p in now}
        finally:
            services.close()
        assert listener.listening.is_set() is False


# --- SIGHUP -------------------------------------------------------------------------------------


def worker_pids(served: Served) -> set[str]:
    """The workers reporting their state now (a worker's samples go when it exits)."""
    return {pid for _, pid in state_ages(served)}


def settle(check: Callable[[], bool], *, timeout: float, consecutive: int = 10) -> float:
    """When ``check`` started to hold ``consecutive`` times in a row (fails after ``timeout``)."""
    deadline = time.monotonic() + timeout
    streak, since = 0, 0.0
    while time.monotonic() < deadline:
        now = time.monotonic()
        if check():
            streak, since = streak + 1, since if streak else now
            if streak >= consecutive:
                return since
        else:
            streak = 0
            time.sleep(0.05)
    raise AssertionError(f"not settled within {timeout}s")


WORKERS = 2  # sidecar serve's default, as the launcher starts it


def test_sighup_drops_a_removed_client_and_refuses_an_invalid_file(tmp_path: Path) -> None:
    idp = TestIdP(tmp_path)
    subject = idp.token()
    config = freshness_config(idp, f"sqlite:///{tmp_path / 'sidecar.db'}")
    config["clients"].append({"client_id": SECOND_CLIENT, "client_secret": SECOND_SECRET})
    second_policy = {
        "client_id": SECOND_CLIENT,
        "audience": CODE_SEARCH,
        "scopes": ["code.read"],
        "default_scopes": ["code.read"],
        "ttl": 60,
    }
    config["policies"].append(second_policy)
    second = (SECOND_CLIENT, SECOND_SECRET)
    with serving(tmp_path, config) as (served,):
        for _ in range(4):
            assert exchange(served.url, subject, client=second).status_code == 200
            assert exchange(served.url, subject).status_code == 200

        def remove_second(document: dict[str, Any]) -> None:
            document["clients"] = [
                c for c in document["clients"] if c["client_id"] != SECOND_CLIENT
            ]
            document["policies"] = [p for p in document["policies"] if p != second_policy]

        old_workers = worker_pids(served)
        stopped_before = served.log().count("Stopped old worker")
        served.rewrite_config(remove_second)
        served.signal(signal.SIGHUP)
        sent = time.monotonic()

        def removed_client_refused() -> bool:
            response = exchange(served.url, subject, client=second)
            body = response.json()
            return (response.status_code, body.get("error")) == (401, "invalid_client")

        refused_at = settle(removed_client_refused, timeout=10, consecutive=1)
        # granian replaces the workers one after the other, each old one once its successor
        # started, and logs each old one it stopped.
        deadline = time.monotonic() + 30
        while (
            served.log().count("Stopped old worker") < stopped_before + WORKERS
            and time.monotonic() < deadline
        ):
            time.sleep(0.1)
        replaced_at = time.monotonic()
        assert served.log().count("Stopped old worker") == stopped_before + WORKERS, served.log()
        assert not worker_pids(served) & old_workers
        print(
            f"SIGHUP: removed client refused {refused_at - sent:.2f}s after, "
            f"by every worker {replaced_at - sent:.2f}s after"
        )
        for _ in range(8):
            assert removed_client_refused()
            assert exchange(served.url, subject).status_code == 200

        # An invalid file: refused, and the configuration of now keeps serving.
        served.config_file.write_text("issuer: [this is not a configuration\n")
        served.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "configuration refused" not in served.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "configuration refused" in served.log()
        for _ in range(8):
            assert exchange(served.url, subject).status_code == 200
            assert exchange(served.url, subject, client=second).status_code == 401
        assert served.process.poll() is None
