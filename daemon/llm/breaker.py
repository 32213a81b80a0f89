"""A circuit breaker per Ollama host: CLOSED, OPEN, HALF_OPEN.

CLOSED lets every request through and counts consecutive failures; ``failure_threshold`` of
them open it. OPEN refuses everything until ``reset_timeout_s`` has passed, then HALF_OPEN
lets ``half_open_requests`` trial requests through: ``success_threshold`` successes close it,
one failure opens it again. Time comes from an injected clock, so tests drive it directly.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from enum import Enum


class State(Enum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    def __init__(
        self,
        *,
        failure_threshold: int = 3,
        success_threshold: int = 1,
        half_open_requests: int = 1,
        reset_timeout_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.success_threshold = success_threshold
        self.half_open_requests = half_open_requests
        self.reset_timeout_s = reset_timeout_s
        self.clock = clock
        self._lock = threading.Lock()
        self._state = State.CLOSED
        self._failures = 0
        self._successes = 0
        self._trials = 0
        self._opened_at = 0.0
        self.opened = threading.Event()  # set each time it opens (the health monitor waits on it)

    @property
    def state(self) -> State:
        with self._lock:
            return self._current()

    def _current(self) -> State:
        if self._state is State.OPEN and self.clock() - self._opened_at >= self.reset_timeout_s:
            self._state, self._successes, self._trials = State.HALF_OPEN, 0, 0
        return self._state

    def retry_in(self) -> float:
        """Seconds until an open breaker lets a trial through (0 when not open)."""
        with self._lock:
            if self._current() is not State.OPEN:
                return 0.0
            return max(0.0, self._opened_at + self.reset_timeout_s - self.clock())

    def allow(self) -> bool:
        """May a request go out now? In HALF_OPEN this takes one of the trial places."""
        with self._lock:
            state = self._current()
            if state is State.CLOSED:
                return True
            if state is State.HALF_OPEN and self._trials < self.half_open_requests:
                self._trials += 1
                return True
            return False

    def success(self) -> None:
        with self._lock:
            state = self._current()
            self._failures = 0
            if state is State.HALF_OPEN:
                self._successes += 1
                self._trials = max(0, self._trials - 1)
                if self._successes >= self.success_threshold:
                    self._state = State.CLOSED

    def trip(self) -> None:
        """Open now, whatever the count (Ollama was found down)."""
        with self._lock:
            self._state, self._opened_at, self._failures = State.OPEN, self.clock(), 0
        self.opened.set()

    def failure(self) -> None:
        with self._lock:
            state = self._current()
            self._failures += 1
            if state is State.HALF_OPEN or self._failures >= self.failure_threshold:
                self._state, self._opened_at, self._failures = State.OPEN, self.clock(), 0
                self.opened.set()
