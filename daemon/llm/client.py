"""One wrapper around the official ``ollama`` client.

Every request has explicit timeouts and sends ``keep_alive`` and ``options``: ``num_ctx``,
``num_predict``, and ``temperature`` and ``seed`` (deterministic by default: the server's
own default samples at 0.8). ``context_length`` asks the server how many tokens a model
can really hold (``/api/show``): a ``num_ctx`` above it is cut silently.
Transient failures (refused connection, timeouts, 5xx, 503 busy, an error line mid-stream)
are retried with exponential backoff and jitter; a missing model (404) is not. Every call
passes through the host's circuit breaker and is reported, with its token counts, to
``on_call``. Ollama cuts an over-long prompt silently and still answers 200, so a reply
whose ``prompt_eval_count`` falls far short of the prompt's size is marked truncated.

A run talks through its own ``session()`` (its own connections, the host's breaker): a
cancelled ``RunContext`` shuts that session's sockets, so a stop reaches a call blocked
waiting for the model at once, and each read waits no longer than the run's deadline.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import httpcore
import httpx
import ollama
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from daemon.errors import TicketdError
from daemon.llm.breaker import CircuitBreaker
from daemon.runctx import RunContext

Message = Mapping[str, str]


class LLMError(TicketdError):
    code = "OLLAMA_UNAVAILABLE"


class _Transient(LLMError):
    pass


CHARS_PER_TOKEN = 3.0  # deliberately few: a high estimate, until a model's is measured


def estimate_tokens(text: str, chars_per_token: float = CHARS_PER_TOKEN) -> int:
    """A deliberately high estimate of ``text``'s tokens, used to budget prompts."""
    return math.ceil(len(text) / chars_per_token)


def looks_truncated(prompt_chars: int, count: int, num_ctx: int, *, shortfall: bool) -> bool:
    """Did Ollama cut the prompt? Yes when the prompt filled the whole context window, or
    (``shortfall``) when Ollama evaluated far fewer tokens than the prompt holds: about one
    token per 6 characters is the least any tokenizer gives for code or prose."""
    if count >= num_ctx * 0.95:
        return True
    return shortfall and prompt_chars > 1200 and count < prompt_chars / 6


@dataclass(frozen=True)
class Call:
    """One request's accounting."""

    model: str
    prompt_tokens: int
    eval_tokens: int
    duration_s: float
    outcome: str  # ok, truncated, not_found, unavailable, timeout, error
    host: str = ""  # the server that answered (or failed)


@dataclass(frozen=True)
class Reply:
    content: str
    call: Call
    done_reason: str = "stop"  # "length": the answer was cut at num_predict

    @property
    def truncated(self) -> bool:
        return self.call.outcome == "truncated"


