"""`make bench` (bench/): the benchmark in a short smoke mode, and its parts.

Never a speed: only that the benchmark produced numbers for every variant (the baseline; the
service's uncached and cached paths under gunicorn and granian), with zero errors, that the
cached path hit its caches and the uncached one never looked them up, and that it stopped what
it started.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from bench import fixtures, load, run, servers
from bench.baseline_app import create_app
from bench.servers import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
SMOKE_ARGS = [
    "--duration", "1", "--warmup", "0", "--connections", "2",
    "--tokens", "30", "--clients", "3", "--policies-per-client", "2",
]  # fmt: skip
SERVICE_VARIANTS = [
    (path, server) for path in ("uncached", "cached") for server in ("granian", "gunicorn")
]
VARIANTS = [("baseline", None), *((server, path) for path, server in SERVICE_VARIANTS)]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One short `python -m bench.run`, as `make bench` runs it; its --json results."""
    output = tmp_path_factory.mktemp("bench") / "results.json"
    completed = subprocess.run(
        [sys.executable, "-m", "bench.run", *SMOKE_ARGS, "--json", str(output)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    results: dict[str, Any] = json.loads(output.read_text())
    results["stdout"] = completed.stdout
    return results


def measured(smoke: dict[str, Any], server: str, path: str | None) -> dict[str, Any]:
    """One variant's results; skips the test when the run skipped the server (no granian)."""
    if server in smoke["skipped"]:
        assert f"skipping {server}" in smoke["stdout"]
        pytest.skip(f"the benchmark skipped {server}: {smoke['skipped'][server]}")
    variant: dict[str, Any] = smoke["baseline"] if path is None else smoke[path][server]
    return variant


@pytest.mark.parametrize(("server", "path"), VARIANTS)
def test_smoke_run_measures_every_variant_with_zero_errors(
    smoke: dict[str, Any], server: str, path: str | None
) -> None:
    (run_,) = measured(smoke, server, path)["runs"]
    assert run_["connections"] == 2
    assert run_["requests"] > 0
    assert run_["requests_per_s"] > 0
    for name in ("p50_ms", "p99_ms", "p999_ms"):
        assert math.isfinite(run_[name])
        assert run_[name] > 0
    assert run_["p50_ms"] <= run_["p99_ms"] <= run_["p999_ms"]
    assert run_["errors"] == run_["non2xx"] == run_["socket_errors"] == 0
    if path is not None:
        assert run_["vs_baseline"] > 0
        assert measured(smoke, server, path)["throughput_ratio"] == {"2": run_["vs_baseline"]}


@pytest.mark.parametrize(("server", "path"), VARIANTS)
def test_smoke_run_reports_peak_rss_of_each_worker(
    smoke: dict[str, Any], server: str, path: str | None
) -> None:
    peaks = measured(smoke, server, path)["peak_rss_mib_per_worker"]
    assert len(peaks) == 2  # --workers 2, the default
    assert all(peak > 0 for peak in peaks)


@pytest.mark.parametrize("server", ["granian", "gunicorn"])
def test_smoke_run_uncached_path_never_looks_up_a_cache(smoke: dict[str, Any], server: str) -> None:
    uncached = measured(smoke, server, "uncached")
    assert "priming" not in uncached
    for cache in servers.CACHES:
        assert uncached["cache_lookups"][cache] == {"hits": 0, "misses": 0, "hit_rate": None}


@pytest.mark.parametrize("server", ["granian", "gunicorn"])
def test_smoke_run_cached_path_is_primed_and_hits_its_caches(
    smoke: dict[str, Any], server: str
) -> None:
    cached = measured(smoke, server, "cached")
    priming = cached["priming"]
    assert priming["errors"] == 0
    assert priming["requests"] == priming["passes"] * 30  # every token once per pass
    assert priming["primed"]
    assert priming["misses"] == dict.fromkeys(servers.CACHES, 30 * 2)  # tokens x workers
    lookups = cached["cache_lookups"]
    assert lookups["minted_tokens"]["hit_rate"] > 0
    assert lookups["subject_tokens"]["hit_rate"] > 0
    (run_,) = cached["runs"]
    # The window's lookups are the sum of the runs' (here, one run).
    assert run_["cache_lookups"] == lookups
    hits = lookups["minted_tokens"]["hits"]
    assert hits / (hits + lookups["minted_tokens"]["misses"]) == pytest.approx(
        lookups["minted_tokens"]["hit_rate"]
    )


def test_smoke_run_reports_the_machine_configuration_and_tables(smoke: dict[str, Any]) -> None:
    assert isinstance(smoke["cores"], int)
    assert smoke["cores"] > 0
    assert smoke["date"]
    assert smoke["other_processes_cpu_share"] >= 0
    assert smoke["configuration"]["policies"] == 6
    assert smoke["paths"] == ["uncached", "cached"]
    assert set(smoke["servers"]) | set(smoke["skipped"]) == {"baseline", "granian", "gunicorn"}
    table = smoke["stdout"]
    for expected in (
        "req/s",
        "p99.9 ms",
        "vs base",
        "uncached path (both caches disabled)",
        "cached path (the default caches)",
        "peak RSS per worker",
        "CPU used by other processes",
        "cache hit rates of the measured runs",
        "gunicorn, cached: subject_tokens",
        "gunicorn, uncached: no lookups (both caches disabled)",
    ):
        assert expected in table


@pytest.mark.parametrize(("server", "path"), VARIANTS)
def test_smoke_run_stops_every_process_it_started(
    smoke: dict[str, Any], server: str, path: str | None
) -> None:
    variant = measured(smoke, server, path)
    pids = [variant["master_pid"], *variant["worker_pids"]]
    assert len(pids) == 3
    assert [pid for pid in pids if Path(f"/proc/{pid}").exists()] == []


# --- options, configurations, processes and metrics ----------------------------------------


def test_servers_and_paths_options_choose_the_variants() -> None:
    args = run.parse_args(["--servers", "granian, baseline", "--paths", "cached"])
    assert args.servers == ["baseline", "granian"]
    assert args.paths == ["cached"]
    assert run.variants(args, skipped={}) == [("baseline", None), ("granian", "cached")]
    assert run.variants(args, skipped={"granian": "missing"}) == [("baseline", None)]
    every = run.parse_args([])
    assert every.servers == ["baseline", "granian", "gunicorn"]
    assert every.paths == ["uncached", "cached"]
    assert run.variants(every, skipped={}) == [
        ("baseline", None),
        ("granian", "uncached"),
        ("gunicorn", "uncached"),
        ("granian", "cached"),
        ("gunicorn", "cached"),
    ]


@pytest.mark.parametrize(
    "argv", [["--servers", "nginx"], ["--servers", ""], ["--paths", "warm"], ["--paths", ","]]
)
def test_servers_and_paths_options_refuse_unknown_names(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        run.parse_args(argv)
    assert exited.value.code == 2


def test_uncached_configuration_differs_only_in_its_caches(tmp_path: Path) -> None:
    generated = fixtures.generate(
        tmp_path, fixtures.Sizes(tokens=1, clients=2, policies_per_client=1)
    )
    cached = yaml.safe_load(generated.service_config.read_text())
    uncached = yaml.safe_load(generated.uncached_config.read_text())
    assert "caches" not in cached  # the defaults: both enabled
    assert uncached.pop("caches") == {
        "subject_tokens": {"enabled": False},
        "minted_tokens": {"enabled": False},
    }
    assert uncached == cached


def test_cache_lookups_are_read_from_the_metrics_text() -> None:
    text = (
        "# TYPE sidecar_cache_lookups_total counter\n"
        'sidecar_cache_lookups_total{cache="subject_tokens",result="hit"} 12.0\n'
        'sidecar_cache_lookups_total{result="miss",cache="subject_tokens"} 3.0\n'
        'sidecar_cache_lookups_total{cache="minted_tokens",result="hit"} 1e3\n'
        'sidecar_cache_lookups_created{cache="minted_tokens",result="hit"} 1.7e9\n'
        'sidecar_exchanges_total{outcome="granted"} 99.0\n'
    )
    assert servers.parse_cache_lookups(text) == {
        "subject_tokens": {"hit": 12, "miss": 3},
        "minted_tokens": {"hit": 1000, "miss": 0},
    }
    assert servers.parse_cache_lookups("") == {
        "subject_tokens": {"hit": 0, "miss": 0},
        "minted_tokens": {"hit": 0, "miss": 0},
    }


def test_lookups_between_two_scrapes_give_the_hit_rate() -> None:
    before = {"subject_tokens": {"hit": 10, "miss": 5}, "minted_tokens": {"hit": 0, "miss": 0}}
    after = {"subject_tokens": {"hit": 40, "miss": 15}, "minted_tokens": {"hit": 0, "miss": 0}}
    assert run.lookups_between(before, after) == {
        "subject_tokens": {"hits": 30, "misses": 10, "hit_rate": 0.75},
        "minted_tokens": {"hits": 0, "misses": 0, "hit_rate": None},
    }


# A master with, below it, a Python process that has a Python child of its own (as the granian
# master below `sidecar serve` has its workers), a helper of multiprocessing and a process that
# is not Python: the workers are the Python processes with no Python process below them.
_TREE = r"""
import subprocess, sys, time
sleep = "import time; time.sleep(60)"
worker = (
    "import subprocess, sys, time\n"
    f"subprocess.Popen([sys.executable, '-c', {sleep!r}])\n"
    "time.sleep(60)"
)
helper = "import time; 'multiprocessing.resource_tracker'; time.sleep(60)"
subprocess.Popen([sys.executable, "-c", worker])
subprocess.Popen([sys.executable, "-c", helper])
subprocess.Popen(["sleep", "60"])
time.sleep(60)
"""


def test_workers_are_the_innermost_python_processes_below_the_master() -> None:
    master = subprocess.Popen([sys.executable, "-c", _TREE], start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while len(servers.descendants_of(master.pid)) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        below = servers.descendants_of(master.pid)
        assert len(below) == 4
        workers = servers.workers_of(master.pid)
        assert len(workers) == 1
        assert master.pid not in workers
        (worker,) = workers
        assert servers.descendants_of(worker) == []  # the innermost Python process
        commands = {pid: Path(f"/proc/{pid}/cmdline").read_bytes() for pid in below}
        assert all(b"resource_tracker" not in commands[pid] for pid in workers)
        assert all(not commands[pid].startswith(b"sleep") for pid in workers)
    finally:
        os.killpg(master.pid, signal.SIGKILL)
        master.wait(10)


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


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # wrk resets its connections when its run ends: not worth a traceback on stderr.
        if not isinstance(sys.exc_info()[1], ConnectionResetError):
            super().handle_error(request, client_address)


@pytest.fixture
def answering_port() -> Iterator[int]:
    server = _QuietServer(("127.0.0.1", 0), _Answers)
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


def test_send_each_sends_every_body_exactly_once(answering_port: int) -> None:
    bodies = [b"ok=1"] * 7 + [b"bad=1"] * 3
    sent = load.send_each(
        port=answering_port, bodies=bodies, auth_header="Basic eDp5", connections=4
    )
    assert sent.requests == 10
    assert sent.errors == 3  # the three 401s
    assert sent.seconds >= 0
