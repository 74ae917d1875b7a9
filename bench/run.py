"""`make bench`: the real service against the baseline app, under the same load (issue 7).

In one run: generate an IdP key, distinct RS256 subject tokens and a realistic configuration
(SQLite, 50 clients, 500 policies, audit on, 2 workers) in two files that differ only in
``caches:`` (both disabled; the defaults, both enabled); migrate the database and apply the
policies; then, one server at a time, start, drive at 1, 16 and 64 connections for a fixed
duration, and stop:

- the baseline (bench/baseline_app.py, gunicorn, 2 sync workers);
- the uncached path: `sidecar serve` with both caches disabled, under granian (the default
  server) and gunicorn (its gthread worker, the supported alternative);
- the cached path: `sidecar serve` with the default caches, under the same two servers, first
  primed by passes that send every token once until every worker holds every token in both
  caches, so that what is measured is the steady state of gateways sending the same tokens again.

Prints one table per path (requests/s, p50, p99, p99.9, errors, the throughput ratio to the
baseline at the same connection count), the peak RSS per worker of every server, and the cache
hit rates of the measured runs (from ``sidecar_cache_lookups_total`` on /metrics, before and
after them); ``--json FILE`` writes everything.

    python -m bench.run [--duration 10] [--connections 1,16,64] [--json results.json]
                        [--servers baseline,granian,gunicorn] [--paths uncached,cached]
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

SERVERS = ("baseline", *servers.SERVICE_SERVERS)
PATHS = ("uncached", "cached")
# Priming of the cached path: at most this many passes over every token (see prime()).
MAX_PRIMING_PASSES = 40
# At least this many connections per priming pass, so that each pass reaches every worker.
MIN_PRIMING_CONNECTIONS = 16

Driver = Callable[[int, str, int, float], load.LoadResult]


def _choices(
    parser: argparse.ArgumentParser, option: str, value: str, allowed: Sequence[str]
) -> list[str]:
    chosen = {v.strip() for v in value.split(",") if v.strip()}
    if not chosen or chosen - set(allowed):
        parser.error(f"{option} takes a comma-separated list among {','.join(allowed)}")
    return [name for name in allowed if name in chosen]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run (10)")
    parser.add_argument(
        "--connections", default="1,16,64", help="comma-separated connection counts (1,16,64)"
    )
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first (2)")
    parser.add_argument(
        "--servers",
        default=",".join(SERVERS),
        help=f"comma-separated servers to measure, among {','.join(SERVERS)} (all)",
    )
    parser.add_argument(
        "--paths",
        default=",".join(PATHS),
        help="comma-separated paths of the service to measure, among uncached,cached (both)",
    )
    parser.add_argument("--tokens", type=int, default=1500, help="distinct subject tokens (1500)")
    parser.add_argument("--clients", type=int, default=50, help="configured clients (50)")
    parser.add_argument(
        "--policies-per-client", type=int, default=10, help="policies of each client (10)"
    )
    parser.add_argument("--workers", type=int, default=2, help="workers of each server (2)")
    parser.add_argument(
        "--threads", type=int, help="server.threads of the service (default: the product's)"
    )
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
    args.servers = _choices(parser, "--servers", args.servers, SERVERS)
    args.paths = _choices(parser, "--paths", args.paths, PATHS)
    if args.duration <= 0 or args.warmup < 0:
        parser.error("--duration must be positive and --warmup not negative")
    if min(args.tokens, args.clients, args.policies_per_client, args.workers) < 1:
        parser.error("--tokens, --clients, --policies-per-client and --workers must be >= 1")
    if args.generator == "wrk" and load.wrk_path() is None:
        parser.error("--generator wrk: wrk is not installed")
    if args.generator == "auto":
        args.generator = "wrk" if load.wrk_path() else "python"
    return args


def make_driver(args: argparse.Namespace, fixture: fixtures.Fixtures) -> Driver:
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


Lookups = dict[str, dict[str, int]]


def lookups_between(before: Lookups, after: Lookups) -> dict[str, dict[str, Any]]:
    """Each cache's hits, misses and hit rate (None without lookups) from two scrapes."""
    found: dict[str, dict[str, Any]] = {}
    for cache in servers.CACHES:
        hits = after[cache]["hit"] - before[cache]["hit"]
        misses = after[cache]["miss"] - before[cache]["miss"]
        lookups = hits + misses
        found[cache] = {
            "hits": hits,
            "misses": misses,
            "hit_rate": round(hits / lookups, 6) if lookups else None,
        }
    return found


