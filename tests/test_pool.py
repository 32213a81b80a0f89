"""A pool of Ollama hosts (``ollama.hosts``): three fake Ollama servers, each spoken to over
HTTP by the real client; the daemon, git, the agents and their sandbox are real.

Tickets spread by load and weight, a model present on one host only goes there, a host
going down mid-run moves the run to another (both agents), with none left the ticket waits
in todo/, every call of one ticket reaches one host, and a host's max_tickets holds the
others back."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import Project, Running, ticketd, wait_until
from fake_ollama import FakeOllama
from test_agents import AIDER_LIKE, writes
from test_builtin import MODEL, block
from test_server import get

from daemon import config as configuration
from daemon.errors import ConfigError
from daemon.llm.breaker import CircuitBreaker
from daemon.llm.client import Ollama
from daemon.llm.health import Monitor
from daemon.llm.pool import Host, Pool
from daemon.supervisor import Supervisor

BIG = "big-coder:32b"
EDIT = block("README.md", "hello\n", "hello world\n")


@pytest.fixture
def fakes() -> Iterator[list[FakeOllama]]:
    """Three fake Ollama servers serving MODEL; each fails its test on an unscripted call."""
    with FakeOllama() as a, FakeOllama() as b, FakeOllama() as c:
        yield [a, b, c]
        problems = [p for fake in (a, b, c) for p in fake.problems()]
    if problems:
        pytest.fail("fake Ollama: " + "; ".join(problems), pytrace=False)


def configure(project: Project, hosts: list[Any], **sections: Any) -> None:
    """The builtin agent on a pool of ``hosts``; tight health checks, no retries."""
    ollama = {
        "hosts": hosts,
        "models": [MODEL],
        "num_ctx": 8192,
        "num_predict": 1024,
        "retries": 0,
        "health_check": {"interval_s": 0.2, "timeout_s": 2},
        "circuit_breaker": {"failure_threshold": 1, "reset_timeout_s": 0.3},
        **sections.pop("ollama", {}),
    }
    agent = {"kind": "builtin", "max_reflections": 1, "candidates": 1}
    agent |= {"edit_format": "search-replace", **sections.pop("agent", {})}
    project.write_config(agent=agent, ollama=ollama, **sections)


WORDS = ["alpha banner colour", "bravo footer spacing", "charlie sidebar width"]


def distinct_tickets(project: Project, n: int) -> None:
    """``n`` tickets unlike each other (alike, all but the first would be held as duplicates)."""
    for i in range(1, n + 1):
        words = WORDS[i - 1]
        project.ticket(f"task-{i} - {words.title().replace(' ', '-')}.md", body=f"Fix the {words}.")


def supervisor(project: Project, *, once: bool = True) -> Supervisor:
    return Supervisor(configuration.load(project.config_path), once=once, log_to_stderr=False)


def chats(fake: FakeOllama) -> int:
    return len(fake.requests_to("/api/chat"))


def history(project: Project, sql: str) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(project.root / "state" / "history.sqlite3")
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def while_a_goes_down(project: Project, a: FakeOllama) -> None:
    """Run the daemon (once) while ``a`` takes the first chat and then goes away."""
    a.hang(30, path="/api/chat")
    runner = threading.Thread(target=supervisor(project).run)
    runner.start()
    a.wait_for_requests(1, path="/api/chat")
    a.stop()
    runner.join(timeout=60)


def task_log(project: Project, task_id: str) -> str:
    return (project.root / "logs" / "tasks" / f"{task_id}.log").read_text()


# -- routing, on the pool itself -------------------------------------------------------------


def pool_of(*hosts: tuple[FakeOllama, float, int | None], models: list[str]) -> Pool:
    """A pool of the fakes, each checked once (no monitor thread)."""
    made = []
    for fake, weight, max_tickets in hosts:
        llm = Ollama(fake.url, breaker=CircuitBreaker(failure_threshold=1))
        monitor = Monitor(llm, models, interval_s=60, timeout_s=2, on_available=lambda: None)
        assert monitor.check_now() is not None
        made.append(Host(fake.url, weight, max_tickets, llm, monitor))
    return Pool(made)


def test_the_least_busy_host_by_weight_and_max_tickets(fakes: list[FakeOllama]) -> None:
    a, b, c = fakes
    pool = pool_of((a, 2, None), (b, 1, 2), (c, 1, None), models=[MODEL])
    try:
        routes = [pool.route([MODEL]) for _ in range(8)]
        where = [r.url if r else None for r in routes]
        # a carries twice the others' share; b stops at its max_tickets (2)
        assert where == [a.url, b.url, c.url, a.url, a.url, b.url, c.url, a.url]
        assert pool.tickets() == {a.url: 4, b.url: 2, c.url: 2}
        routes[1].close()  # type: ignore[union-attr]  # b has room again
        routes[1].close()  # type: ignore[union-attr]  # closing twice frees one place
        assert pool.tickets()[b.url] == 1
        c.stop()
        pool.hosts[2].monitor.check_now()  # the health check finds c down
        assert {pool.route([MODEL]).url for _ in range(3)} == {a.url, b.url}  # type: ignore[union-attr]
    finally:
        for host in pool.hosts:
            host.llm.close()


def test_a_model_on_one_host_only_goes_there_or_waits_for_it(fakes: list[FakeOllama]) -> None:
    a, b, c = fakes
    c.models.append(BIG)
    pool = pool_of((a, 1, None), (b, 1, None), (c, 1, 1), models=[MODEL, BIG])
    try:
        first = pool.route([BIG, MODEL])
        assert first is not None and first.url == c.url
        assert pool.route([BIG, MODEL]) is None  # c is full: it waits for c, not for a lesser model
        assert pool.route([MODEL]).url == a.url  # type: ignore[union-attr]
        c.stop()
        pool.hosts[2].monitor.check_now()
        second = pool.route([BIG, MODEL])  # no host has BIG now: its next model, elsewhere
        assert second is not None and second.url == b.url
        assert pool.choose(["nowhere:1b"]) is not None  # on no host: it fails as on one host
        assert pool.choose([MODEL], review=BIG) is not None
    finally:
        for host in pool.hosts:
            host.llm.close()


# -- the daemon on three hosts ---------------------------------------------------------------


def test_tickets_spread_over_the_hosts_by_load(project: Project, fakes: list[FakeOllama]) -> None:
    configure(project, [f.url for f in fakes], concurrency={"max_tickets": 3})
    for fake in fakes:
        fake.default_reply = EDIT
    distinct_tickets(project, 3)

    assert supervisor(project).run() == 0

    assert len(project.where()["done"]) == 3
    assert [chats(f) for f in fakes] == [1, 1, 1]
    hosts = history(project, "SELECT task_id, host FROM runs ORDER BY task_id")
    assert sorted(h for _, h in hosts) == sorted(f.url for f in fakes)
    assert f"pinned to Ollama at {hosts[0][1]}" in task_log(project, "task-1")


def test_a_model_on_one_host_only_is_routed_there(
    project: Project, fakes: list[FakeOllama]
) -> None:
    a, b, c = fakes
    c.models.append(BIG)
    configure(project, [a.url, b.url, c.url])
    c.reply(EDIT, model=BIG)
    project.ticket("task-1 - Big.md", body="Change README.md to say hello world.", model=BIG)

    assert supervisor(project).run() == 0

    assert project.where() == {"done": ["task-1 - Big.md"]}
    assert [chats(a), chats(b), chats(c)] == [0, 0, 1]
    assert c.requests_to("/api/chat")[0].model == BIG


def test_every_call_of_a_ticket_reaches_its_one_host(
    project: Project, fakes: list[FakeOllama]
) -> None:
    """Two tickets, each with a reflection and a review: all calls of each on one host."""
    configure(
        project,
        [f.url for f in fakes],
        concurrency={"max_tickets": 2},
        review={"enabled": True},
    )
    approve = json.dumps({"verdict": "approve", "summary": "fine", "issues": []})
    asked: dict[str, int] = {}
    lock = threading.Lock()

    def answer(body: dict[str, Any]) -> str:
        if body.get("format"):
            return approve
        ticket = "task-1" if "task-1" in body["messages"][1]["content"] else "task-2"
        with lock:
            asked[ticket] = asked.get(ticket, 0) + 1
            first = asked[ticket] == 1
        if first:  # an edit that does not apply: the agent reflects
            return block("README.md", "not in the file\n", "x\n")
        return EDIT

    for fake in fakes:
        fake.responder(answer)
    distinct_tickets(project, 2)

    assert supervisor(project).run() == 0

    assert len(project.where()["done"]) == 2
    per_run = history(
        project,
        "SELECT r.task_id, COUNT(*), COUNT(DISTINCT c.host), MIN(c.host) FROM runs r"
        " JOIN llm_calls c ON c.run_id = r.id GROUP BY r.id ORDER BY r.task_id",
    )
    assert [(t, n, hosts) for t, n, hosts, _ in per_run] == [("task-1", 3, 1), ("task-2", 3, 1)]
    assert per_run[0][3] != per_run[1][3]  # the two ran on two hosts
    served = {f.url: chats(f) for f in fakes}
    assert served[per_run[0][3]] == 3 and served[per_run[1][3]] == 3 and sum(served.values()) == 6


def test_a_host_going_down_mid_run_moves_the_run_to_another(
    project: Project, fakes: list[FakeOllama]
) -> None:
    a, b, _ = fakes
    configure(project, [a.url, b.url])
    b.default_reply = EDIT
    project.ticket("task-1 - Greet.md", body="Change README.md to say hello world.")
    while_a_goes_down(project, a)

    assert project.where() == {"done": ["task-1 - Greet.md"]}
    assert chats(b) == 1
    log = task_log(project, "task-1")
    assert f"pinned to Ollama at {a.url}" in log
    assert f"Ollama at {a.url} failed" in log and f"the run goes on at {b.url}" in log
    calls = history(project, "SELECT host, outcome FROM llm_calls ORDER BY rowid")
    assert calls == [(a.url, "unavailable"), (b.url, "ok")]
    assert history(project, "SELECT host, outcome FROM runs") == [(b.url, "done")]


def test_the_command_agent_follows_its_run_to_another_host(
    project: Project, fakes: list[FakeOllama]
) -> None:
    """aider's way: the agent reaches the run's host through OLLAMA_API_BASE, in its
    sandbox; when that host goes, it runs again on the next, told so."""
    a, b, _ = fakes
    configure(project, [a.url, b.url], agent={"kind": "command", "command": AIDER_LIKE})
    b.reply(writes("done.txt", "done\n"))
    project.ticket("task-1 - Write.md")
    while_a_goes_down(project, a)

    assert project.where() == {"done": ["task-1 - Write.md"]}
    asked = b.requests_to("/api/chat")[0].messages[0]["content"]
    assert f"Ollama at {a.url} stopped answering; the run goes on at {b.url}" in asked
    assert history(project, "SELECT host FROM runs") == [(b.url,)]


def test_with_no_host_left_the_ticket_waits_in_todo(
    project: Project, fakes: list[FakeOllama]
) -> None:
    a, b, _ = fakes
    configure(project, [a.url, b.url])
    b.stop()  # down from the start
    project.ticket("task-1 - Greet.md", body="Change README.md to say hello world.")
    while_a_goes_down(project, a)

    assert project.where() == {"todo": ["task-1 - Greet.md"]}  # never failed/ for an outage
    assert history(project, "SELECT outcome, error_code FROM runs") == [
        ("requeued", "OLLAMA_UNAVAILABLE")
    ]


def test_max_tickets_per_host_holds_the_rest_in_todo(
    project: Project, fakes: list[FakeOllama]
) -> None:
    a, b, _ = fakes
    configure(
        project,
        [{"url": a.url, "max_tickets": 1}, {"url": b.url, "max_tickets": 1}],
        concurrency={"max_tickets": 3},
    )
    for fake in (a, b):
        fake.default_reply = EDIT
        fake.slow(0.5)  # a call takes a while: the three tickets overlap
    distinct_tickets(project, 3)
    sup = supervisor(project)
    runner = threading.Thread(target=sup.run)
    runner.start()
    try:
        a.wait_for_requests(1, path="/api/chat")
        b.wait_for_requests(1, path="/api/chat")
        where = project.where()
        report = json.loads(ticketd("status", "--json", cwd=project.root).stdout)
    finally:
        runner.join(timeout=60)

    assert len(where["in-progress"]) == 2 and len(where["todo"]) == 1
    assert {h["host"]: h["maxTickets"] for h in report["ollamaHosts"]} == {a.url: 1, b.url: 1}
    assert sorted(r["ollamaHost"] for r in report["running"]) == sorted([a.url, b.url])
    assert len(project.where()["done"]) == 3
    assert chats(a) + chats(b) == 3


def test_a_reload_counts_the_tickets_already_on_each_host(
    project: Project, fakes: list[FakeOllama]
) -> None:
    a = fakes[0]
    configure(project, [{"url": a.url, "max_tickets": 1}], concurrency={"max_tickets": 2})
    a.default_reply = EDIT
    a.slow(0.5)
    distinct_tickets(project, 1)
    with Running(project) as sup:
        a.wait_for_requests(1, path="/api/chat")
        old = sup.pool
        sup.reload_requested = True
        sup.wake.set()
        wait_until(lambda: sup.pool is not old, what="the reload")
        assert sup.pool is not None and sup.pool.tickets() == {a.url: 1}
        assert sup.pool.choose([MODEL]) is None  # the running ticket still fills the host
        project.ticket("task-2 - Other.md", body="Rename the helper module entirely.")
        wait_until(lambda: len(project.where().get("done", [])) == 2, what="both done")
    assert chats(a) == 2


def test_a_pool_shows_in_health_metrics_and_doctor(
    project: Project, fakes: list[FakeOllama]
) -> None:
    a, b, c = fakes
    b.models.append(BIG)
    c.stop()
    configure(
        project,
        [a.url, b.url, c.url],
        ollama={"models": [MODEL, BIG]},
        server={"enabled": True, "port": 0},
    )
    with Running(project) as sup:
        wait_until(lambda: sup._server is not None, what="the server")
        assert sup._server is not None
        status, text = get(sup._server.url + "/health/ollama")
        body = json.loads(text)
        text = get(sup._server.url + "/metrics")[1]
    assert status == 200 and body["breaker"] == "CLOSED" and body["available"] is True
    hosts = {h["host"]: h for h in body["hosts"]}
    assert hosts[a.url]["models"] == {MODEL: True, BIG: False}
    assert hosts[b.url]["models"] == {MODEL: True, BIG: True}
    assert hosts[c.url]["breaker"] == "OPEN" and hosts[c.url]["error"]
    assert f'ticketd_ollama_circuit_state{{host="{c.url}"}} 2.0' in text
    assert f'ticketd_ollama_host_tickets{{host="{a.url}"}} 0.0' in text

    project.write_config(
        agent={"sandbox": "off", "uses_ollama": True},
        ollama={"hosts": [a.url, b.url, c.url], "models": [MODEL, BIG]},
    )
    doctor = json.loads(ticketd("doctor", "--json", cwd=project.root).stdout)
    checks = {ch["name"]: ch for ch in doctor["checks"]}
    assert checks[f"ollama {a.url}"]["status"] == "ok"
    assert f"has {MODEL}, {BIG}" in checks[f"ollama {b.url}"]["detail"]
    assert checks[f"ollama {c.url}"]["status"] == "warn"  # the others take its tickets
    assert checks[f"model {BIG}"]["status"] == "ok"
    assert f"pulled on {b.url}" in checks[f"model {BIG}"]["detail"]


# -- the configuration -----------------------------------------------------------------------


def parse(text: str) -> configuration.Config:
    return configuration.parse(text, configuration.Path("/x/config.yaml"))


def test_hosts_as_urls_or_mappings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLLAMA_HOST", "http://elsewhere:1")  # a pool is not overridden
    cfg = parse("ollama:\n  hosts:\n    - gpu1:11434\n    - {url: 'https://gpu2/', weight: 2}\n")
    assert [(h.url, h.weight, h.max_tickets) for h in cfg.ollama.pool] == [
        ("http://gpu1:11434", 1, None),
        ("https://gpu2", 2, None),
    ]
    assert cfg.agent_env()["OLLAMA_HOST"] == "http://gpu1:11434"
    one = parse("ollama:\n  host: http://solo:11434\n")
    assert [h.url for h in one.ollama.pool] == ["http://elsewhere:1"]  # $OLLAMA_HOST wins


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("ollama:\n  host: http://a:1\n  hosts: [http://b:1]\n", "not both"),
        ("ollama:\n  hosts: [http://a:1, 'a:1']\n", "http://a:1 listed more than once"),
        ("ollama:\n  hosts: ['ftp://a:1']\n", "is not an http(s)://host:port URL"),
        ("ollama:\n  hosts: ['http://a:port']\n", "is not a URL"),
        ("ollama:\n  hosts: ['http://me:pw@a:1']\n", "a user or password in the URL"),
        ("ollama:\n  hosts:\n    - {url: 'http://a:1', max_tickets: 0}\n", "max_tickets"),
        ("ollama:\n  hosts:\n    - {url: 'http://a:1', weight: 0}\n", "weight"),
    ],
)
def test_bad_hosts_are_refused_naming_the_key(
    text: str, said: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OLLAMA_HOST", raising=False)
    with pytest.raises(ConfigError) as caught:
        parse(text)
    assert said in caught.value.message and "ollama" in caught.value.message
