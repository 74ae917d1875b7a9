"""Metrics in prometheus_client's multiprocess mode, as `sidecar serve` runs them: each process
writes its own file, and a scrape of any process reports the sum over all of them."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

SCRIPT = textwrap.dedent(
    """
    import os, sys
    from sidecar.metrics import Metrics

    metrics = Metrics()
    metrics.exchanges.labels("granted", "").inc()
    metrics.latency.observe(0.002)
    child = os.fork()
    if child == 0:  # a forked worker keeps counting, in a file of its own
        metrics.exchanges.labels("granted", "").inc(2)
        metrics.latency.observe(0.002)
        os._exit(0)
    os.waitpid(child, 0)
    print(child)
    sys.stdout.write(metrics.render().decode())
    """
)


def run_with_metrics_in(directory: Path, script: str) -> tuple[str, str]:
    """``script`` run by a new interpreter with its metrics files in ``directory`` (as under
    ``sidecar serve``): the first line it printed, and the rest (an exposition)."""
    env = {"PROMETHEUS_MULTIPROC_DIR": str(directory), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    first, _, rest = done.stdout.partition("\n")
    return first, rest


def test_counts_of_a_forked_process_go_to_its_own_file_and_are_summed(tmp_path: Path) -> None:
    child, exposition = run_with_metrics_in(tmp_path, SCRIPT)

    files = {path.name for path in tmp_path.iterdir()}
    assert f"counter_{child}.db" in files
    assert len([name for name in files if name.startswith("counter_")]) == 2  # parent, child
    assert 'sidecar_token_requests_total{error="",outcome="granted"} 3.0' in exposition
    assert "sidecar_token_request_seconds_count 2.0" in exposition
    assert 'sidecar_token_request_seconds_bucket{le="0.002"} 2.0' in exposition


# --- the age of each worker's state (sidecar_state_age_seconds) -----------------------------------

AGES_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    from sidecar.metrics import Metrics, forget_this_process, state_reporter

    metrics = Metrics()
    workers = []
    for age in (5.0, 7.0):
        child = os.fork()
        if child == 0:  # a worker records the start of its own last load, in its own file
            state_reporter("policies")(time.time() - age)
            os._exit(0)
        os.waitpid(child, 0)
        workers.append(child)
    child = os.fork()
    if child == 0:  # a worker that exited cleanly takes its samples with it
        state_reporter("policies")(time.time())
        forget_this_process()
        os._exit(0)
    os.waitpid(child, 0)
    # This process is a worker too (workers report after the fork, as these do).
    state_reporter("policies")(time.time() - 2.0)
    state_reporter("keyring")(float("-inf"))  # nothing loaded yet
    print(json.dumps({"scraper": os.getpid(), "workers": workers, "gone": child}))
    sys.stdout.write(metrics.render().decode())
    """
)


def ages_by_pid(exposition: str) -> dict[tuple[str, str], float]:
    from prometheus_client.parser import text_string_to_metric_families

    ages = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == "sidecar_state_age_seconds":
                ages[(sample.labels["state"], sample.labels.get("pid", ""))] = sample.value
    return ages


def test_every_workers_state_age_is_reported_by_a_scrape_of_any_worker(tmp_path: Path) -> None:
    import json

    pids, exposition = run_with_metrics_in(tmp_path, AGES_SCRIPT)
    processes = json.loads(pids)
    scraper, (first, second) = str(processes["scraper"]), map(str, processes["workers"])

    ages = ages_by_pid(exposition)
    assert set(ages) == {
        ("policies", scraper),
        ("keyring", scraper),
        ("policies", first),
        ("policies", second),
    }  # the worker that exited is not reported
    # Computed at the scrape from each worker's load time: a few ms later than recorded.
    assert 2.0 <= ages[("policies", scraper)] < 4.0
    assert 5.0 <= ages[("policies", first)] < 7.0
    assert 7.0 <= ages[("policies", second)] < 9.0
    assert ages[("keyring", scraper)] == float("inf")
    assert "# TYPE sidecar_state_age_seconds gauge" in exposition
    assert "sidecar_state_loaded_timestamp_seconds{" in exposition


def test_state_age_over_http_follows_loads_and_invalidations(services: Any) -> None:
    from sidecar.web.app import create_app

    client = create_app(services.settings, services).test_client()
    services.start_background()

    def ages() -> dict[tuple[str, str], float]:
        response = client.get("/metrics")
        assert response.status_code == 200
        return ages_by_pid(response.get_data(as_text=True))

    services.policies.invalidate()
    services.keyring.invalidate()
    assert ages() == {("policies", ""): float("inf"), ("keyring", ""): float("inf")}

    services.policies.get()
    services.keyring.get()
    loaded = ages()
    assert 0.0 <= loaded[("policies", "")] < 2.0
    assert 0.0 <= loaded[("keyring", "")] < 2.0

    services.policies.invalidate()  # a change announced, not yet reloaded
    assert ages()[("policies", "")] == float("inf")


# --- the operators' signals -----------------------------------------------------------------------


def test_rate_limit_refusals_audit_queue_jwks_fetches_and_build_info_are_exposed(
    config: dict[str, Any],
) -> None:
    import platform

    from prometheus_client.parser import text_string_to_metric_families

    from sidecar import __version__
    from sidecar.config import settings_from_mapping
    from sidecar.web.app import create_app
    from tests.conftest import GATEWAY_SECRET, make_services
    from tests.conftest import TestIdP as IdP

    config["rate_limit"] = {"per_second": 0.01, "burst": 1}
    idp = IdP(Path(config["trusted_issuers"][0]["jwks_file"]).parent)
    services = make_services(settings_from_mapping(config, env={}))
    app = create_app(services.settings, services)
    client = app.test_client()
    form = {
        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
        "subject_token": idp.token(),
        "subject_token_type": "urn:ietf:params:oauth:token-type:access_token",
        "audience": "https://code-search.internal/mcp",
    }
    try:
        statuses = [
            client.post("/token", data=form, auth=("gateway", GATEWAY_SECRET)).status_code
            for _ in range(2)
        ]
        assert services.audit.flush()
        text = client.get("/metrics").get_data(as_text=True)
    finally:
        services.close()

    assert statuses == [200, 429]
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    assert samples[("sidecar_rate_limit_refusals_total", (("client", "gateway"),))] == 1
    assert samples[("sidecar_jwks_fetches_total", (("issuer", idp.issuer), ("outcome", "ok")))] >= 1
    assert ("sidecar_audit_queue_depth", ()) in samples
    assert ("sidecar_audit_write_failures_total", ()) in samples
    build = (("python", platform.python_version()), ("version", __version__))
    assert samples[("sidecar_build_info", build)] == 1
