"""The fake Ollama, driven by the real ``ollama`` client (and httpx where the client hides the
wire). These tests also pin which exception the client raises for each failure."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import ollama
import pytest
from fake_ollama import BUSY, NO_SCRIPT, FakeOllama
from fake_ollama import fake_ollama as fake_ollama_fixture  # noqa: F401

MODEL = "qwen2.5-coder:7b"
ASK = [{"role": "user", "content": "Fix the bug in parse()."}]


@pytest.fixture
def client(fake_ollama: FakeOllama) -> Iterator[ollama.Client]:
    with ollama.Client(host=fake_ollama.url) as c:
        yield c


def drain(stream: Iterator[Any], into: list[str]) -> None:
    for part in stream:
        into.append(part.message.content)


def chat(client: ollama.Client, *, stream: bool, model: str = MODEL) -> str:
    """One chat the way ticketd makes it, streamed or not; the reply's text."""
    if stream:
        return "".join(p.message.content or "" for p in client.chat(model, ASK, stream=True))
    return client.chat(model, ASK).message.content or ""


# -- chat -------------------------------------------------------------------------------------


def test_streamed_chat_comes_in_chunks_then_a_final_line_with_counts(
    fake_ollama: FakeOllama, client: ollama.Client
) -> None:
    fake_ollama.reply("Hello, world!", prompt_eval_count=42, eval_count=7, chunks=3)

    parts = list(
        client.chat(
            model=MODEL,
            messages=ASK,
            stream=True,
            options={"num_ctx": 16384, "num_predict": 4096},
            keep_alive="10m",
        )
    )

    assert [p.message.content for p in parts] == ["Hello", ", wo", "rld!", ""]
    assert [p.done for p in parts] == [False, False, False, True]
    final = parts[-1]
    assert final.done_reason == "stop"
    assert (final.prompt_eval_count, final.eval_count) == (42, 7)
    for field in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(getattr(final, field), int) and getattr(final, field) > 0
    (req,) = fake_ollama.requests_to("/api/chat")
    assert req.method == "POST" and req.model == MODEL and req.stream is True
    assert req.options == {"num_ctx": 16384, "num_predict": 4096}
    assert req.keep_alive == "10m"
    assert req.messages == ASK


def test_unstreamed_chat_is_one_object(fake_ollama: FakeOllama, client: ollama.Client) -> None:
    fake_ollama.reply("All done.", eval_count=3)

    resp = client.chat(model=MODEL, messages=ASK, format={"type": "object"})

    assert resp.message.content == "All done."
    assert resp.done is True and resp.done_reason == "stop" and resp.eval_count == 3
    assert fake_ollama.requests[-1].body["format"] == {"type": "object"}
    assert fake_ollama.requests[-1].stream is False


def test_the_wire_format_is_ollamas(fake_ollama: FakeOllama) -> None:
    fake_ollama.reply("abc", chunks=3)
    fake_ollama.reply("abc")
    body = {"model": MODEL, "messages": ASK}
    with httpx.Client(base_url=fake_ollama.url) as http:
        with http.stream("POST", "/api/chat", json=body) as r:
            assert r.status_code == 200
            assert r.headers["content-type"] == "application/x-ndjson"
            assert r.headers["transfer-encoding"] == "chunked"
            lines = [json.loads(line) for line in r.iter_lines()]
        one = http.post("/api/chat", json=body | {"stream": False})
    assert [line["message"] for line in lines[:3]] == [
        {"role": "assistant", "content": c} for c in "abc"
    ]
    assert set(lines[-1]) == {
        "model",
        "created_at",
        "message",
        "done",
        "done_reason",
        "total_duration",
        "load_duration",
        "prompt_eval_count",
        "prompt_eval_duration",
        "eval_count",
        "eval_duration",
    }
    assert one.headers["content-type"] == "application/json; charset=utf-8"
    assert one.json()["message"]["content"] == "abc" and one.json()["done"] is True


