"""A fake Ollama server that the official ``ollama`` client talks to unchanged.

It is a real HTTP/1.1 server on 127.0.0.1 (``ThreadingHTTPServer`` in a background thread)
speaking the wire protocol of ``ollama serve``: NDJSON streams with chunked transfer encoding,
``{"error": ...}`` bodies with the real status codes, an error line mid-stream. Each test
scripts what it needs::

    fake.reply("Done.", prompt_eval_count=120)     # the next /api/chat answer
    fake.fail(503, BUSY, times=2)                  # then two busy answers
    fake.hang(30)                                  # the next request waits (client times out)
    fake.stop(); fake.start()                      # Ollama down, then back on the same port

A chat or generate request with nothing scripted is answered 500 ``fake: no scripted reply``
and listed in ``unscripted``; the ``fake_ollama`` fixture fails the test at teardown for it
(set ``default_reply`` to answer such requests instead). ``stop()`` closes the listening
socket and every open connection and joins all of the server's threads.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import pytest
from fakehttp import FakeServer, Handler

VERSION = "0.12.0"
DEFAULT_NUM_CTX = 4096  # what Ollama uses when a request sends no options.num_ctx
BUSY = "server busy, please try again.  maximum pending requests exceeded"
NO_SCRIPT = "fake: no scripted reply"


def not_found(model: str) -> str:
    """Ollama's 404 text for a model that is not pulled."""
    return f'model "{model}" not found, try pulling it first'


def _full_name(model: str) -> str:
    """``llama3`` and ``llama3:latest`` name the same model."""
    return model if ":" in model.rsplit("/", 1)[-1] else f"{model}:latest"


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _split(text: str, n: int) -> list[str]:
    """``text`` in ``n`` nearly equal, non-empty pieces (fewer if it is shorter)."""
    n = max(1, min(n, len(text)))
    size, extra = divmod(len(text), n)
    pieces, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        pieces.append(text[start:end])
        start = end
    return [p for p in pieces if p]


@dataclass(frozen=True)
class Request:
    """One request the fake received; ``body`` is the parsed JSON (None without one)."""

    method: str
    path: str
    body: Any

    def get(self, key: str, default: Any = None) -> Any:
        return self.body.get(key, default) if isinstance(self.body, dict) else default

    @property
    def model(self) -> str | None:
        model = self.get("model")
        return model if isinstance(model, str) else None

    @property
    def options(self) -> dict[str, Any]:
        return self.get("options") or {}

    @property
    def keep_alive(self) -> Any:
        return self.get("keep_alive")

    @property
    def messages(self) -> list[dict[str, Any]]:
        return self.get("messages") or []

    @property
    def stream(self) -> bool:
        """Ollama streams unless the body says ``"stream": false``."""
        return self.get("stream", True) is not False


@dataclass
class _Script:
    kind: str  # reply | error_mid_stream | disconnect_mid_stream
    content: str = ""
    model: str | None = None
    prompt_eval_count: int | None = None
    eval_count: int | None = None
    chunks: int = 3
    done_reason: str = "stop"
    error: str = ""


@dataclass
class _Failure:
    status: int
    error: str
    times: int
    model: str | None


class _Handler(Handler):
    def send_json(self, status: int, obj: Any) -> None:
        self.send(status, json.dumps(obj).encode(), "application/json; charset=utf-8")

    def send_text(self, status: int, text: str) -> None:
        self.send(status, text.encode(), "text/plain; charset=utf-8")

    def start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def write_line(self, obj: Any) -> bool:
        """One NDJSON line as one chunk; False when the client has gone."""
        data = json.dumps(obj).encode() + b"\n"
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        except OSError:
            return False
        return True

    def end_stream(self) -> None:
        self.wfile.write(b"0\r\n\r\n")


