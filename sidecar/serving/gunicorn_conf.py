"""gunicorn settings for ``sidecar serve --server gunicorn``. The ``server:`` section of the
configuration sets threads, keepalive, backlog, max_connections (worker_connections),
graceful_timeout and workers; values here override it, and ``--bind``/``--workers`` override
both. A file of your own is given with ``--gunicorn-config``."""

import os

bind = ["127.0.0.1:8080"]
# gunicorn's thread-per-request worker: gunicorn's own HTTP/1.1 parser, requests of one
# connection answered in order. (Its asyncio worker dropped pipelined requests: not used.)
worker_class = "gthread"
timeout = 30
preload_app = False
# No access log by default: every /token answer is already in the audit trail.
# SIDECAR_ACCESS_LOG=- (stderr) or a path turns it on.
accesslog = os.environ.get("SIDECAR_ACCESS_LOG") or None
# %(U)s is the path without the query string: a misplaced token in a URL never reaches a log.
access_log_format = '%(h)s "%(m)s %(U)s" %(s)s %(B)s %(M)sms'
errorlog = "-"
# gunicorn's control socket is one path per host user that can reload or stop the server; a
# sidecar is managed by its orchestrator, not through it.
control_socket_disable = True
loglevel = "info"
# A request line and each header line at most 8 KiB, at most 100 header fields.
limit_request_line = 8190
limit_request_fields = 100
limit_request_field_size = 8190


def child_exit(server, worker):  # type: ignore[no-untyped-def]
    """A dead worker's live gauges must not linger in the shared metrics directory."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]


def worker_exit(server, worker):  # type: ignore[no-untyped-def]
    """In the exiting worker, after its last request: write the queued audit events (a graceful
    shutdown loses none) and close the database connections."""
    app = getattr(worker, "wsgi", None)
    services = getattr(app, "extensions", {}).get("sidecar") if app is not None else None
    if services is not None:
        services.close()


def post_worker_init(worker):  # type: ignore[no-untyped-def]
    """SIGTERM marks the app draining (/readyz answers 503) before gunicorn's own handler runs,
    so that a load balancer stops sending new requests while the in-flight ones finish."""
    import signal

    previous = signal.getsignal(signal.SIGTERM)
    app = getattr(worker, "wsgi", None)
    services = getattr(app, "extensions", {}).get("sidecar") if app is not None else None

    def drain(signum, frame):  # type: ignore[no-untyped-def]
        if services is not None:
            services.draining.set()
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, drain)
