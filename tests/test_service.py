"""sd_notify over a real datagram socket, and the systemd units as systemd-analyze sees them."""

from __future__ import annotations

import os
import re
import shutil
import socket
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon import service
from daemon.sdnotify import Notifier

ROOT = Path(__file__).resolve().parents[1]
PLACEHOLDER = re.compile(r"@[A-Z][A-Z_]*@")
needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


class Manager:
    """The service manager's end of NOTIFY_SOCKET: a bound AF_UNIX datagram socket."""

    def __init__(self, sock: socket.socket, env: str) -> None:
        self.sock = sock
        self.env = env  # the NOTIFY_SOCKET value systemd would set
        sock.settimeout(5)  # a deadline for each message, not a sleep

    def receive(self) -> str:
        return self.sock.recv(4096).decode()

    def nothing_waiting(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(4096)
        except BlockingIOError:
            return True
        finally:
            self.sock.settimeout(5)
        return False


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[Manager]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify"))
        yield Manager(sock, str(tmp_path / "notify"))


@pytest.fixture
def abstract_manager() -> Iterator[Manager]:
    name = f"ticketd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        yield Manager(sock, "@" + name)


# -- sd_notify ------------------------------------------------------------------------------------


def test_every_message_reaches_the_socket(manager: Manager) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": manager.env})
    assert notifier.enabled

    assert notifier.ready()
    assert manager.receive() == "READY=1"
    assert notifier.status("queue 3, running task-7")
    assert manager.receive() == "STATUS=queue 3, running task-7"
    assert notifier.watchdog()
    assert manager.receive() == "WATCHDOG=1"
    assert notifier.extend_timeout(90)
    assert manager.receive() == "EXTEND_TIMEOUT_USEC=90000000"
    assert notifier.stopping()
    assert manager.receive() == "STOPPING=1"


def test_ready_and_stopping_can_carry_the_status_line(manager: Manager) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": manager.env})
    notifier.ready(status="watching\nbacklog/todo")
    assert manager.receive() == "READY=1\nSTATUS=watching backlog/todo"  # one line, one datagram
    notifier.stopping(status="waiting for 1 ticket")
    assert manager.receive() == "STOPPING=1\nSTATUS=waiting for 1 ticket"
    notifier.reloading(monotonic_usec=123)
    assert manager.receive() == "RELOADING=1\nMONOTONIC_USEC=123"


def test_an_abstract_namespace_socket_works(abstract_manager: Manager) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": abstract_manager.env})
    assert notifier.ready()
    assert abstract_manager.receive() == "READY=1"


def test_extend_timeout_rounds_up_to_whole_microseconds(manager: Manager) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": manager.env})
    notifier.extend_timeout(0.0000015)
    assert manager.receive() == "EXTEND_TIMEOUT_USEC=2"
    with pytest.raises(ValueError, match="positive"):
        notifier.extend_timeout(0)


def test_without_notify_socket_nothing_is_sent(manager: Manager) -> None:
    notifier = Notifier.from_env({"WATCHDOG_USEC": "60000000"})
    assert not notifier.enabled
    assert notifier.watchdog_interval() is None
    assert not notifier.ready()
    assert not notifier.status("x")
    assert not notifier.watchdog()
    assert not notifier.extend_timeout(5)
    assert not notifier.stopping()
    assert manager.nothing_waiting()


@pytest.mark.parametrize("value", ["", "vsock:2:1234", "relative/path"])
def test_an_unusable_notify_socket_disables_the_notifier(value: str) -> None:
    assert not Notifier.from_env({"NOTIFY_SOCKET": value}).enabled


def test_a_failed_send_returns_false_and_raises_nothing(tmp_path: Path) -> None:
    gone = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert gone.enabled
    assert gone.ready() is False
    assert gone.watchdog() is False
    too_long = Notifier.from_env({"NOTIFY_SOCKET": "/" + "x" * 200})
    assert too_long.status("x") is False


@pytest.mark.parametrize(
    ("env", "interval"),
    [
        ({"WATCHDOG_USEC": "60000000"}, 30.0),
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "4242"}, 0.5),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "4243"}, None),  # meant for another
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "x"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec_for_our_pid(
    env: dict[str, str], interval: float | None
) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": "@x", **env}, pid=4242)
    assert notifier.watchdog_interval() == interval


