"""The load generators: wrk (Debian's package) when it is installed, else a Python one.

Both send the same requests: POST /token with the forms of the bodies file, taken round-robin,
each connection its own slice of them, so a subject token comes back only once every
``len(bodies)`` requests. Both count every socket error and timeout as an error, and both
target 127.0.0.1 only. The Python generator counts every response that is not 2xx as an
error; wrk, every status of 400 or above (its own count: a Lua ``response()`` hook would check
for 2xx exactly but makes wrk hand every response to Lua, which cost about 8% of the servers'
throughput on two cores). Neither server answers a POST with 1xx or 3xx.

:func:`send_each` is not a measurement: it sends every body exactly once (the cached path's
priming pass, see bench/run.py).
"""

from __future__ import annotations

import http.client
import json
import math
import random
import shutil
import subprocess
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HOST = "127.0.0.1"
PATH = "/token"
REQUEST_TIMEOUT = 10.0
# A bound on the requests of one Python connection per second of the run, whatever happens.
MAX_REQUESTS_PER_SECOND = 50_000
_RESULT_MARK = "BENCH_RESULT "

# Each wrk thread takes every n-th body from the file, starting at its own index, and cycles
# through them; done() reports the numbers as one JSON line.
WRK_SCRIPT = r"""
local counter = 0

function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
end

function init(args)
  local path, auth, nthreads = args[1], args[2], tonumber(args[3])
  local headers = {["Content-Type"] = "application/x-www-form-urlencoded"}
  if auth ~= nil and auth ~= "" then headers["Authorization"] = auth end
  reqs = {}
  local line_number = 0
  for line in io.lines(path) do
    if #line > 0 then
      if line_number % nthreads == id then
        reqs[#reqs + 1] = wrk.format("POST", "/token", headers, line)
      end
      line_number = line_number + 1
    end
  end
  position = 0
end

function request()
  position = position % #reqs + 1
  return reqs[position]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests": %d, "duration_us": %d, "status_errors": %d, ' ..
    '"socket_errors": %d, "p50_us": %f, "p99_us": %f, "p999_us": %f}\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
"""


