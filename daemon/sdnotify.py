"""A small sd_notify client: tell systemd we are ready, alive, busy or stopping.

systemd passes a datagram socket in ``NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract
namespace) and, with ``WatchdogSec=``, the deadline in ``WATCHDOG_USEC``. Each message is one
datagram of ``KEY=value`` lines (sd_notify(3)). Without ``NOTIFY_SOCKET`` the notifier is
disabled and every call does nothing. A send that fails returns False and raises nothing: a
lost ping must never stop the daemon.

This module does not read the environment; ``config``/``cli`` pass it in (``from_env``). The
variables in ``ENV_VARS`` concern the daemon alone: leave them out of the agents' environment.
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Mapping

ENV_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def _address(value: str | None) -> bytes | None:
    """The ``sendto`` address for ``NOTIFY_SOCKET``; None for none or an unsupported kind."""
    if not value:
        return None
    if value.startswith("@"):  # abstract namespace: a leading NUL byte
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return os.fsencode(value)
    return None  # e.g. vsock:CID:PORT, which only systemd >= 254 hands out


def _watchdog_usec(env: Mapping[str, str], pid: int) -> int | None:
    """``WATCHDOG_USEC`` when it is meant for ``pid`` (``WATCHDOG_PID``, if set, names it)."""
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
        owner = int(env["WATCHDOG_PID"]) if env.get("WATCHDOG_PID") else pid
    except ValueError:
        return None
    return usec if usec > 0 and owner == pid else None


class Notifier:
    """Sends sd_notify messages to one socket. Safe to share between threads: each message
    uses its own short-lived socket, as libsystemd does."""

    def __init__(
        self, address: str | None = None, *, watchdog_usec: int | None = None, timeout: float = 1
    ) -> None:
        self._address = _address(address)
        self._watchdog_usec = watchdog_usec if self._address is not None else None
        self._timeout = timeout

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, pid: int | None = None) -> Notifier:
        """A notifier for the socket and watchdog systemd set up (``os.environ``); ``pid`` is
        ours (default ``os.getpid()``), to honour ``WATCHDOG_PID``."""
        usec = _watchdog_usec(env, os.getpid() if pid is None else pid)
        return cls(env.get("NOTIFY_SOCKET"), watchdog_usec=usec)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def watchdog_interval(self) -> float | None:
        """Seconds between ``watchdog()`` pings (half of ``WATCHDOG_USEC``), or None when
        systemd watches no deadline for us."""
        return self._watchdog_usec / 2_000_000 if self._watchdog_usec is not None else None

    def ready(self, status: str | None = None) -> bool:
        """Startup is done (``READY=1``); ``status`` also sets the status line."""
        return self.send("READY=1", *_status(status))

    def stopping(self, status: str | None = None) -> bool:
        """A graceful stop has begun (``STOPPING=1``)."""
        return self.send("STOPPING=1", *_status(status))

    def reloading(self, monotonic_usec: int | None = None) -> bool:
        """Configuration reload has begun (``RELOADING=1``); send ``ready()`` when it is done."""
        usec = time.monotonic_ns() // 1000 if monotonic_usec is None else monotonic_usec
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def status(self, text: str) -> bool:
        """The one-line status ``systemctl status`` shows."""
        return self.send(*_status(text))

    def watchdog(self) -> bool:
        """Still alive (``WATCHDOG=1``): send every ``watchdog_interval()`` seconds, and only
        from a loop that is making progress."""
        return self.send("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more before the start, run or stop timeout of the current state
        fires (``EXTEND_TIMEOUT_USEC``); repeat before that time passes to extend again."""
        if not seconds > 0:
            raise ValueError(f"extend_timeout needs a positive number of seconds, not {seconds}")
        return self.send(f"EXTEND_TIMEOUT_USEC={math.ceil(seconds * 1_000_000)}")

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=value`` lines as one datagram. True when it was sent; False when the
        notifier is disabled or the send failed."""
        if self._address is None or not assignments:
            return False
        payload = "\n".join(assignments).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.settimeout(self._timeout)  # a stalled manager must not stall the loop
                sock.sendto(payload, self._address)
        except OSError:  # includes the timeout; sd_notify(3) callers ignore failures too
            return False
        return True


def _status(text: str | None) -> tuple[str, ...]:
    """A ``STATUS=`` assignment: one line, as the protocol needs."""
    return () if text is None else ("STATUS=" + " ".join(text.splitlines()),)