def test_watchdog_pid_defaults_to_this_process() -> None:
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier.from_env(env).watchdog_interval() == 2.0


# -- rendering ------------------------------------------------------------------------------------


@pytest.fixture
def executable(tmp_path: Path) -> Path:
    """A stand-in for the ticketd console script: systemd-analyze checks ExecStart= exists."""
    path = tmp_path / "venv" / "bin" / "ticketd"
    path.parent.mkdir(parents=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def _render(user_unit: bool, root: Path, executable: Path, **overrides: object) -> str:
    args: dict[str, object] = {
        "executable": executable,
        "config": root / "config.yaml",
        "workdir": root,
        "rw_paths": [root / "repo", root / "backlog", root / "state", root / "logs"],
        "user": None if user_unit else "ticketd",
    }
    args.update(overrides)
    return service.render(service.load_template(user_unit), **args)  # type: ignore[arg-type]


def _settings(text: str, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in text.splitlines() if line.startswith(f"{key}=")]


@pytest.mark.parametrize("user_unit", [False, True])
def test_render_fills_in_every_placeholder(
    user_unit: bool, tmp_path: Path, executable: Path
) -> None:
    text = _render(user_unit, tmp_path, executable, environment={"OLLAMA_HOST": "http://gpu:11434"})
    assert not PLACEHOLDER.findall(text)
    assert _settings(text, "ExecStart") == [f"{executable} run --config {tmp_path}/config.yaml"]
    assert _settings(text, "WorkingDirectory") == [str(tmp_path)]
    rw = " ".join(str(tmp_path / d) for d in ("repo", "backlog", "state", "logs"))
    assert _settings(text, "ReadWritePaths") == [rw]
    assert "Environment=OLLAMA_HOST=http://gpu:11434" in text.splitlines()
    assert _settings(text, "User") == ([] if user_unit else ["ticketd"])
    for key, value in [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("WatchdogSec", "60"),
        ("Restart", "on-failure"),
        ("RestartSec", "10"),
        ("TimeoutStopSec", "120"),
        ("KillMode", "mixed"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("PrivateTmp", "yes"),
    ]:
        assert _settings(text, key) == [value], key


def test_user_unit_leaves_out_what_a_user_manager_cannot_do(
    tmp_path: Path, executable: Path
) -> None:
    text = _render(True, tmp_path, executable)
    for key in ("User", "Group", "ProtectControlGroups", "ProtectHome"):
        assert not _settings(text, key), key
    assert _settings(text, "WantedBy") == ["default.target"]
    assert _settings(_render(False, tmp_path, executable), "WantedBy") == ["multi-user.target"]


def test_system_unit_without_a_user_has_no_user_line(tmp_path: Path, executable: Path) -> None:
    text = _render(False, tmp_path, executable, user=None)
    assert not _settings(text, "User")
    assert not PLACEHOLDER.findall(text)


def test_render_quotes_what_systemd_would_otherwise_split_or_expand(tmp_path: Path) -> None:
    root = Path("/srv/my tickets/100%$x")
    text = _render(
        False,
        root,
        Path("/opt/$HOME/bin/ticketd"),
        rw_paths=[root, root / "state", root],  # nested and repeated paths collapse
        environment={"NOTE": 'say "hi"'},
    )
    assert _settings(text, "ExecStart") == [
        '/opt/$HOME/bin/ticketd run --config "/srv/my tickets/100%%$$x/config.yaml"'
    ]  # the program is never variable-expanded, its arguments are
    assert _settings(text, "WorkingDirectory") == ["/srv/my tickets/100%%$x"]
    assert _settings(text, "ReadWritePaths") == ['"/srv/my tickets/100%%$x"']
    assert 'Environment="NOTE=say \\"hi\\""' in text.splitlines()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"config": Path("config.yaml")}, "config must be an absolute path"),
        ({"rw_paths": [Path("state")]}, "rw_paths entry must be an absolute path"),
        ({"rw_paths": []}, "rw_paths is empty"),
        ({"workdir": Path("/srv/a\nb")}, "control character"),
        ({"user": "root; rm"}, "not a valid user name"),
        ({"environment": {"BAD-NAME": "1"}}, "not a valid environment variable name"),
    ],
)
def test_render_refuses_values_no_unit_file_can_hold(
    overrides: dict[str, object], message: str, tmp_path: Path, executable: Path
) -> None:
    with pytest.raises(ValueError, match=message):
        _render(False, tmp_path, executable, **overrides)


