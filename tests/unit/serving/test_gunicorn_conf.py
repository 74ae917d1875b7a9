"""The gunicorn hooks of ``sidecar serve --server gunicorn`` (sidecar/serving/gunicorn_conf.py),
called as gunicorn calls them, on a stand-in for its worker object that holds a real app."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from flask import Flask
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.values import MultiProcessValue
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from sidecar.services import Services
from sidecar.serving.common import MULTIPROCESS_ENV
from sidecar.serving.gunicorn_conf import child_exit, post_worker_init, worker_exit
from sidecar.store.audit_query import EXCHANGES
from sidecar.store.db import make_engine
from sidecar.store.models import AuditEventRow


def worker_of(app: Any) -> SimpleNamespace:
    """What the hooks read of gunicorn's worker: its loaded app (None before it loaded)."""
    return SimpleNamespace(wsgi=app, pid=4242)


class Recorder:
    """A SIGTERM handler that records its calls (gunicorn's own, in a real worker)."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, signum: int, frame: Any) -> None:
        self.calls.append(signum)


@pytest.fixture
def sigterm_restored() -> Iterator[None]:
    original = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, original)


# --- post_worker_init: SIGTERM drains ---------------------------------------------------------


def test_sigterm_marks_the_app_draining_then_runs_gunicorns_handler(
    app: Flask, services: Services, sigterm_restored: None
) -> None:
    draining_when_gunicorns_ran: list[bool] = []

    def gunicorns(signum: int, frame: Any) -> None:
        draining_when_gunicorns_ran.append(services.draining.is_set())

    signal.signal(signal.SIGTERM, gunicorns)
    post_worker_init(worker_of(app))

    signal.raise_signal(signal.SIGTERM)

    assert services.draining.is_set()
    assert draining_when_gunicorns_ran == [True]


def test_after_sigterm_readyz_answers_503(
    app: Flask, services: Services, sigterm_restored: None
) -> None:
    signal.signal(signal.SIGTERM, Recorder())
    post_worker_init(worker_of(app))
    client = app.test_client()
    assert client.get("/readyz").status_code == 200

    signal.raise_signal(signal.SIGTERM)
    response = client.get("/readyz")

    assert response.status_code == 503
    assert response.json["checks"]["serving"] is False
    assert client.get("/healthz").status_code == 200  # alive, finishing what is in flight


def test_sigterm_with_an_ignored_previous_handler_only_drains(
    app: Flask, services: Services, sigterm_restored: None
) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    post_worker_init(worker_of(app))

    signal.raise_signal(signal.SIGTERM)  # SIG_IGN is not callable: nothing else runs

    assert services.draining.is_set()


def test_sigterm_in_a_worker_without_an_app_still_runs_gunicorns_handler(
    sigterm_restored: None,
) -> None:
    gunicorns = Recorder()
    signal.signal(signal.SIGTERM, gunicorns)
    post_worker_init(worker_of(None))

    signal.raise_signal(signal.SIGTERM)

    assert gunicorns.calls == [signal.SIGTERM]


# --- worker_exit: the services closed ---------------------------------------------------------


def audit_errors(database_url: str) -> list[str | None]:
    engine = make_engine(database_url)
    try:
        with sessionmaker(engine)() as session:
            return list(
                session.scalars(
                    select(AuditEventRow.error)
                    .where(AuditEventRow.decision.in_(EXCHANGES))
                    .order_by(AuditEventRow.id)
                )
            )
    finally:
        engine.dispose()


def test_worker_exit_writes_the_queued_audit_events_and_closes_the_services(
    app: Flask, services: Services
) -> None:
    before = set(threading.enumerate())
    assert app.test_client().get("/token").status_code == 405  # a denial, audited
    [writer] = [t for t in set(threading.enumerate()) - before if t.name == "audit-writer"]

    worker_exit(None, worker_of(app))

    assert audit_errors(services.settings.database_url) == ["invalid_request"]
    assert services.audit.pending == 0
    assert not writer.is_alive()


def test_worker_exit_of_a_worker_without_an_app_does_nothing(services: Services) -> None:
    worker_exit(None, worker_of(None))
    worker_exit(None, SimpleNamespace(pid=4242))  # no wsgi attribute at all

    assert services.readiness()["database"] is True


# --- child_exit: a dead worker's live gauges go ----------------------------------------------


def live_gauge(pid: int, value: float) -> None:
    """A worker's ``liveall`` gauge sample, written to its file of the metrics directory as
    prometheus_client writes it in that worker."""
    value_class = MultiProcessValue(process_identifier=lambda: pid)
    gauge = value_class(
        "gauge", "sidecar_test_live", "sidecar_test_live", (), (), "", multiprocess_mode="liveall"
    )
    gauge.set(value)


def live_pids(directory: Path) -> set[str]:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    return {
        sample.labels["pid"]
        for family in registry.collect()
        if family.name == "sidecar_test_live"
        for sample in family.samples
    }


def test_child_exit_removes_the_dead_workers_live_gauges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(MULTIPROCESS_ENV, str(tmp_path))
    live_gauge(4242, 1.0)
    live_gauge(4343, 2.0)
    assert live_pids(tmp_path) == {"4242", "4343"}

    child_exit(None, SimpleNamespace(pid=4242))

    assert live_pids(tmp_path) == {"4343"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gauge_liveall_4343.db"]
