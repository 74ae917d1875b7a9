"""`make bench`: the real service against the baseline app, under the same load (issue 7).

In one run: generate an IdP key, distinct RS256 subject tokens and a realistic configuration
(SQLite, 50 clients, 500 policies, audit on, 2 workers); migrate it and apply the policies;
then, one server at a time, start the baseline (bench/baseline_app.py, gunicorn, 2 sync workers)
and the service (`sidecar serve`, deploy/gunicorn.conf.py), drive each at 1, 16 and 64
connections for a fixed duration, and stop it. Prints requests/s, p50, p99, p99.9, errors, the
service/baseline throughput ratio and the peak RSS per worker; ``--json FILE`` writes them.

    python -m bench.run [--duration 10] [--connections 1,16,64] [--json results.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/run.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import fixtures, load, servers

CACHED_PATH = "not implemented yet (the subject-token and minted-token caches do not exist yet)"
SERVERS = ("baseline", "service")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run (10)")
    parser.add_argument(
        "--connections", default="1,16,64", help="comma-separated connection counts (1,16,64)"
    )
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first (2)")
    parser.add_argument("--tokens", type=int, default=1500, help="distinct subject tokens (1500)")
    parser.add_argument("--clients", type=int, default=50, help="configured clients (50)")
    parser.add_argument(
        "--policies-per-client", type=int, default=10, help="policies of each client (10)"
    )
    parser.add_argument("--workers", type=int, default=2, help="workers of each server (2)")
    parser.add_argument(
        "--generator",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="load generator: wrk if installed (auto), or the Python one",
    )
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    try:
        args.connections = [int(c) for c in args.connections.split(",") if c.strip()]
    except ValueError:
        parser.error("--connections must be comma-separated integers")
    if not args.connections or min(args.connections) < 1:
        parser.error("--connections must be positive")
    if args.duration <= 0 or args.warmup < 0:
        parser.error("--duration must be positive and --warmup not negative")
    if min(args.tokens, args.clients, args.policies_per_client, args.workers) < 1:
        parser.error("--tokens, --clients, --policies-per-client and --workers must be >= 1")
    if args.generator == "wrk" and load.wrk_path() is None:
        parser.error("--generator wrk: wrk is not installed")
    if args.generator == "auto":
        args.generator = "wrk" if load.wrk_path() else "python"
    return args


def make_driver(
    args: argparse.Namespace, fixture: fixtures.Fixtures
) -> Callable[[int, str, int, float], load.LoadResult]:
    """(port, auth header, connections, seconds) -> the result, with the chosen generator."""

    def drive(port: int, auth_header: str, connections: int, duration: float) -> load.LoadResult:
        if args.generator == "wrk":
            return load.run_wrk(
                port=port,
                bodies=fixture.bodies,
                auth_header=auth_header,
                connections=connections,
                duration=duration,
                threads=os.cpu_count() or 1,
                script_dir=fixture.directory,
            )
        return load.run_python(
            port=port,
            bodies=fixture.bodies,
            auth_header=auth_header,
            connections=connections,
            duration=duration,
        )

    return drive


def measure(
    server: servers.Server,
    auth_header: str,
    args: argparse.Namespace,
    drive: Callable[[int, str, int, float], load.LoadResult],
) -> dict[str, Any]:
    if args.warmup > 0:
        drive(server.port, auth_header, max(args.connections), args.warmup)
    runs = []
    for connections in args.connections:
        print(f"  {server.name}: {connections} connection(s) for {args.duration:g}s", flush=True)
        runs.append(drive(server.port, auth_header, connections, args.duration).as_dict())
    return {
        "runs": runs,
        "peak_rss_mib_per_worker": server.peak_rss_per_worker_mib(),
        "master_pid": server.process.pid,
        "worker_pids": server.worker_pids,
    }


def machine_busy_seconds() -> float:
    """CPU seconds every process of the machine has used since boot (/proc/stat)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    # user, nice, system: time charged to processes (interrupt and steal time are left out,
    # since loopback traffic's softirq time is charged to no process).
    busy = sum(int(v) for v in fields[:3])
    return busy / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process and of every child it has waited for (the servers, wrk)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def benchmark(args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    sizes = fixtures.Sizes(
        tokens=args.tokens,
        clients=args.clients,
        policies_per_client=args.policies_per_client,
    )
    print(f"generating {args.tokens} subject tokens and the configuration in {directory}")
    fixture = fixtures.generate(directory, sizes)
    servers.run_sidecar(fixture, "db", "upgrade")
    servers.run_sidecar(fixture, "policy", "apply", str(fixture.service_config))
    drive = make_driver(args, fixture)
    load_average = os.getloadavg()
    # Other processes on the machine take CPU from the servers: how much is reported.
    busy_before, own_before, began = machine_busy_seconds(), own_cpu_seconds(), time.monotonic()

    results: dict[str, Any] = {}
    starters = {"baseline": servers.start_baseline, "service": servers.start_service}
    # One server at a time, so neither takes CPU from the other's measurement. The baseline
    # ignores client authentication; it is sent the same header all the same.
    for name in SERVERS:
        print(f"starting the {name}", flush=True)
        server = starters[name](fixture, args.workers)
        try:
            results[name] = measure(server, fixture.auth_header, args, drive)
        finally:
            server.stop()

    elapsed = time.monotonic() - began
    others = (machine_busy_seconds() - busy_before) - (own_cpu_seconds() - own_before)
    others_share = max(0.0, others) / (elapsed * (os.cpu_count() or 1))

    ratios = {}
    for base, service in zip(results["baseline"]["runs"], results["service"]["runs"], strict=True):
        rate = base["requests_per_s"]
        ratios[str(base["connections"])] = service["requests_per_s"] / rate if rate else None
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "load_average_before": [round(v, 2) for v in load_average],
        "other_processes_cpu_share": round(others_share, 3),
        "generator": load.wrk_version() if args.generator == "wrk" else "python (http.client)",
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "configuration": {
            "subject_tokens": args.tokens,
            "clients": args.clients,
            "policies": args.clients * args.policies_per_client,
            "workers": args.workers,
            "database": "sqlite",
            "client": fixture.client_id,
            "audience": fixture.audience,
        },
        "uncached": results,
        "throughput_ratio": ratios,
        "cached": CACHED_PATH,
    }