class FakeOllama(FakeServer):
    label = "fake Ollama"
    handler = _Handler

    def __init__(
        self,
        models: Sequence[str] = ("qwen2.5-coder:7b",),
        *,
        port: int = 0,
        version: str = VERSION,
        context_length: int = 32768,
    ) -> None:
        super().__init__(port)  # also ``errors``: exceptions raised inside the fake or a responder
        self.models = list(models)
        self.version = version
        self.context_length = context_length  # reported by /api/show
        self.default_reply: str | None = None
        self.requests: list[Request] = []
        self.unscripted: list[Request] = []
        self._arrived = threading.Condition(self._lock)
        self._scripts: deque[_Script] = deque()
        self._failures: list[_Failure] = []
        self._hangs: deque[tuple[float, str | None]] = deque()
        self._delay = 0.0
        self._responder: Callable[[dict[str, Any]], str | None] | None = None

    # -- scripting -------------------------------------------------------------------------

    def reply(
        self,
        content: str,
        *,
        model: str | None = None,
        prompt_eval_count: int | None = None,
        eval_count: int | None = None,
        chunks: int = 3,
        done_reason: str = "stop",
    ) -> None:
        """Queue the next chat (or non-empty generate) answer, for ``model`` or any.
        ``prompt_eval_count`` defaults to the prompt's characters // 4, capped at num_ctx
        as Ollama truncates; pass a small number to simulate a cut prompt."""
        self._queue(
            _Script("reply", content, model, prompt_eval_count, eval_count, chunks, done_reason)
        )

    def error_mid_stream(
        self, error: str, after: str = "partial", *, model: str | None = None
    ) -> None:
        """Next answer: one content line ``after``, then ``{"error": error}`` (as Ollama does
        when the runner fails); a non-streamed request gets 500 ``{"error": error}``."""
        self._queue(_Script("error_mid_stream", after, model, chunks=1, error=error))

    def disconnect_mid_stream(self, after: str = "partial", *, model: str | None = None) -> None:
        """Next answer: one content line, then the connection closes (a crashed server)."""
        self._queue(_Script("disconnect_mid_stream", after, model, chunks=1))

    def fail(self, status: int, error: str, *, times: int = 1, model: str | None = None) -> None:
        """The next ``times`` chat/generate requests (for ``model`` or any) answer
        ``status`` with ``{"error": error}``."""
        with self._lock:
            self._failures.append(_Failure(status, error, times, model))

    def hang(self, seconds: float, *, path: str | None = None) -> None:
        """The next request (to ``path``, or any) waits ``seconds`` before it is answered;
        ``stop()`` ends the wait and drops the connection unanswered."""
        with self._lock:
            self._hangs.append((seconds, path))

    def slow(self, delay_per_chunk: float) -> None:
        """From now on, wait this long between streamed lines (0 turns it off); the first
        line still comes at once (use ``hang`` to delay the answer itself)."""
        with self._lock:
            self._delay = delay_per_chunk

    def responder(self, fn: Callable[[dict[str, Any]], str | None] | None) -> None:
        """Compute reply content from the request body; None falls back to the queue."""
        with self._lock:
            self._responder = fn

    def _queue(self, script: _Script) -> None:
        with self._lock:
            self._scripts.append(script)

    # -- inspection ------------------------------------------------------------------------

    def requests_to(self, path: str) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.path == path]

    def wait_for_requests(self, n: int, timeout: float = 10, *, path: str | None = None) -> None:
        """Block until ``n`` requests (to ``path``, or any) have arrived."""

        def count() -> int:
            return sum(1 for r in self.requests if path is None or r.path == path)

        with self._arrived:
            if not self._arrived.wait_for(lambda: count() >= n, timeout):
                raise AssertionError(
                    f"fake Ollama got {count()} requests{f' to {path}' if path else ''} "
                    f"in {timeout}s, expected {n}: {[r.path for r in self.requests]}"
                )

    def problems(self) -> list[str]:
        """What the fixture fails a test for: unscripted requests, errors inside the fake."""
        with self._lock:
            found = [f"{r.method} {r.path} for {r.model!r}: {NO_SCRIPT}" for r in self.unscripted]
            return found + self.errors

    # -- serving (called on handler threads) ---------------------------------------------

    def _handle(self, h: _Handler, stopping: threading.Event) -> None:
        path = urlsplit(h.path).path
        raw = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        req = Request(h.command, path, body)
        with self._lock:
            self.requests.append(req)
            self._arrived.notify_all()
            hang = next((x for x in self._hangs if x[1] in (None, path)), None)
            if hang is not None:
                self._hangs.remove(hang)
        if (hang is not None and stopping.wait(hang[0])) or stopping.is_set():
            h.close_connection = True  # dropped unanswered
            return
        route = {
            ("GET", "/"): lambda: h.send_text(200, "Ollama is running"),
            ("HEAD", "/"): lambda: h.send_text(200, "Ollama is running"),
            ("GET", "/api/version"): lambda: h.send_json(200, {"version": self.version}),
            ("GET", "/api/tags"): lambda: h.send_json(200, {"models": self._tags()}),
            ("GET", "/api/ps"): lambda: h.send_json(200, {"models": []}),
            ("POST", "/api/show"): lambda: self._show(h, req),
            ("POST", "/api/chat"): lambda: self._complete(h, req, stopping),
            ("POST", "/api/generate"): lambda: self._complete(h, req, stopping),
        }.get((h.command, path))
        if route is None:
            h.send_text(404, "404 page not found")
        elif body is not None and not isinstance(body, dict):
            h.send_json(400, {"error": "invalid character in request body"})
        else:
            route()

    def _present(self, model: str) -> bool:
        return _full_name(model) in {_full_name(m) for m in self.models}

    def _tags(self) -> list[dict[str, Any]]:
        return [
            {
                "name": _full_name(m),
                "model": _full_name(m),
                "modified_at": "2025-09-01T12:00:00.000000Z",
                "size": 4_683_087_332,
                "digest": hashlib.sha256(m.encode()).hexdigest(),
                "details": self._details(),
            }
            for m in self.models
        ]

    @staticmethod
    def _details() -> dict[str, Any]:
        return {
            "parent_model": "",
            "format": "gguf",
            "family": "qwen2",
            "families": ["qwen2"],
            "parameter_size": "7.6B",
            "quantization_level": "Q4_K_M",
        }

    def _show(self, h: _Handler, req: Request) -> None:
        model = req.model or ""
        if not model:
            h.send_json(400, {"error": "model is required"})
        elif not self._present(model):
            h.send_json(404, {"error": f"model '{model}' not found"})
        else:
            h.send_json(
                200,
                {
                    "modelfile": f"FROM {model}\n",
                    "parameters": "",
                    "template": "{{ .Prompt }}",
                    "details": self._details(),
                    "model_info": {
                        "general.architecture": "qwen2",
                        "qwen2.context_length": self.context_length,
                    },
                    "capabilities": ["completion", "tools", "insert"],
                    "modified_at": "2025-09-01T12:00:00.000000Z",
                },
            )

    def _script_for(self, req: Request, model: str) -> _Script | None:
        with self._lock:
            responder = self._responder
        if responder is not None:
            try:
                content = responder(req.body)
            except Exception as e:
                with self._lock:
                    self.errors.append(f"responder raised {e!r}")
                return _Script("error_mid_stream", chunks=0, error=f"fake: responder raised {e!r}")
            if content is not None:
                return _Script("reply", content)
        with self._lock:
            for script in self._scripts:
                if script.model is None or _full_name(script.model) == _full_name(model):
                    self._scripts.remove(script)
                    return script
            if self.default_reply is not None:
                return _Script("reply", self.default_reply)
            self.unscripted.append(req)
        return None

    def _take_failure(self, model: str) -> _Failure | None:
        with self._lock:
            for f in self._failures:
                if f.model is None or _full_name(f.model) == _full_name(model):
                    f.times -= 1
                    if f.times <= 0:
                        self._failures.remove(f)
                    return f
        return None

    def _complete(self, h: _Handler, req: Request, stopping: threading.Event) -> None:
        chat = req.path == "/api/chat"
        model = req.model or ""
        failure = self._take_failure(model) if model else None
        if not model:
            h.send_json(400, {"error": "model is required"})
        elif failure is not None:
            h.send_json(failure.status, {"error": failure.error})
        elif not self._present(model):
            h.send_json(404, {"error": not_found(model)})
        elif not (req.messages if chat else req.get("prompt")):
            # An empty chat or generate loads the model; with keep_alive 0 it unloads it.
            reason = "unload" if req.keep_alive in (0, "0", "0s") else "load"
            h.send_json(200, _line(chat, model, "", done=True) | {"done_reason": reason})
        elif (script := self._script_for(req, model)) is None:
            h.send_json(500, {"error": NO_SCRIPT})
        elif req.stream:
            self._stream(h, req, script, stopping)
        elif script.kind == "reply":
            h.send_json(200, _final(req, script, script.content))
        elif script.kind == "error_mid_stream":  # unstreamed, Ollama collects, then reports
            h.send_json(500, {"error": script.error})
        else:  # disconnect_mid_stream: the server goes away before it answers
            h.close_connection = True

    def _stream(self, h: _Handler, req: Request, script: _Script, stop: threading.Event) -> None:
        chat, model = req.path == "/api/chat", req.model or ""
        with self._lock:
            delay = self._delay
        lines = [_line(chat, model, piece) for piece in _split(script.content, script.chunks)]
        if script.kind == "error_mid_stream":
            lines.append({"error": script.error})
        elif script.kind == "reply":
            lines.append(_final(req, script, ""))
        h.start_stream()
        for i, line in enumerate(lines):
            if (i and delay and stop.wait(delay)) or not h.write_line(line):
                h.close_connection = True  # stopped, or the client went away
                return
        if script.kind == "disconnect_mid_stream":
            h.close_connection = True  # no terminating chunk: the body is cut short
        else:
            h.end_stream()