def test_prompt_eval_count_estimates_the_prompt_and_is_cut_at_num_ctx(
    fake_ollama: FakeOllama, client: ollama.Client
) -> None:
    long = [{"role": "system", "content": "s" * 400}, {"role": "user", "content": "u" * 400}]
    fake_ollama.reply("a")
    fake_ollama.reply("b")
    fake_ollama.reply("c", prompt_eval_count=5)

    full = client.chat(model=MODEL, messages=long, options={"num_ctx": 8192})
    cut = client.chat(model=MODEL, messages=long, options={"num_ctx": 50})
    told = client.chat(model=MODEL, messages=long)

    assert (full.prompt_eval_count, cut.prompt_eval_count, told.prompt_eval_count) == (200, 50, 5)


def test_replies_for_a_model_wait_for_that_model(fake_ollama: FakeOllama) -> None:
    fake_ollama.models.append("llama3.2")
    fake_ollama.reply("from qwen", model=MODEL)
    fake_ollama.reply("from llama", model="llama3.2:latest")
    with ollama.Client(host=fake_ollama.url) as client:
        first = client.chat(model="llama3.2", messages=ASK)
        second = client.chat(model=MODEL, messages=ASK)
    assert (first.message.content, second.message.content) == ("from llama", "from qwen")


def test_a_responder_computes_replies_and_none_falls_back_to_the_queue(
    fake_ollama: FakeOllama, client: ollama.Client
) -> None:
    fake_ollama.responder(
        lambda body: None if "queue" in body["messages"][-1]["content"] else "echo"
    )
    fake_ollama.reply("queued")

    echoed = client.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    queued = client.chat(model=MODEL, messages=[{"role": "user", "content": "queue"}])

    assert (echoed.message.content, queued.message.content) == ("echo", "queued")


def test_concurrent_chats_each_get_one_reply(fake_ollama: FakeOllama) -> None:
    for i in range(8):
        fake_ollama.reply(f"reply {i}")

    def ask(_: int) -> str:
        with ollama.Client(host=fake_ollama.url) as c:
            return "".join(p.message.content for p in c.chat(MODEL, ASK, stream=True))

    with ThreadPoolExecutor(max_workers=8) as pool:
        got = sorted(pool.map(ask, range(8)))

    assert got == sorted(f"reply {i}" for i in range(8))
    fake_ollama.wait_for_requests(8, path="/api/chat")


def test_an_unscripted_chat_is_a_visible_500() -> None:
    with FakeOllama() as fake, ollama.Client(host=fake.url) as client:
        with pytest.raises(ollama.ResponseError) as e:
            client.chat(model=MODEL, messages=ASK)
        assert (e.value.status_code, e.value.error) == (500, NO_SCRIPT)
        assert [r.path for r in fake.unscripted] == ["/api/chat"]
        assert fake.problems() == [f"POST /api/chat for {MODEL!r}: {NO_SCRIPT}"]
        fake.default_reply = "OK"
        assert client.chat(model=MODEL, messages=ASK).message.content == "OK"


# -- generate (warm-up) ---------------------------------------------------------------------


def test_an_empty_generate_loads_the_model(fake_ollama: FakeOllama, client: ollama.Client) -> None:
    loaded = client.generate(model=MODEL, prompt="", keep_alive="10m", options={"num_ctx": 16384})
    unloaded = client.generate(model=MODEL, prompt="", keep_alive=0)

    assert (loaded.done, loaded.done_reason, loaded.response) == (True, "load", "")
    assert unloaded.done_reason == "unload"
    warm = fake_ollama.requests_to("/api/generate")[0]
    assert (warm.keep_alive, warm.options["num_ctx"]) == ("10m", 16384)
    assert fake_ollama.problems() == []  # warming needs no script


def test_generate_with_a_prompt_takes_a_scripted_reply(
    fake_ollama: FakeOllama, client: ollama.Client
) -> None:
    fake_ollama.reply("def f(): pass", chunks=2)

    parts = list(client.generate(model=MODEL, prompt="write f", stream=True))

    assert "".join(p.response or "" for p in parts) == "def f(): pass"
    assert parts[-1].done and parts[-1].eval_count and parts[-1].context == [1, 2, 3]


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_a_missing_model_is_404(
    fake_ollama: FakeOllama, client: ollama.Client, stream: bool
) -> None:
    with pytest.raises(ollama.ResponseError) as e:
        chat(client, stream=stream, model="nope:1b")
    assert e.value.status_code == 404
    assert e.value.error == 'model "nope:1b" not found, try pulling it first'
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="nope:1b", prompt="")
    assert e.value.status_code == 404