def _ms(value: float) -> str:
    return f"{value:.2f}"


def report(results: dict[str, Any]) -> str:
    config = results["configuration"]
    lines = [
        "",
        f"token-exchange benchmark, {results['date']}, {results['cores']} cores, "
        f"Python {results['python']}, load average before "
        f"{' '.join(str(v) for v in results['load_average_before'])}",
        "CPU used by other processes during the measurements: "
        f"{results['other_processes_cpu_share']:.0%} of the machine",
        f"load generator: {results['generator']}, {results['duration_s']:g}s per run, "
        f"{results['warmup_s']:g}s warm-up",
        f"service: SQLite, {config['clients']} clients, {config['policies']} policies, audit on, "
        f"{config['workers']} workers (deploy/gunicorn.conf.py); baseline: Flask + gunicorn, "
        f"{config['workers']} sync workers",
        "",
        f"uncached path: {config['subject_tokens']} distinct RS256 subject tokens, round-robin",
    ]
    headers = ["server", "conns", "req/s", "p50 ms", "p99 ms", "p99.9 ms", "errors", "vs base"]
    rows = []
    uncached = results["uncached"]
    for index in range(len(uncached["baseline"]["runs"])):
        for name in SERVERS:
            run = uncached[name]["runs"][index]
            ratio = results["throughput_ratio"][str(run["connections"])]
            rows.append([
                name, str(run["connections"]), f"{run['requests_per_s']:.0f}",
                _ms(run["p50_ms"]), _ms(run["p99_ms"]), _ms(run["p999_ms"]), str(run["errors"]),
                "-" if name == "baseline" else (f"{ratio:.2f}x" if ratio is not None else "n/a"),
            ])  # fmt: skip
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    for row in [headers, *rows]:
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells))
    errors = "status >= 400" if results["generator"].startswith("wrk") else "non-2xx"
    lines.append(f"errors: {errors} answers + socket errors and timeouts")
    lines.append("")
    lines.append("peak RSS per worker (VmHWM):")
    for name in SERVERS:
        peaks = uncached[name]["peak_rss_mib_per_worker"]
        lines.append(f"  {name}: " + (", ".join(f"{p:.1f} MiB" for p in peaks) or "unknown"))
    lines.append("")
    lines.append(f"cached path: {results['cached']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    directory = Path(tempfile.mkdtemp(prefix="sidecar-bench-"))
    try:
        results = benchmark(args, directory)
    except (servers.ServerError, RuntimeError) as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"kept {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    started = time.monotonic()
    status = main()
    print(f"(benchmark took {time.monotonic() - started:.0f}s)")
    sys.exit(status)
