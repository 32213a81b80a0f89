"""The Ollama client wrapper and the circuit breaker, against the fake Ollama."""

from __future__ import annotations

import pytest
from fake_ollama import BUSY, FakeOllama

from daemon.llm.breaker import CircuitBreaker, State
from daemon.llm.client import Call, LLMError, Ollama, check_health

MODEL = "qwen2.5-coder:7b"
HELLO = [{"role": "user", "content": "hello"}]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_half_opens_and_closes_on_an_injected_clock() -> None:
    clock = Clock()
    b = CircuitBreaker(failure_threshold=2, success_threshold=2, half_open_requests=1,
                       reset_timeout_s=10, clock=clock)  # fmt: skip
    b.failure()
    assert b.state is State.CLOSED and b.allow()
    b.success()  # a success resets the count
    b.failure()
    b.failure()
    assert b.state is State.OPEN and not b.allow() and b.retry_in() == 10
    clock.now += 9.9
    assert not b.allow()
    clock.now += 0.1
    assert b.state is State.HALF_OPEN
    assert b.allow() and not b.allow()  # one trial at a time
    b.success()
    assert b.state is State.HALF_OPEN and b.allow()
    b.success()
    assert b.state is State.CLOSED
    b.failure()
    b.failure()
    clock.now += 10
    assert b.allow()
    b.failure()  # a failed trial opens it again at once
    assert b.state is State.OPEN and b.retry_in() == 10


def client(fake: FakeOllama, **kw: object) -> tuple[Ollama, list[Call], list[float]]:
    slept: list[float] = []
    breaker = CircuitBreaker(failure_threshold=kw.pop("threshold", 5))  # type: ignore[arg-type]
    llm = Ollama(fake.url, breaker=breaker, sleep=slept.append, num_ctx=4096, **kw)  # type: ignore[arg-type]
    return llm, [], slept


def test_streamed_reply_with_token_counts(fake_ollama: FakeOllama) -> None:
    llm, calls, _ = client(fake_ollama)
    fake_ollama.reply("Hi there, friend.", prompt_eval_count=42, eval_count=7, chunks=4)
    reply = llm.chat(MODEL, HELLO, on_call=calls.append)
    llm.close()
    assert reply.content == "Hi there, friend."
    assert (reply.call.prompt_tokens, reply.call.eval_tokens, reply.call.outcome) == (42, 7, "ok")
    assert calls == [reply.call]
    sent = fake_ollama.requests_to("/api/chat")[0]
    assert sent.stream is True and sent.options["num_ctx"] == 4096 and sent.keep_alive == "10m"


@pytest.mark.parametrize(("status", "error"), [(503, BUSY), (500, "boom")])
def test_transient_http_errors_are_retried_with_backoff(
    fake_ollama: FakeOllama, status: int, error: str
) -> None:
    llm, calls, slept = client(fake_ollama, retries=3)
    fake_ollama.fail(status, error, times=2)
    fake_ollama.reply("finally")
    assert llm.chat(MODEL, HELLO, on_call=calls.append).content == "finally"
    llm.close()
    assert [c.outcome for c in calls] == ["unavailable", "unavailable", "ok"]
    assert len(slept) == 2 and 0 < slept[0] <= 2 and slept[1] > 0


def test_an_error_mid_stream_is_retried(fake_ollama: FakeOllama) -> None:
    llm, calls, _ = client(fake_ollama, retries=1)
    fake_ollama.error_mid_stream("out of memory")
    fake_ollama.reply("second time")
    assert llm.chat(MODEL, HELLO, on_call=calls.append).content == "second time"
    llm.close()
    assert [c.outcome for c in calls] == ["unavailable", "ok"]


def test_missing_model_is_not_retried(fake_ollama: FakeOllama) -> None:
    llm, calls, slept = client(fake_ollama, retries=3)
    with pytest.raises(LLMError) as caught:
        llm.chat("nope:1b", HELLO, on_call=calls.append)
    llm.close()
    assert caught.value.code == "MODEL_NOT_FOUND"
    assert "ollama pull nope:1b" in caught.value.message
    assert slept == [] and [c.outcome for c in calls] == ["not_found"]
    assert llm.breaker.state is State.CLOSED


def test_a_hanging_reply_times_out(fake_ollama: FakeOllama) -> None:
    llm, calls, _ = client(fake_ollama, retries=1, timeout_s=0.3)
    fake_ollama.hang(10)
    fake_ollama.hang(10)
    with pytest.raises(LLMError) as caught:
        llm.chat(MODEL, HELLO, on_call=calls.append)
    llm.close()
    assert caught.value.code == "LLM_TIMEOUT"
    assert [c.outcome for c in calls] == ["timeout", "timeout"]


def test_a_stopped_server_opens_the_breaker_and_requests_stop_going_out(
    fake_ollama: FakeOllama,
) -> None:
    llm, calls, _ = client(fake_ollama, retries=5, threshold=2)
    fake_ollama.stop()
    with pytest.raises(LLMError) as caught:
        llm.chat(MODEL, HELLO, on_call=calls.append)
    llm.close()
    assert caught.value.code == "OLLAMA_UNAVAILABLE"
    assert "circuit open" in caught.value.message
    assert len(calls) == 2  # the third try was refused by the open breaker, not sent
    assert llm.breaker.state is State.OPEN


def test_health_names_missing_models(fake_ollama: FakeOllama) -> None:
    health = check_health(fake_ollama.url, [MODEL, "other:1b"], timeout_s=2)
    assert health.ok and health.version and health.missing == ("other:1b",)
    fake_ollama.stop()
    down = check_health(fake_ollama.url, [MODEL], timeout_s=2)
    assert not down.ok and down.error
