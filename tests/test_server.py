"""The operator's view: HTTP endpoints, Prometheus metrics, resource guards."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request

from conftest import PY, Daemon, Project, wait_until
from fake_ollama import FakeOllama

from daemon import config as configuration
from daemon.supervisor import Supervisor


def get(url: str, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(
        url, headers={"Authorization": f"Bearer {token}"} if token else {}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def served(d: Daemon) -> str:
    found = wait_until(lambda: re.search(r"/metrics on (http://\S+)", d.text()), what="the server")
    return found[1]


def test_endpoints_before_and_after_a_ticket(project: Project, daemons: list) -> None:
    project.write_config(server={"enabled": True, "port": 0})
    daemons.append(d := Daemon(project))
    url = served(d)

    assert get(url + "/health")[0] == 200
    status, ready = get(url + "/ready")
    assert status == 200 and json.loads(ready)["watcher"] is True
    assert json.loads(get(url + "/health/ollama")[1]) == {"enabled": False}
    metrics = get(url + "/metrics")[1]
    assert 'ticketd_queue_depth{folder="todo"} 0.0' in metrics
    assert "process_resident_memory_bytes" in metrics
    assert "ticketd_ollama_circuit_state{" not in metrics  # no host: nothing uses Ollama

    project.ticket("task-1 - Measured.md")
    wait_until(lambda: project.where() == {"done": ["task-1 - Measured.md"]}, what="done")
    done = 'ticketd_tickets_total{outcome="done"} 1.0'
    wait_until(lambda: done in get(url + "/metrics")[1], what="the counter")
    metrics = get(url + "/metrics")[1]
    assert 'ticketd_queue_depth{folder="done"} 1.0' in metrics
    assert 'ticketd_stage_duration_seconds_count{stage="push"} 1.0' in metrics
    assert "ticketd_ticket_duration_seconds_count 1.0" in metrics
    report = json.loads(get(url + "/status")[1])
    assert report["counts"]["done"] == 1 and report["recent"][0]["outcome"] == "done"
    assert get(url + "/nope")[0] == 404


def test_a_bearer_token_guards_every_endpoint(project: Project, daemons: list) -> None:
    import os

    os.environ["TICKETD_TEST_SERVER_TOKEN"] = "s3rv3r-t0k3n"
    try:
        project.write_config(
            server={"enabled": True, "port": 0, "token_env": "TICKETD_TEST_SERVER_TOKEN"}
        )
        daemons.append(d := Daemon(project))
        url = served(d)
        assert get(url + "/health")[0] == 401
        assert get(url + "/metrics", "wrong")[0] == 401
        assert get(url + "/health", "s3rv3r-t0k3n")[0] == 200
    finally:
        del os.environ["TICKETD_TEST_SERVER_TOKEN"]


def test_ollama_health_while_it_is_down(
    project: Project, fake_ollama: FakeOllama, daemons: list
) -> None:
    project.write_config(
        agent={"kind": "builtin"},
        server={"enabled": True, "port": 0},
        ollama={
            "host": fake_ollama.url,
            "health_check": {"interval_s": 0.2, "timeout_s": 1},
            "circuit_breaker": {"failure_threshold": 1, "reset_timeout_s": 0.3},
        },
    )
    daemons.append(d := Daemon(project))
    url = served(d)
    status, body = get(url + "/health/ollama")
    assert status == 200 and json.loads(body)["breaker"] == "CLOSED"
    (host,) = json.loads(body)["hosts"]
    assert host["host"] == fake_ollama.url and host["breaker"] == "CLOSED"
    assert host["models"] == {"qwen2.5-coder:7b": True} and host["tickets"] == 0
    fake_ollama.stop()
    wait_until(lambda: get(url + "/health/ollama")[0] == 503, what="503 while Ollama is down")
    metric = f'ticketd_ollama_circuit_state{{host="{fake_ollama.url}"}} 2.0'
    assert metric in get(url + "/metrics")[1]
    fake_ollama.start()
    wait_until(lambda: get(url + "/health/ollama")[0] == 200, what="200 once it is back")


def test_no_claims_while_the_load_is_over_the_guard(project: Project) -> None:
    project.write_config(concurrency={"max_load": 0.0001, "min_free_memory_mb": 0})
    project.ticket("task-2 - Waits.md")
    sup = Supervisor(configuration.load(project.config_path), once=True, log_to_stderr=False)
    import os

    if os.getloadavg()[0] <= 0.0001:  # an idle machine: make the guard about memory instead
        project.write_config(concurrency={"min_free_memory_mb": 10**9})
        sup = Supervisor(configuration.load(project.config_path), once=True, log_to_stderr=False)
    assert sup._short_of_resources()
    _, ready = sup.intake()
    sup.store.close()
    assert ready == 1 and project.where() == {"todo": ["task-2 - Waits.md"]}


def test_an_agent_over_its_memory_limit_is_ended(project: Project) -> None:
    hog = [PY, "-c", "import time; x = bytearray(300 * 1024 * 1024); time.sleep(60)"]
    project.write_config(agent={"command": hog, "max_memory_mb": 100, "kill_grace_s": 0.5})
    project.ticket("task-3 - Hog.md")
    assert (
        Supervisor(configuration.load(project.config_path), once=True, log_to_stderr=False).run()
        == 1
    )
    err = json.loads((project.folder("failed") / "task-3 - Hog.error.json").read_text())
    assert err["errorCode"] == "AGENT_OOM" and "agent.max_memory_mb (100 MiB)" in err["error"]
