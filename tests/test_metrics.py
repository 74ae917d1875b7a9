"""Metrics in prometheus_client's multiprocess mode, as `sidecar serve` runs them: each process
writes its own file, and a scrape of any process reports the sum over all of them."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

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


def test_counts_of_a_forked_process_go_to_its_own_file_and_are_summed(tmp_path: Path) -> None:
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    child, _, exposition = done.stdout.partition("\n")

    files = {path.name for path in tmp_path.iterdir()}
    assert f"counter_{child}.db" in files
    assert len([name for name in files if name.startswith("counter_")]) == 2  # parent, child
    assert 'sidecar_token_requests_total{error="",outcome="granted"} 3.0' in exposition
    assert "sidecar_token_request_seconds_count 2.0" in exposition
    assert 'sidecar_token_request_seconds_bucket{le="0.002"} 2.0' in exposition
