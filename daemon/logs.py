"""Logging sinks, configured once at startup (loguru).

A readable stderr, a rotating file (text or JSON) under ``logging.dir``, and for each
ticket run its own file ``logging.dir/tasks/<ID>.log``. ``diagnose`` is off so variable
values never reach a traceback, and every message, with the text of any exception logged
with it, passes through the redactor.
"""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from loguru import logger

if TYPE_CHECKING:
    from loguru import Record

STDERR_FORMAT = (
    "<green>{time:YYYY-MM-DD HH:mm:ss}</green> <level>{level: <7}</level> "
    "{extra[ticket]: <10} {message}"
)
FILE_FORMAT = (
    "{time:YYYY-MM-DDTHH:mm:ss.SSSZZ} {level: <7} {extra[ticket]} {extra[stage]} {message}"
)


class _Intercept(logging.Handler):
    """Send the standard-library logging of libraries (watchdog) through loguru's sinks."""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        level = record.levelname if record.levelno < logging.ERROR else "ERROR"
        if message in HARMLESS:
            level = "DEBUG"
        logger.opt(depth=6, exception=record.exc_info).log(level, "{}: {}", record.name, message)


# watchdog 7 logs this at ERROR when its emitter thread reads once more while being stopped.
HARMLESS = {"InotifyEmitter.queue_events() called when the thread is inactive"}


def setup(
    *,
    directory: Path,
    level: str,
    json_format: bool,
    rotation: str,
    retention: str,
    compression: str,
    redactor: Callable[[str], str],
    stderr: bool = True,
) -> None:
    def patch(record: Record) -> None:
        message = record["message"]
        exc = record["exception"]
        if exc is not None and exc.type is not None:
            # An exception's text can quote anything (a command line, an agent's output): it
            # is formatted here, and redacted with the message, rather than by each sink.
            trace = traceback.format_exception(exc.type, exc.value, exc.traceback)
            message = f"{message}\n{''.join(trace).rstrip()}"
            record["exception"] = None
        record["message"] = redactor(message)

    logger.remove()
    logger.configure(extra={"ticket": "-", "stage": "-"}, patcher=patch)
    root = logging.getLogger()
    if not any(isinstance(h, _Intercept) for h in root.handlers):
        root.addHandler(_Intercept())
    if stderr:
        logger.add(sys.stderr, level=level, format=STDERR_FORMAT, diagnose=False, backtrace=False)
    directory.mkdir(parents=True, exist_ok=True)
    logger.add(
        directory / "ticketd.log",
        level=level,
        format=FILE_FORMAT,
        serialize=json_format,
        rotation=rotation,
        retention=retention,
        compression=None if compression == "none" else compression,
        diagnose=False,
        backtrace=False,
        enqueue=False,
    )


@contextmanager
def ticket_log(path: Path, ticket_id: str) -> Iterator[None]:
    """Copy every message bound to ``ticket=ticket_id`` into ``path`` while open."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sink = logger.add(
        path,
        level="DEBUG",
        format=FILE_FORMAT,
        diagnose=False,
        backtrace=False,
        filter=lambda record: record["extra"].get("ticket") == ticket_id,
    )
    try:
        yield
    finally:
        logger.remove(sink)