def prime(
    server: servers.Server, fixture: fixtures.Fixtures, args: argparse.Namespace
) -> dict[str, Any]:
    """Passes that each send every body once, over new connections, until every worker holds
    every token in both caches. Each worker has its own caches, and a worker misses a token once
    in each (nothing is evicted or expires meanwhile: the caches hold more entries than there
    are tokens, and a minted token is reused for half its 120 s lifetime): so it is primed once
    each cache has counted tokens x workers misses. At most MAX_PRIMING_PASSES passes: if the
    server never sent some worker some token, the hit rates of the measured runs show it."""
    bodies = load.read_bodies(fixture.bodies)
    connections = max(MIN_PRIMING_CONNECTIONS, *args.connections)
    needed = len(bodies) * args.workers
    first = server.cache_lookups()
    passes = requests = errors = 0
    misses = dict.fromkeys(servers.CACHES, 0)
    began = time.monotonic()
    while passes < MAX_PRIMING_PASSES and min(misses.values()) < needed:
        sent = load.send_each(
            port=server.port,
            bodies=bodies,
            auth_header=fixture.auth_header,
            connections=connections,
        )
        passes, requests, errors = passes + 1, requests + sent.requests, errors + sent.errors
        now = server.cache_lookups()
        misses = {cache: now[cache]["miss"] - first[cache]["miss"] for cache in servers.CACHES}
    primed = min(misses.values()) >= needed
    seconds = time.monotonic() - began
    print(
        f"  {server.name}: primed with {passes} passes over {len(bodies)} tokens "
        f"({requests} requests, {errors} errors, {seconds:.1f}s)"
        + ("" if primed else f"; some worker still lacks some token after {passes} passes"),
        flush=True,
    )
    return {
        "passes": passes,
        "connections": connections,
        "requests": requests,
        "errors": errors,
        "seconds": round(seconds, 3),
        "misses": misses,  # of each cache, during the priming
        "misses_needed": needed,  # tokens x workers
        "primed": primed,
    }


def measure(
    server: servers.Server,
    fixture: fixtures.Fixtures,
    args: argparse.Namespace,
    drive: Driver,
    *,
    service: bool,
    cached: bool = False,
) -> dict[str, Any]:
    measured: dict[str, Any] = {}
    if cached:
        measured["priming"] = prime(server, fixture, args)
    if args.warmup > 0:
        drive(server.port, fixture.auth_header, max(args.connections), args.warmup)
    runs = []
    first = previous = server.cache_lookups() if service else None
    for connections in args.connections:
        print(f"  {server.name}: {connections} connection(s) for {args.duration:g}s", flush=True)
        run: dict[str, Any] = drive(
            server.port, fixture.auth_header, connections, args.duration
        ).as_dict()
        if previous is not None:
            now = server.cache_lookups()
            run["cache_lookups"] = lookups_between(previous, now)
            previous = now
        runs.append(run)
    measured.update(
        runs=runs,
        peak_rss_mib_per_worker=server.peak_rss_per_worker_mib(),
        master_pid=server.process.pid,
        worker_pids=server.worker_pids,
    )
    if first is not None and previous is not None:
        # The measured runs only: not the priming, not the warm-up.
        measured["cache_lookups"] = lookups_between(first, previous)
    return measured


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


def variants(args: argparse.Namespace, skipped: dict[str, str]) -> list[tuple[str, str | None]]:
    """(server, path) in the order they run; the baseline has no path."""
    planned: list[tuple[str, str | None]] = []
    if "baseline" in args.servers:
        planned.append(("baseline", None))
    for path in args.paths:
        planned.extend(
            (name, path)
            for name in servers.SERVICE_SERVERS
            if name in args.servers and name not in skipped
        )
    return planned


