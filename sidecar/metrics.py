"""Prometheus metrics (``GET /metrics``), in a registry of the app's own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.exchanges = Counter(
            "sidecar_token_requests",
            "Token endpoint requests by outcome and OAuth error code.",
            ["outcome", "error"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "sidecar_token_request_seconds",
            "Time spent answering token endpoint requests.",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry,
        )