class _Sockets(httpcore.SyncBackend):
    """httpcore's own network backend, remembering its sockets so ``shut`` can end reads
    that another thread is blocked in."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []

    def connect_tcp(self, *args: Any, **kwargs: Any) -> httpcore.NetworkStream:
        stream = super().connect_tcp(*args, **kwargs)
        sock = stream.get_extra_info("socket")
        if isinstance(sock, socket.socket):
            with self._lock:
                self._open = [s for s in self._open if s.fileno() != -1] + [sock]
        return stream

    def shut(self) -> None:
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


def _transport(sockets: _Sockets) -> httpx.HTTPTransport:
    transport = httpx.HTTPTransport()
    pool = getattr(transport, "_pool", None)
    if isinstance(pool, httpcore.ConnectionPool) and hasattr(pool, "_network_backend"):
        pool._network_backend = sockets  # cancel then reaches blocked reads at once
    return transport


class Ollama:
    def __init__(
        self,
        host: str,
        *,
        breaker: CircuitBreaker,
        timeout_s: float = 300,
        connect_timeout_s: float = 5,
        num_ctx: int = 16384,
        num_predict: int = 4096,
        keep_alive: str = "10m",
        temperature: float | None = 0.0,
        seed: int | None = 42,
        retries: int = 3,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.host = host
        self.breaker = breaker
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.num_ctx = num_ctx
        self.num_predict = num_predict
        self.keep_alive = keep_alive
        self.temperature = temperature
        self.seed = seed
        self.retries = retries
        self.sleep = sleep
        self._sockets = _Sockets()
        timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
        self._client = ollama.Client(
            host=host, timeout=timeout, transport=_transport(self._sockets)
        )

    def session(self) -> Ollama:
        """A client of its own for one run: same host, settings and breaker."""
        return Ollama(
            self.host,
            breaker=self.breaker,
            timeout_s=self.timeout_s,
            connect_timeout_s=self.connect_timeout_s,
            num_ctx=self.num_ctx,
            num_predict=self.num_predict,
            keep_alive=self.keep_alive,
            temperature=self.temperature,
            seed=self.seed,
            retries=self.retries,
            sleep=self.sleep,
        )

    def close(self) -> None:
        self._client._client.close()

    def abort(self) -> None:
        """End every request in flight on this client (a cancelled run)."""
        self._sockets.shut()

    def chat(
        self,
        model: str,
        messages: Sequence[Message],
        *,
        format: dict[str, Any] | None = None,
        on_call: Callable[[Call], None] = lambda call: None,
        judge_shortfall: bool = True,
        ctx: RunContext | None = None,
        num_ctx: int | None = None,
        temperature: float | None = None,
        seed: int | None = None,
    ) -> Reply:
        """Stream one chat completion; ``on_call`` hears of every request, failed or not.
        Raises ``LLMError`` with MODEL_NOT_FOUND, OLLAMA_UNAVAILABLE or LLM_TIMEOUT once
        retries are used up. With ``ctx``: a cancel ends the call at once (``ctx.error()``),
        and the deadline bounds it (AGENT_TIMEOUT). ``num_ctx``, ``temperature`` and ``seed``
        override the client's for this call."""
        ctx = ctx or RunContext()
        options: dict[str, Any] = {
            "num_ctx": num_ctx or self.num_ctx,
            "num_predict": self.num_predict,
            "temperature": self.temperature if temperature is None else temperature,
            "seed": self.seed if seed is None else seed,
        }
        options = {k: v for k, v in options.items() if v is not None}

        def pause(seconds: float) -> None:  # between tries; a cancel cuts it short
            if self.sleep is time.sleep:
                ctx.event.wait(seconds)
            else:
                self.sleep(seconds)
            ctx.check()

        retrying = Retrying(
            retry=retry_if_exception_type(_Transient),
            stop=stop_after_attempt(self.retries + 1),
            wait=wait_exponential_jitter(initial=1, max=20),
            sleep=pause,
            reraise=True,
        )
        with ctx.on_cancel(self.abort):
            try:
                for attempt in retrying:
                    with attempt:
                        ctx.check()
                        return self._chat_once(
                            model, messages, format, options, on_call, judge_shortfall, ctx
                        )
            except _Transient as e:
                ctx.check()  # a cancel or the deadline cut the request: say that instead
                raise LLMError(e.message, code=e.code) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _chat_once(
        self,
        model: str,
        messages: Sequence[Message],
        format: dict[str, Any] | None,
        options: dict[str, Any],
        on_call: Callable[[Call], None],
        judge_shortfall: bool,
        ctx: RunContext,
    ) -> Reply:
        if not self.breaker.allow():
            raise LLMError(
                f"Ollama at {self.host} is unavailable (circuit open; next try in "
                f"{self.breaker.retry_in():.0f}s)"
            )
        start = time.monotonic()
        content: list[str] = []
        final: Any = None
        read_s = ctx.timeout(self.timeout_s)
        self._client._client.timeout = httpx.Timeout(read_s, connect=self.connect_timeout_s)
        try:
            stream = self._client.chat(
                model=model,
                messages=[dict(m) for m in messages],
                stream=True,
                format=format,
                options=options,
                keep_alive=self.keep_alive,
            )
            for part in stream:
                content.append(part.message.content or "")
                if part.done:
                    final = part
                if ctx.cancelled or ctx.remaining() <= 0:
                    self.abort()
                    break
        except ollama.ResponseError as e:
            self._failed(model, start, e, on_call, ctx)
        except (ConnectionError, httpx.TransportError) as e:
            self._failed(model, start, e, on_call, ctx)
        if final is None:  # ended by a cancel or the deadline, not by the server
            on_call(Call(model, 0, 0, time.monotonic() - start, "cancelled", self.host))
            ctx.check()
            raise _Transient(f"Ollama at {self.host} ended the answer without its last line")
        self.breaker.success()
        text = "".join(content)
        prompt_tokens = int(getattr(final, "prompt_eval_count", 0) or 0)
        prompt_chars = sum(len(m.get("content", "")) for m in messages)
        cut = looks_truncated(
            prompt_chars, prompt_tokens, options["num_ctx"], shortfall=judge_shortfall
        )
        outcome = "truncated" if cut else "ok"
        call = Call(
            model=model,
            prompt_tokens=prompt_tokens,
            eval_tokens=int(getattr(final, "eval_count", 0) or 0),
            duration_s=time.monotonic() - start,
            outcome=outcome,
            host=self.host,
        )
        on_call(call)
        return Reply(text, call, str(getattr(final, "done_reason", None) or "stop"))

    def _failed(
        self,
        model: str,
        start: float,
        error: Exception,
        on_call: Callable[[Call], None],
        ctx: RunContext,
    ) -> NoReturn:
        """Classify a failed request, count it against the breaker, report it, raise."""
        took = time.monotonic() - start
        if ctx.cancelled or ctx.remaining() <= 0:  # we cut it: says nothing about Ollama
            on_call(Call(model, 0, 0, took, "cancelled", self.host))
            ctx.check()
        status = getattr(error, "status_code", None)
        if isinstance(error, ollama.ResponseError) and status == 404:
            self.breaker.success()  # the server answered: it is up
            on_call(Call(model, 0, 0, took, "not_found", self.host))
            raise LLMError(
                f"model {model!r} not found on {self.host}: run `ollama pull {model}`",
                code="MODEL_NOT_FOUND",
            ) from None
        if isinstance(error, ollama.ResponseError) and status is not None and 400 <= status < 500:
            self.breaker.success()
            on_call(Call(model, 0, 0, took, "error", self.host))
            raise TicketdError(f"Ollama refused the request for {model}: {error.error}") from None
        self.breaker.failure()
        if isinstance(error, httpx.TimeoutException):
            on_call(Call(model, 0, 0, took, "timeout", self.host))
            raise _Transient(
                f"{model} on {self.host} did not answer in time", code="LLM_TIMEOUT"
            ) from None
        on_call(Call(model, 0, 0, took, "unavailable", self.host))
        detail = error.error if isinstance(error, ollama.ResponseError) else str(error)
        raise _Transient(f"Ollama at {self.host} failed: {detail}") from None

    def probe(self, model: str) -> None:
        """Ask the server whether it is there and has ``model``; raise ``LLMError`` when not:
        OLLAMA_UNAVAILABLE (and the breaker opens: nothing is claimed until the health
        monitor finds the server again) or MODEL_NOT_FOUND."""
        health = check_health(self.host, [model], self.connect_timeout_s)
        if not health.ok:
            self.breaker.trip()
            raise LLMError(f"Ollama at {self.host} does not answer ({health.error})")
        if health.missing:
            raise LLMError(
                f"model {model!r} not found on {self.host}: run `ollama pull {model}`",
                code="MODEL_NOT_FOUND",
            )

    def context_length(self, model: str, ctx: RunContext | None = None) -> int | None:
        """The most tokens ``model`` can hold: the context it was trained with, from
        ``/api/show`` (Ollama cuts a larger ``num_ctx`` to it). None when the server does not
        say, or not within the health check's timeout: then ``num_ctx`` is taken on trust. A
        cancel of ``ctx`` ends the request at once."""
        ctx = ctx or RunContext()
        wait = ctx.timeout(self.connect_timeout_s)
        self._client._client.timeout = httpx.Timeout(
            wait, connect=min(wait, self.connect_timeout_s)
        )
        try:
            with ctx.on_cancel(self.abort):
                info = self._client.show(model).modelinfo or {}
        except (ollama.ResponseError, httpx.HTTPError, ConnectionError):
            ctx.check()
            return None
        length = info.get(f"{info.get('general.architecture')}.context_length")
        return length if isinstance(length, int) and length > 0 else None

    def warm(self, model: str) -> None:
        """Load ``model`` into memory (an empty generate) so the first ticket starts fast."""
        self._client.generate(
            model=model, prompt="", keep_alive=self.keep_alive, options={"num_ctx": self.num_ctx}
        )


@dataclass(frozen=True)
class Health:
    ok: bool
    version: str | None
    models: tuple[str, ...]  # present on the server
    missing: tuple[str, ...]  # configured but not present
    latency_s: float
    error: str | None

    def has(self, model: str) -> bool:
        """Is ``model`` on the server (``name`` also matches ``name:latest``)?"""
        return model in self.models or f"{model}:latest" in self.models


def check_health(host: str, wanted: Sequence[str], timeout_s: float) -> Health:
    """GET /api/version and /api/tags; which of ``wanted`` are present."""
    start = time.monotonic()
    try:
        with httpx.Client(base_url=host, timeout=timeout_s) as http:
            version = http.get("/api/version").raise_for_status().json().get("version")
            tags = http.get("/api/tags").raise_for_status().json().get("models") or []
    except (httpx.HTTPError, ValueError) as e:
        return Health(False, None, (), tuple(wanted), time.monotonic() - start, str(e) or repr(e))
    names = tuple(str(m.get("name") or m.get("model")) for m in tags)
    health = Health(True, version, names, (), time.monotonic() - start, None)
    return dataclasses.replace(health, missing=tuple(w for w in wanted if not health.has(w)))
