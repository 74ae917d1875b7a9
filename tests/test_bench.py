"""`make bench` (bench/): the benchmark in a short smoke mode, and its load generators' counting.

Never a speed: only that the benchmark produced numbers for both servers, with zero errors,
and stopped what it started.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from bench import fixtures, load
from bench.baseline_app import create_app
from bench.servers import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
SMOKE_ARGS = [
    "--duration", "1", "--warmup", "0", "--connections", "2",
    "--tokens", "30", "--clients", "3", "--policies-per-client", "2",
]  # fmt: skip


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One short `python -m bench.run`, as `make bench` runs it; its --json results."""
    output = tmp_path_factory.mktemp("bench") / "results.json"
    completed = subprocess.run(
        [sys.executable, "-m", "bench.run", *SMOKE_ARGS, "--json", str(output)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    results: dict[str, Any] = json.loads(output.read_text())
    results["stdout"] = completed.stdout
    return results


@pytest.mark.parametrize("server", ["baseline", "service"])
def test_smoke_run_measures_both_servers_with_zero_errors(
    smoke: dict[str, Any], server: str
) -> None:
    (run,) = smoke["uncached"][server]["runs"]
    assert run["connections"] == 2
    assert run["requests"] > 0
    assert run["requests_per_s"] > 0
    for name in ("p50_ms", "p99_ms", "p999_ms"):
        assert math.isfinite(run[name])
        assert run[name] > 0
    assert run["p50_ms"] <= run["p99_ms"] <= run["p999_ms"]
    assert run["errors"] == run["non2xx"] == run["socket_errors"] == 0


@pytest.mark.parametrize("server", ["baseline", "service"])
def test_smoke_run_reports_peak_rss_of_each_worker(smoke: dict[str, Any], server: str) -> None:
    peaks = smoke["uncached"][server]["peak_rss_mib_per_worker"]
    assert len(peaks) == 2  # --workers 2, the default
    assert all(peak > 0 for peak in peaks)


def test_smoke_run_reports_the_ratio_machine_and_configuration(smoke: dict[str, Any]) -> None:
    assert smoke["throughput_ratio"]["2"] > 0
    assert isinstance(smoke["cores"], int)
    assert smoke["cores"] > 0
    assert smoke["date"]
    assert smoke["other_processes_cpu_share"] >= 0
    assert smoke["configuration"]["policies"] == 6
    assert smoke["cached"].startswith("not implemented yet")
    table = smoke["stdout"]
    assert "req/s" in table
    assert "p99.9 ms" in table
    assert "peak RSS per worker" in table
    assert "CPU used by other processes" in table
    assert "cached path: not implemented yet" in table


@pytest.mark.parametrize("server", ["baseline", "service"])
def test_smoke_run_stops_every_process_it_started(smoke: dict[str, Any], server: str) -> None:
    measured = smoke["uncached"][server]
    pids = [measured["master_pid"], *measured["worker_pids"]]
    assert len(pids) == 3
    assert [pid for pid in pids if Path(f"/proc/{pid}").exists()] == []


# --- the baseline app -------------------------------------------------------------------------


@pytest.fixture
def baseline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, list[str]]:
    """The baseline app (Flask test client) and the bodies generated for it."""
    generated = fixtures.generate(
        tmp_path, fixtures.Sizes(tokens=2, clients=1, policies_per_client=1)
    )
    for name, value in generated.baseline_env.items():
        monkeypatch.setenv(name, value)
    return create_app().test_client(), generated.bodies.read_text().splitlines()


def test_baseline_verifies_the_subject_token_and_signs_an_es256_token(
    baseline: tuple[Any, list[str]], tmp_path: Path
) -> None:
    client, bodies = baseline
    response = client.post("/token", data=bodies[0], content_type=fixtures.FORM)
    assert response.status_code == 200
    token = response.get_json()["access_token"]
    signing_key = load_pem_private_key((tmp_path / "baseline-signing.pem").read_bytes(), None)
    claims = jwt.decode(
        token,
        signing_key.public_key(),  # type: ignore[arg-type]
        algorithms=["ES256"],
        audience=fixtures.upstream(0),
    )
    assert claims["sub"] == "user-00000@bench.example"


def test_baseline_refuses_a_subject_token_with_a_bad_signature(
    baseline: tuple[Any, list[str]],
) -> None:
    client, bodies = baseline
    # One character in the middle of the signature changed: the baseline really verifies it.
    body = bodies[0]
    start = body.index("subject_token=") + len("subject_token=")
    end = body.index("&", start)
    token = body[start:end]
    middle = token.rindex(".") + 100
    tampered = token[:middle] + ("A" if token[middle] != "A" else "B") + token[middle + 1 :]
    response = client.post(
        "/token", data=body[:start] + tampered + body[end:], content_type=fixtures.FORM
    )
    assert response.status_code == 400
    assert response.get_json() == {"error": "invalid_request"}


# --- the load generators --------------------------------------------------------------------


class _Answers(BaseHTTPRequestHandler):
    """200 to a body of `ok=1`, 401 to anything else; keep-alive HTTP/1.1."""

    protocol_version = "HTTP/1.1"
    # Headers and body leave in two writes: without this, each keep-alive answer waits ~40 ms
    # for the client's delayed ACK.
    disable_nagle_algorithm = True

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        status = 200 if body == b"ok=1" else 401
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def answering_port() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Answers)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02})
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
def alternating_bodies(tmp_path: Path) -> Path:
    path = tmp_path / "bodies.txt"
    path.write_text("ok=1\nbad=1\n")
    return path


def test_python_generator_counts_every_non_2xx_response_as_an_error(
    answering_port: int, alternating_bodies: Path
) -> None:
    result = load.run_python(
        port=answering_port,
        bodies=alternating_bodies,
        auth_header="Basic eDp5",
        connections=1,
        duration=0.3,
    )
    assert result.requests > 1
    # One connection sends the bodies in turn: ok, bad, ok, bad...
    assert result.non2xx == result.requests // 2
    assert result.socket_errors == 0
    assert result.errors == result.non2xx


def test_python_generator_counts_refused_connections_as_errors(
    alternating_bodies: Path,
) -> None:
    result = load.run_python(
        port=free_port(), bodies=alternating_bodies, auth_header="", connections=2, duration=0.1
    )
    assert result.requests == 0
    assert result.socket_errors > 0
    assert result.errors == result.socket_errors


@pytest.mark.skipif(load.wrk_path() is None, reason="wrk is not installed (`make bench` adds it)")
def test_wrk_counts_every_4xx_response_as_an_error(
    answering_port: int, alternating_bodies: Path, tmp_path: Path
) -> None:
    result = load.run_wrk(
        port=answering_port,
        bodies=alternating_bodies,
        auth_header="Basic eDp5",
        connections=1,
        duration=1,
        threads=1,
        script_dir=tmp_path,
    )
    assert result.requests > 1
    # The bodies alternate (which comes first is wrk's business): half the answers, rounded.
    assert result.non2xx in (result.requests // 2, (result.requests + 1) // 2)
    assert result.socket_errors == 0
    assert math.isfinite(result.p999_ms)


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 1001)]
    assert load.percentile(values, 50) == 500
    assert load.percentile(values, 99) == 990
    assert load.percentile(values, 99.9) == 999
    assert load.percentile(values, 100) == 1000
    assert math.isnan(load.percentile([], 50))
