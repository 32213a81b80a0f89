"""Background health checks of one Ollama host, feeding its circuit breaker (one monitor per
host of the pool, see ``daemon/llm/pool.py``).

Every ``interval_s`` (sooner when an open breaker is due a trial) the monitor asks
``/api/version`` and ``/api/tags``. A failure counts against the breaker like a failed
request; a success closes a half-open breaker, and ``on_available`` wakes the supervisor
so waiting tickets are claimed again. Configured models missing from the server are named
in a warning with the ``ollama pull`` command to fix it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import httpx
import ollama
from loguru import logger

from daemon.llm.breaker import CircuitBreaker, State
from daemon.llm.client import Health, Ollama, check_health


class Monitor:
    def __init__(
        self,
        llm: Ollama,
        models: Sequence[str],
        *,
        interval_s: float,
        timeout_s: float,
        on_available: Callable[[], None],
        on_change: Callable[[bool], None] = lambda up: None,
        warm: str | None = None,
        warn_missing: bool = True,
    ) -> None:
        self.llm = llm
        self.breaker: CircuitBreaker = llm.breaker
        self.models = list(models)
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.on_available = on_available
        self.on_change = on_change  # told when the host goes away (False) or comes back
        self._up: bool | None = None  # what on_change was last told
        self.warm_model = warm
        self.warn_missing = warn_missing  # a pool warns of models no host has, instead
        self.last: Health | None = None
        self.last_at: str | None = None  # ISO time of the last check
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned: set[str] = set()

    @property
    def available(self) -> bool:
        return self.breaker.state is State.CLOSED

    def has(self, model: str) -> bool:
        """Did the last check find ``model`` on the host?"""
        last = self.last
        return last is not None and last.ok and last.has(model)

    def check_now(self) -> Health | None:
        """One check, if the breaker lets it through; None when it did not."""
        was = self.breaker.state
        if not self.breaker.allow():
            return None
        health = check_health(self.llm.host, self.models, self.timeout_s)
        self.last = health
        self.last_at = datetime.now(UTC).isoformat(timespec="seconds")
        if health.ok:
            self.breaker.success()
            new = set(health.missing) - self._warned if self.warn_missing else set()
            for model in sorted(new):
                logger.warning(
                    "model {} is not on {}: run `ollama pull {}`", model, self.llm.host, model
                )
            self._warned = set(health.missing)
        else:
            self.breaker.failure()
            logger.warning("Ollama at {} did not answer: {}", self.llm.host, health.error)
        if was is not State.CLOSED and self.available:
            logger.info("Ollama at {} answers again", self.llm.host)
            self.on_available()
        self._tell()
        return health

    def _tell(self) -> None:
        """``on_change`` when the host became available or unavailable since last told (a
        host up at start is no news; one down at start is)."""
        up = self.available
        if up != (True if self._up is None else self._up):
            self.on_change(up)
        self._up = up

    def describe(self) -> tuple[int, dict[str, Any]]:
        """``/health/ollama``: the breaker, each model's presence, the last check; 503 while
        the breaker is open."""
        last = self.last
        state = self.breaker.state
        body = {
            "enabled": True,
            "host": self.llm.host,
            "breaker": state.name,
            "version": last.version if last else None,
            "models": {m: m not in (last.missing if last else ()) for m in self.models},
            "lastCheck": self.last_at,
            "latencyS": round(last.latency_s, 4) if last else None,
            "error": last.error if last else None,
        }
        return (503 if state is State.OPEN else 200), body

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="ollama-health", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.breaker.opened.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout_s + 5)

    def _loop(self) -> None:
        if self.warm_model and self.available and self.has(self.warm_model):
            try:
                self.llm.warm(self.warm_model)
                logger.info("warmed {}", self.warm_model)
            except (ollama.ResponseError, ConnectionError, httpx.HTTPError) as e:  # a courtesy
                logger.warning("could not warm {}: {}", self.warm_model, e)
        opened = self.breaker.opened
        while not self._stop.is_set():
            opened.wait(self._next_wait())  # the breaker opening ends the wait: plan anew
            if self._stop.is_set():
                break
            if opened.is_set():
                opened.clear()
                self._tell()  # requests opened the breaker: the host is away
                continue
            self.check_now()

    def _next_wait(self) -> float:
        due = self.breaker.retry_in()
        return min(self.interval_s, due + 0.01) if due > 0 else self.interval_s