def _line(chat: bool, model: str, text: str, *, done: bool = False) -> dict[str, Any]:
    line: dict[str, Any] = {"model": model, "created_at": _now()}
    if chat:
        line["message"] = {"role": "assistant", "content": text}
    else:
        line["response"] = text
    line["done"] = done
    return line


def _final(req: Request, script: _Script, text: str) -> dict[str, Any]:
    """The last line of an answer (the whole answer when not streamed), with its counts."""
    chat = req.path == "/api/chat"
    line = _line(chat, req.model or "", text, done=True) | {"done_reason": script.done_reason}
    if not chat:
        line["context"] = [1, 2, 3]
    if script.prompt_eval_count is not None:
        prompt_tokens = script.prompt_eval_count
    else:
        texts = [m.get("content") or "" for m in req.messages]
        texts += [req.get("prompt") or "", req.get("system") or ""]
        num_ctx = int(req.options.get("num_ctx") or DEFAULT_NUM_CTX)
        prompt_tokens = min(sum(len(t) for t in texts) // 4, num_ctx)
    eval_tokens = (
        script.eval_count if script.eval_count is not None else max(1, len(script.content) // 4)
    )
    load, prompt_ns, eval_ns = 2_000_000, prompt_tokens * 100_000, eval_tokens * 10_000_000
    return line | {
        "total_duration": load + prompt_ns + eval_ns,
        "load_duration": load,
        "prompt_eval_count": prompt_tokens,
        "prompt_eval_duration": prompt_ns,
        "eval_count": eval_tokens,
        "eval_duration": eval_ns,
    }


@pytest.fixture(name="fake_ollama")  # named, so it may be imported under another name
def fake_ollama() -> Iterator[FakeOllama]:
    """A running ``FakeOllama`` serving ``qwen2.5-coder:7b``; stopped after the test, which
    fails if a chat/generate request found nothing scripted or the fake itself broke."""
    with FakeOllama() as fake:
        yield fake
    if problems := fake.problems():
        pytest.fail("fake Ollama: " + "; ".join(problems), pytrace=False)
