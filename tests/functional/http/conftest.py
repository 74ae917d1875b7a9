"""Fixtures of the HTTP tests that move the service's clock."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from sidecar.config import Settings
from sidecar.services import Services
from tests.conftest import FakeClock, make_services


@pytest.fixture
def clock() -> FakeClock:
    """The service's clock, moved by the test: whole seconds, from the wall clock (on which
    PyJWT checks a subject token's exp)."""
    return FakeClock(float(int(time.time())))


@pytest.fixture
def clocked_services(settings: Settings, clock: FakeClock) -> Iterator[Services]:
    """The service on ``clock``, prepared at T0 = clock.now (its first signing key generated);
    a module serves it by overriding ``services`` with it."""
    services = make_services(settings, clock=clock)
    yield services
    services.close()
