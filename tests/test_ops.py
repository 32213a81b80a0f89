"""systemd integration of a real daemon process, and the stats/insights/install-service CLI."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import Project, notified_daemon, ticketd


def test_sd_notify_ready_watchdog_stopping(project: Project, tmp_path: Path) -> None:
    messages: list[str] = []
    with notified_daemon(project, tmp_path, WATCHDOG_USEC="400000") as (proc, sock):
        sock.settimeout(10)

        def received(text: str) -> bool:
            while not any(text in m for m in messages):
                messages.append(sock.recv(4096).decode())
            return True

        assert received("READY=1")
        start = time.monotonic()
        pings = 0
        while pings < 3:
            if "WATCHDOG=1" in sock.recv(4096).decode():
                pings += 1
        assert time.monotonic() - start < 5  # every WATCHDOG_USEC/2 while the loop turns
        proc.send_signal(signal.SIGTERM)
        assert received("STOPPING=1")
        assert proc.wait(timeout=30) == 0
    assert any("STATUS=" in m for m in messages)


def test_stats_and_insights_commands(project: Project) -> None:
    project.ticket("task-1 - Counted.md", labels=["docs"])
    assert ticketd("run", "--once", "--config", str(project.config_path)).returncode == 0
    result = ticketd("stats", "--json", "--config", str(project.config_path))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["outcomes"]["done"] == 1
    assert "push" in report["stages"]
    tables = ticketd("stats", "--config", str(project.config_path))
    assert tables.returncode == 0 and "push" in tables.stdout
    learned = ticketd("insights", "--json", "--config", str(project.config_path))
    assert learned.returncode == 0, learned.stderr
    assert json.loads(learned.stdout)["lessons"] == []


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is absent")
@pytest.mark.parametrize("scope", [[], ["--user"]])
def test_install_service_print_renders_a_unit_systemd_accepts(
    project: Project, tmp_path: Path, scope: list[str]
) -> None:
    result = ticketd("install-service", "--print", *scope, "--config", str(project.config_path))
    assert result.returncode == 0, result.stderr
    unit = result.stdout
    assert (
        f"--config {project.config_path}" in unit
        and "@" not in unit.split("[Unit]")[1].split("%")[0]
    )
    assert "Type=notify" in unit and "WatchdogSec=" in unit and "ProtectSystem=strict" in unit
    assert str(project.root / "state") in unit  # ReadWritePaths
    path = tmp_path / "ticketd.service"
    path.write_text(unit)
    verify = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "ticketd.service" not in verify.stdout + verify.stderr, verify.stderr
