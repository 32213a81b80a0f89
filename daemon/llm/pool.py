"""A pool of Ollama hosts, and each run's ``Route`` to the one host it is pinned to.

Every host of ``ollama.hosts`` (or the one ``ollama.host``) has its own client, circuit
breaker and health monitor, which also learns the models the host has (``/api/tags``).
``Pool.route`` pins a ticket to one host for its whole run, chosen at claim time:

1. among the hosts whose breaker is closed, those that have the earliest model of the
   ticket's chain (with a review, those of them that also have the review model, if any
   do), so a ticket never goes to a lesser model while a host with its first one is up;
2. of those, the ones below their ``max_tickets``; none: the ticket waits in ``todo/``;
3. the least busy of them: tickets pinned per unit of ``weight``, then the one chosen least
   recently. A chain no host has goes to the least busy host, to fail as it would on one
   host (MODEL_NOT_FOUND, with the ``ollama pull`` command).

Pinning keeps every call of a run (the agent's, its reflections, the review) on one server,
where Ollama reuses the prompt it has cached. When that host fails mid-run (its breaker
opens, or a call finds it down) the ``Route`` moves the run to another host chosen the same
way, logging what failed, and the call is made again there; with no host left, the outage
error goes up and the ticket returns to ``todo/`` (never ``failed/``).

``Pins`` counts the tickets pinned to each host. The supervisor owns it, so a pool built
anew by a reload counts the runs the old one pinned.
"""

from __future__ import annotations

import itertools
import threading
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from loguru import logger

from daemon.llm.breaker import CircuitBreaker, State
from daemon.llm.client import LLMError, Message, Ollama, Reply
from daemon.llm.health import Monitor
from daemon.runctx import RunContext

OUTAGE_CODES = ("OLLAMA_UNAVAILABLE", "LLM_TIMEOUT")


def outage(code: str, breaker: CircuitBreaker) -> bool:
    """Is this error the host being away, rather than something about the ticket? Always
    for OLLAMA_UNAVAILABLE; for LLM_TIMEOUT once the timeouts opened the host's breaker."""
    return code == "OLLAMA_UNAVAILABLE" or (
        code == "LLM_TIMEOUT" and breaker.state is not State.CLOSED
    )


class Pins:
    """Tickets pinned to each host (by URL), across reloads; ``lock`` makes a choice and its
    pin one step."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._count: Counter[str] = Counter()

    def add(self, url: str) -> None:
        with self.lock:
            self._count[url] += 1

    def remove(self, url: str) -> None:
        with self.lock:
            self._count[url] = max(0, self._count[url] - 1)

    def __getitem__(self, url: str) -> int:
        with self.lock:
            return self._count[url]


@dataclass
class Host:
    """One server of the pool: its client (with its breaker) and its health monitor."""

    url: str
    weight: float
    max_tickets: int | None
    llm: Ollama
    monitor: Monitor
    chosen: int = 0  # when it was last chosen (a turn number): ties go to the longest idle

    @property
    def available(self) -> bool:
        return self.monitor.available

    def has(self, model: str) -> bool:
        return self.monitor.has(model)


@dataclass
class Pool:
    hosts: list[Host]
    pins: Pins = field(default_factory=Pins)
    _turns: Any = field(default_factory=lambda: itertools.count(1))

    @property
    def available(self) -> bool:
        """Is any host's breaker closed (may a ticket be claimed)?"""
        return any(h.available for h in self.hosts)

    def unavailable(self) -> str:
        """Why no ticket is claimed, when no host is available."""
        if len(self.hosts) == 1:
            return f"Ollama at {self.hosts[0].url} is unavailable"
        return f"no Ollama host is available ({', '.join(h.url for h in self.hosts)})"

    def choose(
        self, models: Sequence[str], review: str | None = None, exclude: Collection[str] = ()
    ) -> Host | None:
        """The host for a ticket whose chain is ``models`` (see the module's doc), or None
        when every host that would do is down, left out or full."""
        up = [h for h in self.hosts if h.available and h.url not in exclude]

        def rank(h: Host) -> tuple[int, bool]:
            first = next((i for i, m in enumerate(models) if h.has(m)), len(models))
            return first, review is not None and not h.has(review)

        if not up:
            return None
        best = min(rank(h) for h in up)
        room = [
            h
            for h in up
            if rank(h) == best and (h.max_tickets is None or self.pins[h.url] < h.max_tickets)
        ]
        if not room:
            return None
        return min(room, key=lambda h: ((self.pins[h.url] + 1) / h.weight, h.chosen))

    def route(self, models: Sequence[str], review: str | None = None) -> Route | None:
        """A run's route, pinned to the host chosen for it; None: the ticket waits."""
        with self.pins.lock:
            host = self.choose(models, review)
            if host is None:
                return None
            self._pin(host)
        return Route(self, host, models, review)

    def _pin(self, host: Host) -> None:
        host.chosen = next(self._turns)
        self.pins.add(host.url)

    def start(self) -> None:
        """Check every host at once (a host down at start opens its breaker: no ticket
        goes there until it answers), then start their monitors."""
        with ThreadPoolExecutor(len(self.hosts), thread_name_prefix="ollama-check") as checks:
            healths = list(checks.map(lambda h: h.monitor.check_now(), self.hosts))
        for host, health in zip(self.hosts, healths, strict=True):
            if health is not None and not health.ok:
                host.monitor.breaker.trip()
            host.monitor.start()
        if len(self.hosts) > 1:
            logger.info(
                "Ollama hosts: {}",
                ", ".join(f"{h.url} ({'up' if h.available else 'down'})" for h in self.hosts),
            )
            for model in self.missing():
                logger.warning("model {} is on no Ollama host: run `ollama pull {}`", model, model)

    def missing(self) -> list[str]:
        """Wanted models no answering host has."""
        wanted = self.hosts[0].monitor.models
        up = [h for h in self.hosts if h.monitor.last is not None and h.monitor.last.ok]
        return [m for m in wanted if up and not any(h.has(m) for h in up)]

    def stop(self) -> None:
        for host in self.hosts:
            host.monitor.stop()
            host.llm.close()

    def describe(self) -> tuple[int, dict[str, Any]]:
        """``/health/ollama``: each host's breaker, models, last check and tickets; 503
        while no host is available."""
        hosts = []
        for h in self.hosts:
            _, body = h.monitor.describe()
            body.update(
                host=h.url, tickets=self.pins[h.url], maxTickets=h.max_tickets, weight=h.weight
            )
            body.pop("enabled")
            hosts.append(body)
        states = [h.monitor.breaker.state for h in self.hosts]
        best = min(states, key=lambda s: s.value)
        body = {"enabled": True, "breaker": best.name, "available": self.available, "hosts": hosts}
        return (200 if self.available else 503), body

    def circuits(self) -> dict[str, int]:
        """Each host's breaker state (0 closed, 1 half-open, 2 open), by URL."""
        return {h.url: h.monitor.breaker.state.value for h in self.hosts}

    def tickets(self) -> dict[str, int]:
        """Tickets pinned to each host, by URL."""
        return {h.url: self.pins[h.url] for h in self.hosts}