def test_a_user_unit_takes_no_user(tmp_path: Path, executable: Path) -> None:
    with pytest.raises(ValueError, match="no User="):
        _render(True, tmp_path, executable, user="ticketd")


def test_an_unknown_placeholder_is_an_error(tmp_path: Path, executable: Path) -> None:
    with pytest.raises(ValueError, match="@GROUP@"):
        service.render(
            "[Service]\nGroup=@GROUP@\n",
            executable=executable,
            config=tmp_path / "c.yaml",
            workdir=tmp_path,
            rw_paths=[tmp_path],
            user=None,
        )


def test_systemd_folder_links_to_the_packaged_templates() -> None:
    for user_unit, name in service.TEMPLATES.items():
        link = ROOT / "systemd" / name
        assert link.is_symlink()
        assert link.resolve() == (ROOT / "daemon" / "units" / name).resolve()
        assert link.read_text() == service.load_template(user_unit)


def test_unit_paths(tmp_path: Path) -> None:
    assert service.unit_path(False, tmp_path) == Path("/etc/systemd/system/ticketd.service")
    assert service.unit_path(True, tmp_path) == tmp_path / ".config/systemd/user/ticketd.service"


def test_install_writes_the_unit_and_its_folders(tmp_path: Path) -> None:
    path = service.unit_path(True, tmp_path)
    assert service.install("[Unit]\n", path) == path
    assert path.read_text() == "[Unit]\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    service.install("[Service]\n", path)
    assert path.read_text() == "[Service]\n"
    assert [p.name for p in path.parent.iterdir()] == ["ticketd.service"]  # no temp file left


# -- systemd-analyze ------------------------------------------------------------------------------


@needs_systemd_analyze
@pytest.mark.parametrize("user_unit", [False, True])
def test_rendered_units_pass_systemd_analyze_verify(
    user_unit: bool, tmp_path: Path, executable: Path
) -> None:
    text = _render(user_unit, tmp_path, executable, environment={"OLLAMA_HOST": "http://h:1"})
    ok, output = service.verify(text)
    assert ok, output
    assert output == ""


@needs_systemd_analyze
def test_quoted_paths_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    root = tmp_path / "my tickets" / "100%$x"
    bin_dir = root / "bin $x"
    bin_dir.mkdir(parents=True)
    (bin_dir / "ticketd").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "ticketd").chmod(0o755)
    text = _render(False, root, bin_dir / "ticketd", rw_paths=[root])
    ok, output = service.verify(text)
    assert ok, output


@needs_systemd_analyze
def test_verify_reports_what_systemd_analyze_says(tmp_path: Path, executable: Path) -> None:
    text = _render(False, tmp_path, executable).replace("[Service]\n", "[Service]\nBogus=1\n")
    ok, output = service.verify(text)
    assert not ok
    assert "ticketd.service:" in output and "Bogus" in output
    assert "ticketd-verify-" not in output  # names the unit, not its temporary copy

    ok, output = service.verify(_render(False, tmp_path, tmp_path / "missing"))
    assert not ok
    assert "is not executable" in output