@pytest.mark.parametrize(("status", "error"), [(503, BUSY), (500, "llama runner process died")])
@pytest.mark.parametrize("stream", [False, True])
def test_scripted_http_errors_then_recovery(
    fake_ollama: FakeOllama, client: ollama.Client, status: int, error: str, stream: bool
) -> None:
    fake_ollama.fail(status, error, times=2)
    fake_ollama.reply("finally")

    for _ in range(2):
        with pytest.raises(ollama.ResponseError) as e:
            chat(client, stream=stream)
        assert (e.value.status_code, e.value.error) == (status, error)
    assert chat(client, stream=stream) == "finally"


def test_a_failure_for_one_model_leaves_others_alone(fake_ollama: FakeOllama) -> None:
    fake_ollama.models.append("llama3.2:latest")
    fake_ollama.fail(503, BUSY, model="llama3.2")
    fake_ollama.reply("fine")
    with ollama.Client(host=fake_ollama.url) as client:
        assert client.chat(model=MODEL, messages=ASK).message.content == "fine"
        with pytest.raises(ollama.ResponseError, match="server busy"):
            client.generate(model="llama3.2", prompt="")


def test_an_error_line_mid_stream_raises_after_the_partial_content(
    fake_ollama: FakeOllama, client: ollama.Client
) -> None:
    fake_ollama.error_mid_stream("an error was encountered while running the model", "par")
    got: list[str] = []

    with pytest.raises(ollama.ResponseError) as e:
        drain(client.chat(model=MODEL, messages=ASK, stream=True), got)

    assert got == ["par"]
    assert e.value.error == "an error was encountered while running the model"
    assert e.value.status_code == -1  # the status line said 200; the client knows no code


def test_an_error_mid_generation_unstreamed_is_a_500(
    fake_ollama: FakeOllama, client: ollama.Client
) -> None:
    fake_ollama.error_mid_stream("out of memory")
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model=MODEL, messages=ASK)
    assert (e.value.status_code, e.value.error) == (500, "out of memory")


def test_the_server_dropping_the_connection_mid_stream(
    fake_ollama: FakeOllama, client: ollama.Client
) -> None:
    fake_ollama.disconnect_mid_stream("half")
    fake_ollama.disconnect_mid_stream()
    got: list[str] = []

    with pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read"):
        drain(client.chat(model=MODEL, messages=ASK, stream=True), got)
    assert got == ["half"]
    with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
        client.chat(model=MODEL, messages=ASK)


# -- timeouts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_a_hang_is_a_read_timeout(fake_ollama: FakeOllama, stream: bool) -> None:
    fake_ollama.hang(30)  # stop() at teardown ends the wait at once
    with (
        ollama.Client(host=fake_ollama.url, timeout=0.3) as client,
        pytest.raises(httpx.ReadTimeout),
    ):
        chat(client, stream=stream)
    fake_ollama.wait_for_requests(1, path="/api/chat")


def test_a_hang_only_on_its_path(fake_ollama: FakeOllama, client: ollama.Client) -> None:
    fake_ollama.hang(30, path="/api/chat")
    assert client.list().models  # not held
    with (
        ollama.Client(host=fake_ollama.url, timeout=0.3) as slow_client,
        pytest.raises(httpx.ReadTimeout),
    ):
        slow_client.chat(model=MODEL, messages=ASK)


def test_a_stream_that_stalls_between_chunks_is_a_read_timeout(fake_ollama: FakeOllama) -> None:
    fake_ollama.reply("abcdef", chunks=3)
    fake_ollama.slow(30)
    got: list[str] = []
    with (
        ollama.Client(host=fake_ollama.url, timeout=0.3) as client,
        pytest.raises(httpx.ReadTimeout),
    ):
        drain(client.chat(model=MODEL, messages=ASK, stream=True), got)
    assert got == ["ab"]  # the first line comes at once, then nothing