@dataclass(frozen=True)
class LoadResult:
    connections: int
    duration_s: float
    requests: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    p999_ms: float
    non2xx: int
    socket_errors: int

    @property
    def errors(self) -> int:
        return self.non2xx + self.socket_errors

    def as_dict(self) -> dict[str, float | int]:
        return {**asdict(self), "errors": self.errors}


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (``q`` in 0-100)."""
    if not sorted_values:
        return math.nan
    # Rounded first: 99.9 / 100 * 1000 is 999.0000000000001 in floating point.
    rank = math.ceil(round(q / 100 * len(sorted_values), 6))
    return sorted_values[min(len(sorted_values) - 1, max(0, rank - 1))]


def wrk_path() -> str | None:
    return shutil.which("wrk")


def wrk_version() -> str:
    path = wrk_path()
    if path is None:
        return "none"
    # `wrk -v` prints its version on the first line (and exits 1: it is the usage text).
    output = subprocess.run([path, "-v"], capture_output=True, text=True, check=False).stdout
    first = output.splitlines()[0] if output else "wrk"
    return " ".join(first.split()[:2])


def read_bodies(path: Path) -> list[bytes]:
    return [line.encode() for line in path.read_text().splitlines() if line]


def run_wrk(
    *,
    port: int,
    bodies: Path,
    auth_header: str,
    connections: int,
    duration: float,
    threads: int,
    script_dir: Path,
) -> LoadResult:
    path = wrk_path()
    if path is None:
        raise RuntimeError("wrk is not installed")
    script = script_dir / "bench.lua"
    script.write_text(WRK_SCRIPT)
    threads = max(1, min(threads, connections))
    seconds = max(1, round(duration))  # wrk takes whole seconds
    command = [
        path, "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s",
        "--timeout", f"{REQUEST_TIMEOUT:.0f}s", "-s", str(script), f"http://{HOST}:{port}{PATH}",
        "--", str(bodies), auth_header, str(threads),
    ]  # fmt: skip
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=seconds + 60, check=False
    )
    lines = [line for line in completed.stdout.splitlines() if line.startswith(_RESULT_MARK)]
    if completed.returncode != 0 or not lines:
        raise RuntimeError(f"wrk failed ({completed.returncode}):\n{completed.stderr}")
    numbers = json.loads(lines[-1][len(_RESULT_MARK) :])
    elapsed = numbers["duration_us"] / 1e6
    return LoadResult(
        connections=connections,
        duration_s=round(elapsed, 3),
        requests=numbers["requests"],
        requests_per_s=numbers["requests"] / elapsed if elapsed else 0.0,
        p50_ms=numbers["p50_us"] / 1000,
        p99_ms=numbers["p99_us"] / 1000,
        p999_ms=numbers["p999_us"] / 1000,
        non2xx=numbers["status_errors"],
        socket_errors=numbers["socket_errors"],
    )


@dataclass
class _Tally:
    latencies: list[float]
    non2xx: int = 0
    socket_errors: int = 0


def _drive(
    port: int,
    bodies: list[bytes],
    headers: dict[str, str],
    start: threading.Barrier,
    deadline: list[float],
    limit: int,
    tally: _Tally,
) -> None:
    """One keep-alive connection: requests back to back until the deadline (or ``limit``)."""
    connection = http.client.HTTPConnection(HOST, port, timeout=REQUEST_TIMEOUT)
    position = 0
    start.wait()
    try:
        while time.perf_counter() < deadline[0] and len(tally.latencies) < limit:
            body = bodies[position]
            position = (position + 1) % len(bodies)
            began = time.perf_counter()
            try:
                # http.client reconnects by itself after a response that closed the connection.
                connection.request("POST", PATH, body=body, headers=headers)
                response = connection.getresponse()
                response.read()
            except (OSError, http.client.HTTPException):
                tally.socket_errors += 1
                connection.close()
                continue
            tally.latencies.append(time.perf_counter() - began)
            if not 200 <= response.status < 300:
                tally.non2xx += 1
    finally:
        connection.close()


def run_python(
    *,
    port: int,
    bodies: Path,
    auth_header: str,
    connections: int,
    duration: float,
) -> LoadResult:
    """Threads, one keep-alive connection each; slower than wrk, and it shares the CPU."""
    all_bodies = read_bodies(bodies)
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if auth_header:
        headers["Authorization"] = auth_header
    start = threading.Barrier(connections + 1)
    deadline = [math.inf]  # set once every thread is ready
    limit = max(1, int(duration * MAX_REQUESTS_PER_SECOND))
    tallies = [_Tally(latencies=[]) for _ in range(connections)]
    # Connection i sends bodies i, i + n, i + 2n...: together, each body once per cycle.
    slices = [all_bodies[i::connections] or all_bodies for i in range(connections)]
    workers = [
        threading.Thread(
            target=_drive,
            args=(port, slices[i], headers, start, deadline, limit, tallies[i]),
            daemon=True,
        )
        for i in range(connections)
    ]
    for worker in workers:
        worker.start()
    began = time.perf_counter()
    deadline[0] = began + duration
    start.wait()
    for worker in workers:
        worker.join(duration + REQUEST_TIMEOUT + 5)
    elapsed = time.perf_counter() - began
    latencies = sorted(value for tally in tallies for value in tally.latencies)
    requests = len(latencies)  # answered requests, 2xx or not, as wrk counts them
    return LoadResult(
        connections=connections,
        duration_s=round(elapsed, 3),
        requests=requests,
        requests_per_s=requests / elapsed if elapsed else 0.0,
        p50_ms=percentile(latencies, 50) * 1000,
        p99_ms=percentile(latencies, 99) * 1000,
        p999_ms=percentile(latencies, 99.9) * 1000,
        non2xx=sum(tally.non2xx for tally in tallies),
        socket_errors=sum(tally.socket_errors for tally in tallies),
    )


@dataclass(frozen=True)
class PassResult:
    requests: int  # answered, 2xx or not
    errors: int  # non-2xx answers, socket errors and timeouts
    seconds: float


def send_each(
    *,
    port: int,
    bodies: list[bytes],
    auth_header: str,
    connections: int,
    rng: random.Random | None = None,
) -> PassResult:
    """Every body exactly once, in a shuffled order, over ``connections`` new keep-alive
    connections, all opened before the first request (each connection sends its own share of
    the bodies). New connections and a new order on each call: repeated calls reach every
    worker of a server with every body, whichever worker each connection lands on."""
    order = list(bodies)
    (rng or random.Random()).shuffle(order)
    connections = max(1, min(connections, len(order)))
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if auth_header:
        headers["Authorization"] = auth_header
    tallies = [[0, 0] for _ in range(connections)]  # answered, errors
    opened = threading.Barrier(connections + 1)

    def send(share: list[bytes], tally: list[int]) -> None:
        connection = http.client.HTTPConnection(HOST, port, timeout=REQUEST_TIMEOUT)
        try:
            try:
                connection.connect()
            except OSError:
                connection.close()  # the first request counts the error and retries
            opened.wait()
            for body in share:
                try:
                    connection.request("POST", PATH, body=body, headers=headers)
                    response = connection.getresponse()
                    response.read()
                except (OSError, http.client.HTTPException):
                    tally[1] += 1
                    connection.close()
                    continue
                tally[0] += 1
                if not 200 <= response.status < 300:
                    tally[1] += 1
        finally:
            connection.close()

    threads = [
        threading.Thread(target=send, args=(order[i::connections], tallies[i]), daemon=True)
        for i in range(connections)
    ]
    for thread in threads:
        thread.start()
    opened.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    return PassResult(
        requests=sum(t[0] for t in tallies),
        errors=sum(t[1] for t in tallies),
        seconds=time.perf_counter() - began,
    )
