"""Prometheus metrics of one server process, in a registry of its own.

Nothing here is touched per token: token counts and time to first token are
added once per turn, when the run ends or sees its first token.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_DURATION_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    """The counters, gauges and histograms chatstream exports at ``/metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.active_streams = Gauge(
            "chatstream_active_streams", "Open event-stream connections.", registry=r
        )
        self.active_runs = Gauge(
            "chatstream_active_runs", "Turns running in this process.", registry=r
        )
        self.runs = Counter(
            "chatstream_runs", "Finished turns by outcome.", ["outcome"], registry=r
        )
        self.time_to_first_token = Histogram(
            "chatstream_time_to_first_token_seconds",
            "From the start of a turn to its first token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.turn_duration = Histogram(
            "chatstream_turn_duration_seconds",
            "From the start of a turn to its end.",
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.tokens_out = Counter(
            "chatstream_tokens_out", "Token events produced by turns.", registry=r
        )
        self.tool_calls = Counter(
            "chatstream_tool_calls", "Tool calls by tool and outcome.", ["tool", "outcome"],
            registry=r,
        )  # fmt: skip
        self.model_errors = Counter(
            "chatstream_model_errors", "Turns ended by a model failure.", registry=r
        )

    def track_active_runs(self, count: Callable[[], int]) -> None:
        self.active_runs.set_function(lambda: float(count()))

    def render(self) -> bytes:
        return generate_latest(self.registry)
