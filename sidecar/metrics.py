"""Prometheus metrics (``GET /metrics``).

Under ``sidecar serve`` every worker writes its counters to ``PROMETHEUS_MULTIPROC_DIR`` (set by
``serve``) and a scrape of any worker reports the sum over all workers. Values that follow from
shared state (the keyring) are computed at scrape time by a collector, so every worker reports the
same numbers.

The age of the state each worker decides with (``sidecar_state_age_seconds{state, pid}``, the
bound of :mod:`sidecar.refreshing`) is per worker, and a collector only runs in the worker that
answers the scrape. So each worker records *when* the load behind its copy started, in a gauge of
its own file (``sidecar_state_loaded_timestamp_seconds``, ``multiprocess_mode="liveall"``: one
sample per live worker, labelled ``pid``), and the scraping worker derives every worker's age from
those timestamps at scrape time. A worker that stopped reloading shows a growing age (it is not
frozen at its last report); ``+Inf`` means nothing loaded yet, or a copy invalidated by a change
and not yet reloaded. A worker's samples go when it exits (``Services.close``; gunicorn's
``child_exit``); a worker killed outright leaves its last timestamp until the server restarts.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from sidecar import __version__
from sidecar.keys.keyring import Keyring

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"

# In multiprocess mode every increment asks the kernel for the process id (os.getpid, a system
# call), to notice a fork and move to the new process's own file: five times per token request.
# The id is kept here instead, and refreshed in a forked child before it runs anything else.
_pid = os.getpid()


def _refresh_pid() -> None:
    global _pid
    _pid = os.getpid()


def _process_id() -> int:
    return _pid


os.register_at_fork(after_in_child=_refresh_pid)
if getattr(values.ValueClass, "_multiprocess", False):
    values.ValueClass = values.MultiProcessValue(process_identifier=_process_id)  # type: ignore[no-untyped-call]


STATE_LOADED_AT = "sidecar_state_loaded_timestamp_seconds"
STATE_AGE = "sidecar_state_age_seconds"
# One per process, written by the Refreshing holders (Services.start_background); not in any
# registry: Metrics exposes it with the ages derived from it.
_state_loaded_at = Gauge(
    STATE_LOADED_AT,
    "When the load behind the state this worker decides with started (Unix time; -Inf: none).",
    ["state"],
    registry=None,
    multiprocess_mode="liveall",
)


def state_reporter(state: str) -> Callable[[float], None]:
    """Records the start of the load behind this worker's copy of ``state`` (Refreshing's
    ``report_loaded_at``)."""
    return _state_loaded_at.labels(state).set


def forget_this_process() -> None:
    """At a worker's exit: its per-worker gauges leave the shared directory with it."""
    path = os.environ.get(MULTIPROCESS_ENV)
    if path:
        multiprocess.mark_process_dead(os.getpid(), path)  # type: ignore[no-untyped-call]


class StateAgeCollector(Collector):
    """Everything ``source`` collects, and beside the load timestamps each worker recorded,
    ``sidecar_state_age_seconds`` computed from them now (with the same labels)."""

    def __init__(self, source: Collector, clock: Callable[[], float] = time.time) -> None:
        self._source = source
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        for family in self._source.collect():
            yield family
            if family.name != STATE_LOADED_AT:
                continue
            now = self._clock()
            ages = Metric(
                STATE_AGE,
                "Seconds since the load behind the state this worker decides with started "
                "(the bound is policy_refresh_interval or keys.refresh_interval).",
                "gauge",
            )
            for sample in family.samples:
                ages.add_sample(STATE_AGE, dict(sample.labels), now - sample.value)
            yield ages