class Route:
    """One run's way to Ollama, pinned to one host of the pool: the agent, its reflections
    and the review call it like a client. A call that finds the host away moves the run to
    another host (see the module's doc) and is made again there."""

    def __init__(
        self, pool: Pool, host: Host, models: Sequence[str], review: str | None = None
    ) -> None:
        self.pool = pool
        self.host = host
        self.models = list(models)
        self.review = review
        self.session = host.llm.session()
        self.left: list[str] = []  # hosts this run moved away from, by URL
        self.on_move: Callable[[], None] = lambda: None  # told after each move
        self._closed = False

    @property
    def url(self) -> str:
        return self.host.url

    @property
    def breaker(self) -> CircuitBreaker:
        return self.session.breaker

    @property
    def seed(self) -> int | None:
        return self.session.seed

    def chat(self, model: str, messages: Sequence[Message], **options: Any) -> Reply:
        """``Ollama.chat`` on the run's host; on another one when the host fails."""
        while True:
            try:
                return self.session.chat(model, messages, **options)
            except LLMError as e:
                if not self.move(e):
                    raise

    def probe(self, model: str) -> bool:
        """``Ollama.probe`` on the run's host (raises ``LLMError`` when it is away or lacks
        ``model``); True when the host was away and the run moved to another."""
        try:
            self.session.probe(model)
        except LLMError as e:
            if not self.move(e):
                raise
            return True
        return False

    def context_length(self, model: str, ctx: RunContext | None = None) -> int | None:
        return self.session.context_length(model, ctx)

    def move(self, error: LLMError) -> bool:
        """After ``error`` on the run's host: when it is an outage and another host can take
        the run, pin the run there and say so; False when the error stands."""
        if not outage(error.code, self.session.breaker):
            return False
        old = self.host
        pins = self.pool.pins
        with pins.lock:
            new = self.pool.choose(self.models, self.review, exclude={*self.left, old.url})
            if new is None:
                return False
            self.pool._pin(new)
            pins.remove(old.url)
        self.left.append(old.url)
        self.session.close()
        self.host, self.session = new, new.llm.session()
        logger.warning(
            "Ollama at {} failed ({}); the run goes on at {}", old.url, error.message, new.url
        )
        self.on_move()
        return True

    def moved(self) -> str | None:
        """What the run was told when it moved, for an agent to hear; None: it never did."""
        if not self.left:
            return None
        gone = ", ".join(self.left)
        return f"Ollama at {gone} stopped answering; the run goes on at {self.host.url}"

    def abort(self) -> None:
        self.session.abort()

    def close(self) -> None:
        """End the run's use of its host (its pin; idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.session.close()
        self.pool.pins.remove(self.host.url)
