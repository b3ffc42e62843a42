"""Prometheus metrics of one service process (each process is scraped on its own).

A registry per app rather than prometheus_client's global one, so that several apps in
one process (the tests) do not collide over metric names.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Latency buckets for speech requests: decoding, VAD and the encoder take tens of ms to seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "voiceprint_http_requests", "HTTP requests by route template, method and status",
            ["route", "method", "status"], registry=self.registry,
        )
        self.latency = Histogram(
            "voiceprint_http_request_duration_seconds", "HTTP request latency by route template",
            ["route", "method"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.enrollments = Counter(
            "voiceprint_enrollments", "Enrollment attempts by outcome (OK, INCONSISTENT_SPEAKER or an error code)",
            ["outcome"], registry=self.registry,
        )
        self.decisions = Counter(
            "voiceprint_decisions", "identify and verify answers by task and outcome",
            ["task", "outcome"], registry=self.registry,
        )
        self.refreshes = Counter(
            "voiceprint_refreshes", "Refreshes run by this process, by outcome", ["outcome"], registry=self.registry,
        )
        self.live_sessions = Counter(
            "voiceprint_live_sessions", "WebSocket sessions by route template and how they ended "
            "(result, disconnect or an error code)", ["route", "outcome"], registry=self.registry,
        )
        self.active_version = Gauge(
            "voiceprint_active_version", "The active model version", registry=self.registry,
        )

    def track_active_version(self, read: Callable[[], int]) -> None:
        """Read the active version when scraped: another process may have moved it."""
        self.active_version.set_function(lambda: float(read()))
