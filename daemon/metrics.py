"""Prometheus metrics of one daemon (its own registry: no module-level state).

Counters and histograms are updated by the runner as tickets finish; the queue depth, each
Ollama host's circuit state and the tickets pinned to it are read when ``/metrics`` is
scraped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from daemon.llm.client import Call

DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, float("inf"))


class _Live(Collector):
    """Gauges computed at scrape time from callables."""

    def __init__(
        self,
        depth: Callable[[], Mapping[str, int]],
        circuits: Callable[[], Mapping[str, int]],
        pinned: Callable[[], Mapping[str, int]],
    ) -> None:
        self.depth = depth
        self.circuits = circuits
        self.pinned = pinned

    def collect(self) -> Iterator[Metric]:
        yield _gauge(
            "ticketd_queue_depth", "Ticket files in each backlog folder.", self.depth(), "folder"
        )
        yield _gauge(
            "ticketd_ollama_circuit_state",
            "Each Ollama host's circuit breaker: 0 closed, 1 half-open, 2 open.",
            self.circuits(),
            "host",
        )
        yield _gauge(
            "ticketd_ollama_host_tickets",
            "Tickets pinned to each Ollama host now.",
            self.pinned(),
            "host",
        )


def _gauge(name: str, text: str, values: Mapping[str, int], label: str) -> GaugeMetricFamily:
    """A gauge with one sample per key of ``values``, labelled ``label``."""
    gauge = GaugeMetricFamily(name, text, labels=[label])
    for key, value in values.items():
        gauge.add_metric([key], value)
    return gauge


class Metrics:
    def __init__(
        self,
        depth: Callable[[], Mapping[str, int]],
        circuits: Callable[[], Mapping[str, int]],
        pinned: Callable[[], Mapping[str, int]],
    ) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.tickets = Counter(
            "ticketd_tickets", "Tickets finished, by outcome.", ["outcome"], registry=r
        )
        self.ticket_duration = Histogram(
            "ticketd_ticket_duration_seconds",
            "Claim to outcome, per ticket run.",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.stage_duration = Histogram(
            "ticketd_stage_duration_seconds",
            "Each stage of a run.",
            ["stage"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.llm_requests = Counter(
            "ticketd_llm_requests",
            "LLM requests, by model, outcome and Ollama host.",
            ["model", "outcome", "host"],
            registry=r,
        )
        self.llm_tokens = Counter(
            "ticketd_llm_tokens",
            "LLM tokens, by model, kind and Ollama host.",
            ["model", "kind", "host"],
            registry=r,
        )
        self.pulls = Counter(
            "ticketd_pull_requests",
            "Pull requests ticketd opened, and how they ended (opened, merged, closed).",
            ["event"],
            registry=r,
        )
        self.revisions = Counter(
            "ticketd_revisions",
            "Revision runs on review requests, by outcome (done, failed, requeued, ...).",
            ["outcome"],
            registry=r,
        )
        ProcessCollector(registry=r)
        r.register(_Live(depth, circuits, pinned))

    def finished(self, outcome: str, duration_s: float) -> None:
        self.tickets.labels(outcome).inc()
        self.ticket_duration.observe(duration_s)

    def stage(self, stage: str, duration_s: float) -> None:
        self.stage_duration.labels(stage).observe(duration_s)

    def calls(self, calls: list[Call]) -> None:
        for c in calls:
            self.llm_requests.labels(c.model, c.outcome, c.host).inc()
            self.llm_tokens.labels(c.model, "prompt", c.host).inc(c.prompt_tokens)
            self.llm_tokens.labels(c.model, "eval", c.host).inc(c.eval_tokens)

    def pull(self, event: str) -> None:
        self.pulls.labels(event).inc()

    def revision(self, outcome: str) -> None:
        self.revisions.labels(outcome).inc()