class KeyringCollector(Collector):
    """Gauges of the signing keyring: the current key's age and the next rotation time."""

    def __init__(
        self,
        keyring: Callable[[], Keyring],
        clock: Callable[[], float],
        rotate_every: float,
        publish_ahead: float,
    ) -> None:
        self._keyring = keyring
        self._clock = clock
        self._rotate_every = rotate_every
        self._publish_ahead = publish_ahead

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            keyring = self._keyring()
        except Exception:
            return
        now = self._clock()
        current = keyring.current(now)
        published = GaugeMetricFamily(
            "sidecar_signing_keys_published", "Keys in the JWKS, by state.", labels=["state"]
        )
        for state in ("next", "current", "previous"):
            count = sum(1 for k in keyring.published(now) if k.state(now) == state)
            published.add_metric([state], count)
        yield published
        if current is None:
            return
        yield GaugeMetricFamily(
            "sidecar_signing_key_age_seconds",
            "Seconds since the current signing key started signing.",
            value=now - current.activates_at,
        )
        upcoming = keyring.upcoming(now)
        next_rotation = (
            upcoming.activates_at
            if upcoming is not None
            else current.activates_at + self._rotate_every
        )
        yield GaugeMetricFamily(
            "sidecar_signing_key_next_rotation_timestamp_seconds",
            "When the next key starts signing (Unix time).",
            value=next_rotation,
        )


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.exchanges = Counter(
            "sidecar_token_requests",
            "Token endpoint requests by outcome and OAuth error code.",
            ["outcome", "error"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "sidecar_token_request_seconds",
            "Time spent answering token endpoint requests.",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry,
        )
        self.cache_lookups = Counter(
            "sidecar_cache_lookups",
            "Lookups of the subject-token and minted-token caches, by result (hit or miss).",
            ["cache", "result"],
            registry=self.registry,
        )
        self.rate_limited = Counter(
            "sidecar_rate_limit_refusals",
            "Token requests refused by a rate limit, by client (the authenticated client, or "
            "(unauthenticated) for a claim or a failed authentication).",
            ["client"],
            registry=self.registry,
        )
        self.jwks_fetches = Counter(
            "sidecar_jwks_fetches",
            "Fetches of a trusted issuer's JWKS, by issuer and outcome (ok or failed).",
            ["issuer", "outcome"],
            registry=self.registry,
        )
        self.upstream_token_fetches = Counter(
            "sidecar_upstream_token_fetches",
            "Token requests to an upstream's own authorization server (credential "
            "client_credentials), by upstream and outcome (ok or failed).",
            ["upstream", "outcome"],
            registry=self.registry,
        )
        self.audit_write_failures = Counter(
            "sidecar_audit_write_failures",
            "Audit batches the database refused (retried; grants are refused meanwhile).",
            registry=self.registry,
        )
        self.database_errors = Counter(
            "sidecar_database_errors",
            "Errors the database raised (failed connections, timeouts, refused statements), by "
            "kind; constraint violations such as a replayed assertion jti are not errors.",
            ["kind"],
            registry=self.registry,
        )
        self.audit_queue = Gauge(
            "sidecar_audit_queue_depth",
            "Audit events not yet in the database, summed over live workers.",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        build = Gauge(
            "sidecar_build_info",
            "The running version (always 1).",
            ["version", "python"],
            registry=self.registry,
            multiprocess_mode="max",
        )
        build.labels(__version__, platform.python_version()).set(1)
        self._scrape_registry = self.registry
        if os.environ.get(MULTIPROCESS_ENV):
            self._scrape_registry = CollectorRegistry()
            every_worker = MultiProcessCollector(None)  # type: ignore[no-untyped-call]
            self._scrape_registry.register(StateAgeCollector(every_worker))
        else:
            self.registry.register(StateAgeCollector(_state_loaded_at))

    def cache_observer(self, cache: str) -> Callable[[bool], None]:
        """Counts one cache's lookups; the hit rate is hits / (hits + misses)."""
        hit, miss = (
            self.cache_lookups.labels(cache, "hit"),
            self.cache_lookups.labels(cache, "miss"),
        )

        def observe(was_hit: bool) -> None:
            (hit if was_hit else miss).inc()

        return observe

    def add_collector(self, collector: Collector) -> None:
        self._scrape_registry.register(collector)

    def render(self) -> bytes:
        return generate_latest(self._scrape_registry)