def add_ratios(results: dict[str, Any]) -> None:
    """Each service run's requests/s over the baseline's at the same connection count."""
    baseline = results.get("baseline")
    rates = (
        {run["connections"]: run["requests_per_s"] for run in baseline["runs"]} if baseline else {}
    )
    for path in PATHS:
        for measured in results[path].values():
            ratios = {}
            for run in measured["runs"]:
                rate = rates.get(run["connections"])
                run["vs_baseline"] = run["requests_per_s"] / rate if rate else None
                ratios[str(run["connections"])] = run["vs_baseline"]
            measured["throughput_ratio"] = ratios


def benchmark(args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    skipped: dict[str, str] = {}
    plan = variants(args, skipped)
    if not plan:
        raise RuntimeError("nothing to measure: " + "; ".join(skipped.values()))

    sizes = fixtures.Sizes(
        tokens=args.tokens,
        clients=args.clients,
        policies_per_client=args.policies_per_client,
        threads=args.threads,
    )
    print(f"generating {args.tokens} subject tokens and the configuration in {directory}")
    fixture = fixtures.generate(directory, sizes)
    servers.run_sidecar(fixture, "db", "upgrade")
    servers.run_sidecar(fixture, "policy", "apply", str(fixture.service_config))
    drive = make_driver(args, fixture)
    load_average = os.getloadavg()
    # Other processes on the machine take CPU from the servers: how much is reported.
    busy_before, own_before, began = machine_busy_seconds(), own_cpu_seconds(), time.monotonic()

    results: dict[str, Any] = {"baseline": None, "uncached": {}, "cached": {}}
    # One server at a time, so none takes CPU from another's measurement. The baseline ignores
    # client authentication; it is sent the same header all the same.
    for name, path in plan:
        label = name if path is None else f"{name} ({path})"
        print(f"starting {label}", flush=True)
        if path is None:
            server = servers.start_baseline(fixture, args.workers)
        else:
            server = servers.start_service(
                fixture, args.workers, server=name, cached=path == "cached"
            )
        try:
            measured = measure(
                server, fixture, args, drive, service=path is not None, cached=path == "cached"
            )
        finally:
            server.stop()
        if path is None:
            results["baseline"] = measured
        else:
            results[path][name] = measured

    elapsed = time.monotonic() - began
    others = (machine_busy_seconds() - busy_before) - (own_cpu_seconds() - own_before)
    others_share = max(0.0, others) / (elapsed * (os.cpu_count() or 1))
    add_ratios(results)
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "load_average_before": [round(v, 2) for v in load_average],
        "other_processes_cpu_share": round(others_share, 3),
        "generator": load.wrk_version() if args.generator == "wrk" else "python (http.client)",
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "servers": [name for name in args.servers if name not in skipped],
        "paths": args.paths,
        "skipped": skipped,
        "configuration": {
            "subject_tokens": args.tokens,
            "clients": args.clients,
            "policies": args.clients * args.policies_per_client,
            "workers": args.workers,
            "database": "sqlite",
            "client": fixture.client_id,
            "audience": fixture.audience,
            "caches": {
                "uncached": fixtures.NO_CACHES,
                "cached": "the defaults (both enabled)",
            },
        },
        **results,
    }


def _ms(value: float) -> str:
    return f"{value:.2f}"


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    return [
        "  ".join(
            [row[0].ljust(widths[0])]
            + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        )
        for row in [headers, *rows]
    ]


def _path_table(results: dict[str, Any], path: str | None) -> list[str]:
    """The baseline's rows and the path's, by connection count."""
    measured = [("baseline", results["baseline"])] if results["baseline"] else []
    if path is not None:
        measured.extend(results[path].items())
    rows = []
    for index in range(len(measured[0][1]["runs"])):
        for name, variant in measured:
            run = variant["runs"][index]
            ratio = run.get("vs_baseline")
            rows.append([
                name, str(run["connections"]), f"{run['requests_per_s']:.0f}",
                _ms(run["p50_ms"]), _ms(run["p99_ms"]), _ms(run["p999_ms"]), str(run["errors"]),
                "-" if name == "baseline" else (f"{ratio:.2f}x" if ratio is not None else "n/a"),
            ])  # fmt: skip
    headers = ["server", "conns", "req/s", "p50 ms", "p99 ms", "p99.9 ms", "errors", "vs base"]
    return _table(headers, rows)