# -- down and back ----------------------------------------------------------------------------


def test_stopped_means_refused_and_start_comes_back_on_the_same_port(
    fake_ollama: FakeOllama, client: ollama.Client
) -> None:
    url = fake_ollama.url
    fake_ollama.stop()

    with pytest.raises(ConnectionError, match="Failed to connect to Ollama"):
        client.chat(model=MODEL, messages=ASK)  # the client maps httpx.ConnectError
    stream = client.chat(model=MODEL, messages=ASK, stream=True)  # nothing sent yet
    with pytest.raises(httpx.ConnectError):  # not mapped when streaming
        next(stream)
    assert not issubclass(httpx.ConnectError, ConnectionError)
    with pytest.raises(ConnectionError):
        client.list()
    with httpx.Client(base_url=url) as http, pytest.raises(httpx.ConnectError):
        http.get("/api/version")

    fake_ollama.start()
    fake_ollama.reply("back")
    assert fake_ollama.url == url
    assert client.chat(model=MODEL, messages=ASK).message.content == "back"


def test_stop_drops_a_stream_in_flight(fake_ollama: FakeOllama, client: ollama.Client) -> None:
    fake_ollama.reply("one two three", chunks=3)
    fake_ollama.slow(30)
    stream = client.chat(model=MODEL, messages=ASK, stream=True)
    assert next(stream).message.content == "one t"

    fake_ollama.stop()

    with pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read"):
        next(stream)


def test_stop_ends_a_hung_request_unanswered(fake_ollama: FakeOllama) -> None:
    fake_ollama.hang(60)
    outcome: list[BaseException] = []

    def call() -> None:
        with ollama.Client(host=fake_ollama.url) as c:
            try:
                c.chat(model=MODEL, messages=ASK)
            except BaseException as e:
                outcome.append(e)

    caller = threading.Thread(target=call)
    caller.start()
    fake_ollama.wait_for_requests(1, path="/api/chat")
    fake_ollama.stop()
    caller.join(timeout=10)

    assert not caller.is_alive()
    assert [type(e) for e in outcome] == [httpx.RemoteProtocolError]


def test_stop_is_idempotent_and_leaves_no_threads() -> None:
    before = set(threading.enumerate())
    fake = FakeOllama()
    fake.start()
    with httpx.Client(base_url=fake.url) as http:  # a kept-alive connection stays open
        assert http.get("/api/version").json() == {"version": "0.12.0"}
        fake.stop()
        fake.stop()
    assert set(threading.enumerate()) <= before


# -- the other endpoints ----------------------------------------------------------------------


def test_tags_version_show_ps_and_root(fake_ollama: FakeOllama, client: ollama.Client) -> None:
    fake_ollama.models.append("llama3.2")

    assert [m.model for m in client.list().models] == [MODEL, "llama3.2:latest"]
    show = client.show(MODEL)
    assert show.modelinfo is not None and show.modelinfo["qwen2.context_length"] == 32768
    with pytest.raises(ollama.ResponseError) as e:
        client.show("nope")
    assert e.value.status_code == 404
    assert client.ps().models == []

    with httpx.Client(base_url=fake_ollama.url) as http:
        tags = http.get("/api/tags").json()["models"]
        assert {"name", "model", "modified_at", "size", "digest", "details"} <= set(tags[0])
        assert tags[0]["name"] == MODEL
        assert http.get("/api/version").json() == {"version": "0.12.0"}
        assert http.get("/").text == "Ollama is running"
        assert http.head("/").status_code == 200
        assert http.get("/api/nothing").status_code == 404


def test_wait_for_requests_fails_at_its_deadline(fake_ollama: FakeOllama) -> None:
    with pytest.raises(AssertionError, match="got 0 requests to /api/chat"):
        fake_ollama.wait_for_requests(1, timeout=0.05, path="/api/chat")
