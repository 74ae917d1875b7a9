"""gunicorn settings for `sidecar serve` (CLI --bind / --workers override bind / workers)."""

bind = ["127.0.0.1:8080"]
workers = 2
# Threads keep connections alive between a gateway's calls; sync workers would close each one.
worker_class = "gthread"
threads = 4
keepalive = 15
timeout = 30
# SIGTERM: stop accepting, let in-flight requests finish for up to this long.
graceful_timeout = 20
# Each worker builds its own app (database pool, caches) after the fork.
preload_app = False
accesslog = "-"
# %(U)s is the path without the query string: a misplaced token in a URL never reaches a log.
access_log_format = '%(h)s "%(m)s %(U)s" %(s)s %(B)s %(M)sms'
errorlog = "-"
# gunicorn 27's control socket is one path per host user ($HOME/.gunicorn) that can reload or
# stop the server; a sidecar is managed by its orchestrator, not through it.
control_socket_disable = True
loglevel = "info"


def child_exit(server, worker):  # type: ignore[no-untyped-def]
    """A dead worker's live gauges must not linger in the shared metrics directory."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def post_worker_init(worker):  # type: ignore[no-untyped-def]
    """On SIGTERM, mark the app draining before gunicorn's own handler runs: /readyz answers
    503 while gunicorn lets the requests in flight finish (up to graceful_timeout) and accepts
    no new ones."""
    import signal

    services = worker.wsgi.extensions["sidecar"]
    stop = signal.getsignal(signal.SIGTERM)

    def drain(signum, frame):  # type: ignore[no-untyped-def]
        services.draining.set()
        if callable(stop):
            stop(signum, frame)

    signal.signal(signal.SIGTERM, drain)