def _hit_rates(lookups: dict[str, dict[str, Any]]) -> str:
    parts = []
    for cache in servers.CACHES:
        counted = lookups[cache]
        total = counted["hits"] + counted["misses"]
        rate = counted["hit_rate"]
        parts.append(
            f"{cache} {rate:.2%} ({counted['hits']}/{total})" if total else f"{cache} no lookups"
        )
    return ", ".join(parts)


def report(results: dict[str, Any]) -> str:
    config = results["configuration"]
    workers = config["workers"]
    servers_run = results["servers"]
    service_servers = [name for name in servers_run if name != "baseline"]
    lines = [
        "",
        f"token-exchange benchmark, {results['date']}, {results['cores']} cores, "
        f"Python {results['python']}, load average before "
        f"{' '.join(str(v) for v in results['load_average_before'])}",
        "CPU used by other processes during the measurements: "
        f"{results['other_processes_cpu_share']:.0%} of the machine",
        f"load generator: {results['generator']}, {results['duration_s']:g}s per run, "
        f"{results['warmup_s']:g}s warm-up",
    ]
    if service_servers:
        under = " and ".join(
            {
                "granian": "granian (the default server)",
                "gunicorn": "gunicorn (its gthread worker, the supported alternative)",
            }.get(name, name)
            for name in service_servers
        )
        lines.append(
            f"service: SQLite, {config['clients']} clients, {config['policies']} policies, "
            f"audit on, {workers} workers, under {under}"
        )
    if "baseline" in servers_run:
        lines.append(f"baseline: Flask + gunicorn, {workers} sync workers")
    lines.extend(f"skipped {name}: {reason}" for name, reason in results["skipped"].items())
    tokens = config["subject_tokens"]
    titles = {
        "uncached": f"uncached path (both caches disabled): {tokens} distinct RS256 subject "
        "tokens, round-robin",
        "cached": f"cached path (the default caches): the same {tokens} tokens, round-robin, "
        "after priming passes that sent every token to every worker (steady state: hits)",
    }
    paths = [path for path in results["paths"] if results[path]]
    for path in paths or ([None] if results["baseline"] else []):
        lines.append("")
        lines.append(titles[path] if path else f"{tokens} distinct RS256 subject tokens")
        lines.extend(_path_table(results, path))
    errors = "status >= 400" if results["generator"].startswith("wrk") else "non-2xx"
    lines.append(f"errors: {errors} answers + socket errors and timeouts")

    lines.append("")
    lines.append("peak RSS per worker (VmHWM):")
    measured = [("baseline", results["baseline"])] if results["baseline"] else []
    for path in paths:
        measured.extend((f"{name}, {path}", variant) for name, variant in results[path].items())
    for label, variant in measured:
        peaks = variant["peak_rss_mib_per_worker"]
        lines.append(f"  {label}: " + (", ".join(f"{p:.1f} MiB" for p in peaks) or "unknown"))

    if paths:
        lines.append("")
        lines.append(
            "cache hit rates of the measured runs, hits/(hits+misses) "
            "(sidecar_cache_lookups_total, all workers):"
        )
        for path in paths:
            for name, variant in results[path].items():
                lookups = variant["cache_lookups"]
                line = f"  {name}, {path}: {_hit_rates(lookups)}"
                if path == "uncached" and not any(
                    c["hits"] + c["misses"] for c in lookups.values()
                ):
                    line = f"  {name}, {path}: no lookups (both caches disabled)"
                if "priming" in variant:
                    priming = variant["priming"]
                    line += f"; primed in {priming['passes']} passes"
                    if not priming["primed"]:
                        line += " (not fully)"
                lines.append(line)
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
