"""gunicorn settings for `sidecar serve` (CLI --bind / --workers override bind / workers)."""

import os

bind = ["127.0.0.1:8080"]
workers = 2
# gunicorn's asyncio worker, /token answered on its event loop (sidecar/web/asgi.py), with new
# connections going to the worker holding the fewest (sidecar/worker.py). It keeps connections
# alive between a gateway's calls; sync workers would close each one. The thread-per-request
# alternative, measured slower in `make bench`: "sidecar.worker.BalancedThreadWorker" (gthread,
# with `threads`).
worker_class = "sidecar.worker.BalancedAsgiWorker"
threads = 4  # gthread only: the asyncio worker's pool (Flask paths) has 4 threads of its own
keepalive = 15
timeout = 30
# SIGTERM: stop accepting, let in-flight requests finish for up to this long.
graceful_timeout = 20
# Each worker builds its own app (database pool, caches) after the fork.
preload_app = False
# No access log by default: every /token answer is already in the audit trail, and a log line
# per request costs a third of the throughput. SIDECAR_ACCESS_LOG=- (stderr) or a path turns it on.
accesslog = os.environ.get("SIDECAR_ACCESS_LOG") or None
# %(U)s is the path without the query string: a misplaced token in a URL never reaches a log.
access_log_format = '%(h)s "%(m)s %(U)s" %(s)s %(B)s %(M)sms'
errorlog = "-"
# gunicorn's control socket (since 25.1) is one path per host user ($HOME/.gunicorn) that can
# reload or stop the server; a sidecar is managed by its orchestrator, not through it.
control_socket_disable = True
loglevel = "info"
# uvloop (a dependency) runs the asyncio worker's event loop; "asyncio" picks the standard one.
asgi_loop = "auto"
# The C parser (gunicorn_h1c, installed with gunicorn[fast]) when it is there.
http_parser = "auto"


def child_exit(server, worker):  # type: ignore[no-untyped-def]
    """A dead worker's live gauges must not linger in the shared metrics directory, nor its
    connection count in the table the balanced workers share."""
    from prometheus_client import multiprocess

    from sidecar.worker import release_slot

    multiprocess.mark_process_dead(worker.pid)
    release_slot(worker.pid)


def worker_exit(server, worker):  # type: ignore[no-untyped-def]
    """In the exiting worker, after its last request: write the queued audit events (a graceful
    shutdown loses none) and close the database connections."""
    from sidecar.worker import services_of

    services = services_of(worker)
    if services is not None:
        services.close()


def post_worker_init(worker):  # type: ignore[no-untyped-def]
    """SIGTERM marks the app draining (/readyz 503) before gunicorn's own handler runs."""
    from sidecar.worker import drain_on_sigterm

    drain_on_sigterm(worker)
