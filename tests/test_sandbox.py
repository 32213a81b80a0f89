"""The bubblewrap sandbox: real commands run through ``procs.run`` with the sandbox's argv.

Each test runs a small Python program inside and reads what it printed (one JSON line), or
checks from outside what it left behind.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import wait_until
from fake_ollama import FakeOllama

import daemon
from daemon import procs
from daemon.sandbox import Sandbox, Spec, find_bwrap, unavailable_reason

PY = sys.executable
BWRAP = find_bwrap()
needs_bwrap = pytest.mark.skipif(
    BWRAP is None, reason="bubblewrap is not available here: apt install bubblewrap"
)

# Prepended to every program run inside: attempt() names the error an action ends with.
PRELUDE = """
import errno, json, os, socket, sys
from pathlib import Path

def attempt(action):
    try:
        action()
    except OSError as e:
        return errno.errorcode.get(e.errno, type(e).__name__) if e.errno else type(e).__name__
    return "ok"
"""


def plain_env(home: Path | None = None) -> dict[str, str]:
    """What the daemon would hand a child: no proxy variables, nothing secret."""
    return {
        "PATH": os.environ.get("PATH", os.defpath),
        "HOME": str(home or Path.home()),
        "LANG": "C.UTF-8",
    }


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    path = tmp_path / "checkout"
    path.mkdir()
    return path


def sandbox(spec: Spec, tmp_path: Path) -> Sandbox:
    assert BWRAP is not None
    return Sandbox(spec, bwrap=BWRAP, runtime_dir=tmp_path / "run")


def run(
    box: Sandbox,
    argv: Sequence[str],
    workdir: Path,
    *,
    env: dict[str, str] | None = None,
    **options: Any,
) -> tuple[procs.Result, str]:
    """Run ``argv`` in ``box`` as the agent runner would; its exit and its output."""
    sandboxed, sandbox_env = box.command(argv, env or plain_env())
    output = workdir.parent / f"output-{time.monotonic_ns()}.log"
    result = procs.run(
        sandboxed, cwd=workdir, timeout_s=60, output=output, env=sandbox_env, grace_s=1, **options
    )
    return result, output.read_text()


def run_python(
    box: Sandbox, code: str, workdir: Path, *args: object, **options: Any
) -> dict[str, Any]:
    """Run ``code`` (after PRELUDE) inside; the JSON object it printed last."""
    result, output = run(box, [PY, "-c", PRELUDE + code, *map(str, args)], workdir, **options)
    assert result.returncode == 0, output
    return json.loads(output.strip().splitlines()[-1])


@needs_bwrap
def test_the_probe_finds_bwrap() -> None:
    assert find_bwrap() == BWRAP
    assert unavailable_reason() == ""


NO_USERNS = "bwrap: No permissions to create new namespace, likely because the kernel does not"


@pytest.mark.parametrize(
    ("fake_bwrap", "reason"),
    [
        (None, "bwrap is not installed (Debian package: bubblewrap)"),
        (f"echo '{NO_USERNS}' >&2; exit 1", f"cannot create a sandbox here: {NO_USERNS}"),
    ],
)
def test_without_a_working_bwrap_the_probe_says_why(
    tmp_path: Path, fake_bwrap: str | None, reason: str
) -> None:
    """Where bwrap is missing, or cannot make namespaces (a container without user
    namespaces), ``find_bwrap()`` is None and the reason is one line."""
    if fake_bwrap is not None:
        script = tmp_path / "bwrap"
        script.write_text(f"#!/bin/sh\n{fake_bwrap}\n")
        script.chmod(0o755)
    code = "from daemon import sandbox as s; print(s.find_bwrap()); print(s.unavailable_reason())"
    done = subprocess.run(
        [PY, "-c", code], env={"PATH": str(tmp_path)}, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    found, said = done.stdout.splitlines()
    assert found == "None"
    assert said.endswith(reason)


@needs_bwrap
def test_the_workdir_is_writable_and_nothing_else_is(tmp_path: Path, workdir: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "secret.txt").write_text("the daemon's secret\n")
    prompt = tmp_path / "prompt.md"
    prompt.write_text("the prompt\n")
    home_probe = Path.home() / f".ticketd-sandbox-{tmp_path.name}"
    code = """
state, prompt, home_probe = map(Path, sys.argv[1:4])
print(json.dumps({
    "workdir": attempt(lambda: Path("made-inside.txt").write_text("kept")),
    "tmp": attempt(lambda: Path("/tmp/scratch.txt").write_text("gone after the run")),
    "etc": attempt(lambda: Path("/etc/ticketd-sandbox-probe").write_text("x")),
    "home": attempt(lambda: home_probe.write_text("x")),
    "hidden write": attempt(lambda: (state / "new.txt").write_text("x")),
    "hidden read": attempt(lambda: (state / "secret.txt").read_text()),
    "hidden listing": os.listdir(state),
    "read-only write": attempt(lambda: prompt.open("a").write("x")),
    "read-only text": prompt.read_text(),
}))
"""
    spec = Spec(workdir=workdir, hide=(state,), read_only=(prompt,))
    try:
        with sandbox(spec, tmp_path) as box:
            seen = run_python(box, code, workdir, state, prompt, home_probe)
        assert home_probe.exists() is False
    finally:
        home_probe.unlink(missing_ok=True)
    assert seen.pop("home") in ("EROFS", "ENOENT")  # ENOENT: a home that does not exist
    assert seen == {
        "workdir": "ok",
        "tmp": "ok",
        "etc": "EROFS",
        "hidden write": "EROFS",
        "hidden read": "ENOENT",
        "hidden listing": [],
        "read-only write": "EROFS",
        "read-only text": "the prompt\n",
    }
    assert (workdir / "made-inside.txt").read_text() == "kept"
    assert sorted(p.name for p in state.iterdir()) == ["secret.txt"]
    assert prompt.read_text() == "the prompt\n"
    assert not Path("/etc/ticketd-sandbox-probe").exists()


@needs_bwrap
def test_a_hidden_folder_keeps_the_workdir_and_read_only_paths_inside_it(
    tmp_path: Path,
) -> None:
    """ticketd's own folder is hidden, with the checkout and a git objects folder inside it;
    the Python running ticketd and the daemon package are hidden too."""
    main = tmp_path / "main"
    checkout = main / "worktrees" / "task-1"
    objects = main / "repo" / ".git" / "objects"
    for folder in (checkout, objects):
        folder.mkdir(parents=True)
    (objects / "pack").write_text("objects\n")
    (main / "repo" / "config.yaml").write_text("token: secret\n")
    package = Path(daemon.__file__).resolve().parent
    code = """
main, objects, package = map(Path, sys.argv[1:4])
print(json.dumps({
    "checkout": attempt(lambda: Path("new.py").write_text("print()")),
    "objects": (objects / "pack").read_text(),
    "objects write": attempt(lambda: (objects / "new").write_text("x")),
    "config": attempt(lambda: (main / "repo" / "config.yaml").read_text()),
    "main": sorted(os.listdir(main)),
    "main write": attempt(lambda: (main / "new").write_text("x")),
    "package": os.listdir(package),
}))
"""
    spec = Spec(workdir=checkout, hide=(main, package, Path(sys.prefix)), read_only=(objects,))
    with sandbox(spec, tmp_path) as box:
        seen = run_python(box, code, checkout, main, objects, package)
    assert seen == {
        "checkout": "ok",
        "objects": "objects\n",
        "objects write": "EROFS",
        "config": "ENOENT",
        "main": ["repo", "worktrees"],
        "main write": "EROFS",
        "package": [],
    }
    assert (checkout / "new.py").exists()
    assert not (objects / "new").exists()


@needs_bwrap
def test_credentials_in_home_are_hidden_and_the_rest_of_it_is_read_only(
    tmp_path: Path, workdir: Path
) -> None:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("PRIVATE KEY\n")
    (home / ".config" / "gh").mkdir(parents=True)
    (home / ".config" / "gh" / "hosts.yml").write_text("oauth_token: secret\n")
    (home / ".netrc").write_text("machine example.invalid password secret\n")
    tool = home / ".local" / "bin" / "tool"
    tool.parent.mkdir(parents=True)
    tool.write_text("#!/bin/sh\necho tool ran\n")
    tool.chmod(0o755)
    code = """
import subprocess
home = Path.home()
print(json.dumps({
    "ssh": os.listdir(home / ".ssh"),
    "gh": os.listdir(home / ".config" / "gh"),
    "netrc": (home / ".netrc").read_text(),
    "netrc write": attempt(lambda: (home / ".netrc").write_text("x")),
    "ssh write": attempt(lambda: (home / ".ssh" / "new").write_text("x")),
    "home write": attempt(lambda: (home / "new").write_text("x")),
    "tool": subprocess.run([str(home / ".local/bin/tool")], capture_output=True, text=True).stdout,
}))
"""
    spec = Spec(workdir=workdir, read_only=(home,))  # home is under /tmp: shown through it
    with sandbox(spec, tmp_path) as box:
        seen = run_python(box, code, workdir, env=plain_env(home))
    assert seen == {
        "ssh": [],
        "gh": [],
        "netrc": "",
        "netrc write": "EROFS",
        "ssh write": "EROFS",
        "home write": "EROFS",
        "tool": "tool ran\n",
    }


@pytest.fixture
def daemon_stand_in(tmp_path: Path) -> Iterator[tuple[psutil.Process, str]]:
    """A process whose environment holds a marker, as the daemon's holds its tokens."""
    marker = f"marker-{tmp_path.name}-{os.getpid()}"
    proc = subprocess.Popen(
        [PY, "-c", "import sys; sys.stdin.read()"],
        stdin=subprocess.PIPE,
        env={**os.environ, "TICKETD_TEST_SECRET": marker},
    )
    try:
        yield psutil.Process(proc.pid), marker
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=30)


@needs_bwrap
def test_no_environment_of_the_daemon_is_readable_inside(
    tmp_path: Path, workdir: Path, daemon_stand_in: tuple[psutil.Process, str]
) -> None:
    stand_in, marker = daemon_stand_in
    environ = Path(f"/proc/{stand_in.pid}/environ")
    # Readable from outside (once the stand-in has started): the check below means something.
    wait_until(lambda: marker.encode() in environ.read_bytes(), what="the stand-in's environ")
    code = """
marker = sys.argv[1].encode()
found, readable = [], 0
for entry in Path("/proc").iterdir():
    if entry.name.isdigit():
        try:
            data = (entry / "environ").read_bytes()
        except OSError:
            continue
        readable += 1
        if marker in data:
            found.append(entry.name)
print(json.dumps({"found": found, "readable": readable > 0, "ppid": os.getppid()}))
"""
    with sandbox(Spec(workdir=workdir), tmp_path) as box:
        seen = run_python(box, code, workdir, marker)
    assert seen == {"found": [], "readable": True, "ppid": 1}


GRANDCHILD = """
import time
child = os.fork()
if child == 0:
    os.setsid()
    if os.fork() == 0:
        Path("grandchild.pid").write_text(str(os.getpid()))
        os.execvp("sleep", ["sleep", "600"])
    os._exit(0)
os.waitpid(child, 0)
deadline = time.monotonic() + 30
while not Path("go").exists() and time.monotonic() < deadline:
    time.sleep(0.02)
print(json.dumps({"ended": "by itself"}))
"""


def ns_pid(pid: int) -> int | None:
    """The number a host process has in its innermost PID namespace."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    return int(next(line for line in status.splitlines() if line.startswith("NSpid:")).split()[-1])


@needs_bwrap
@pytest.mark.parametrize("ending", ["the command exits", "the daemon ends the run"])
def test_a_setsid_grandchild_does_not_outlive_the_run(
    tmp_path: Path, workdir: Path, ending: str
) -> None:
    cancel = threading.Event()
    grandchildren: list[psutil.Process] = []

    def find_grandchild(bwrap_pid: int) -> None:
        pid_file = workdir / "grandchild.pid"
        inner = int(wait_until(lambda: pid_file.exists() and pid_file.read_text().strip()))
        tree = psutil.Process(bwrap_pid).children(recursive=True)
        grandchildren.append(next(p for p in tree if ns_pid(p.pid) == inner))
        if ending == "the command exits":
            (workdir / "go").touch()
        else:
            cancel.set()  # procs.run then signals bwrap's group and all its descendants

    with sandbox(Spec(workdir=workdir), tmp_path) as box:
        result, output = run(
            box, [PY, "-c", PRELUDE + GRANDCHILD], workdir, on_start=find_grandchild, cancel=cancel
        )
    (grandchild,) = grandchildren
    if ending == "the command exits":
        assert result.returncode == 0, output
    else:
        assert result.cancelled
    wait_until(lambda: not grandchild.is_running(), timeout=10, what="the grandchild to end")


@needs_bwrap
@pytest.mark.parametrize(
    ("argv", "status"),
    [
        (["sh", "-c", "exit 0"], 0),
        ([PY, "-c", "raise SystemExit(7)"], 7),
        ([PY, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"], 128 + 9),
        (["sh", "-c", "kill -TERM $$"], 128 + signal.SIGTERM),
    ],
)
def test_the_exit_status_passes_through(
    tmp_path: Path, workdir: Path, argv: list[str], status: int
) -> None:
    with sandbox(Spec(workdir=workdir), tmp_path) as box:
        result, output = run(box, argv, workdir)
    assert result.returncode == status, output


@needs_bwrap
def test_a_missing_program_is_refused_before_the_start(tmp_path: Path, workdir: Path) -> None:
    with sandbox(Spec(workdir=workdir), tmp_path) as box, pytest.raises(FileNotFoundError):
        box.command(["no-such-program-here"], plain_env())


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port listening on the host's loopback that the sandbox must not reach."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


@needs_bwrap
def test_a_forwarded_target_is_reachable_and_nothing_else(
    tmp_path: Path, workdir: Path, fake_ollama: FakeOllama, closed_port: int
) -> None:
    code = """
import urllib.request
host, port, fake_port, other = sys.argv[1], *map(int, sys.argv[2:5])
def reach(host, port):
    return attempt(lambda: socket.create_connection((host, port), timeout=10).close())
url = f"http://{host}:{port}/api/version"
print(json.dumps({
    "forwarded": json.load(urllib.request.urlopen(url, timeout=10)),
    "the target's own address": reach("127.0.0.1", fake_port),
    "another host port": reach("127.0.0.1", other),
    "outside": reach("192.0.2.1", 80),
}))
"""
    spec = Spec(workdir=workdir, forward=(("127.0.0.1", fake_ollama.port),))
    with sandbox(spec, tmp_path) as box:
        host, port = box.address("127.0.0.1", fake_ollama.port)
        assert (host, port) == ("127.0.0.2", fake_ollama.port)
        seen = run_python(box, code, workdir, host, port, fake_ollama.port, closed_port)
    assert seen == {
        "forwarded": {"version": fake_ollama.version},
        "the target's own address": "ECONNREFUSED",
        "another host port": "ECONNREFUSED",
        "outside": "ENETUNREACH",
    }


def test_low_ports_are_reached_above_1024(tmp_path: Path, workdir: Path) -> None:
    spec = Spec(workdir=workdir, forward=(("127.0.0.1", 8080), ("ollama.invalid", 80)))
    box = Sandbox(spec, bwrap="bwrap", runtime_dir=tmp_path / "run")
    assert box.address("127.0.0.1", 8080) == ("127.0.0.2", 8080)
    assert box.address("ollama.invalid", 80) == ("127.0.0.3", 10080)
    with pytest.raises(KeyError):
        box.address("127.0.0.1", 9)


@needs_bwrap
def test_the_proxy_lets_allowed_hosts_through_and_refuses_others(
    tmp_path: Path, workdir: Path, fake_ollama: FakeOllama, closed_port: int
) -> None:
    code = """
from urllib.parse import urlsplit
port, other = map(int, sys.argv[1:3])
proxy = urlsplit(os.environ["HTTPS_PROXY"])

def ask(request, then=b""):
    with socket.create_connection((proxy.hostname, proxy.port), timeout=10) as s:
        s.sendall(request)
        answer = b""
        while b"\\r\\n\\r\\n" not in answer and (chunk := s.recv(65536)):
            answer += chunk
        status = answer.split(b" ")[1].decode()
        if then:
            s.sendall(then)
        while chunk := s.recv(65536):
            answer += chunk
    return status, json.loads(answer.rsplit(b"\\r\\n\\r\\n")[-1]) if status == "200" else None

version = b"GET /api/version HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n"
def absolute(port):
    return f"GET http://127.0.0.1:{port}/api/version HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n".encode()
def connect(port):
    return f"CONNECT 127.0.0.1:{port} HTTP/1.1\\r\\nHost: 127.0.0.1:{port}\\r\\n\\r\\n".encode()
print(json.dumps({
    "connect": ask(connect(port), then=version),
    "absolute": ask(absolute(port)),
    "connect elsewhere": ask(connect(other)),
    "absolute elsewhere": ask(absolute(other)),
    "no_proxy": os.environ["NO_PROXY"].split(","),
}))
"""
    spec = Spec(workdir=workdir, proxy_hosts=(f"127.0.0.1:{fake_ollama.port}",))
    with sandbox(spec, tmp_path) as box:
        seen = run_python(box, code, workdir, fake_ollama.port, closed_port)
        refused = box.refused
    version = {"version": fake_ollama.version}
    assert seen.pop("no_proxy")[:3] == ["localhost", "127.0.0.1", "::1"]
    assert seen == {
        "connect": ["200", version],
        "absolute": ["200", version],
        "connect elsewhere": ["403", None],
        "absolute elsewhere": ["403", None],
    }
    assert refused == (f"127.0.0.1:{closed_port}",)


@needs_bwrap
def test_the_relay_stops_with_the_sandbox_mid_connection(
    tmp_path: Path, workdir: Path, fake_ollama: FakeOllama
) -> None:
    """The run is cancelled while its request hangs on the target: leaving the ``with``
    ends the relay's threads at once (the no_leaks fixture checks none is left)."""
    fake_ollama.hang(60)
    code = """
host, port = sys.argv[1], int(sys.argv[2])
with socket.create_connection((host, port)) as s:
    s.sendall(b"GET /api/tags HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
    s.recv(1)
"""
    cancel = threading.Event()

    def cancel_once_the_request_waits(pid: int) -> None:
        fake_ollama.wait_for_requests(1)
        cancel.set()

    spec = Spec(workdir=workdir, forward=(("127.0.0.1", fake_ollama.port),))
    box = sandbox(spec, tmp_path)
    with box:
        host, port = box.address("127.0.0.1", fake_ollama.port)
        result, _ = run(
            box,
            [PY, "-c", PRELUDE + code, host, str(port)],
            workdir,
            cancel=cancel,
            on_start=cancel_once_the_request_waits,
        )
        assert result.cancelled
        leaving = time.monotonic()
    assert time.monotonic() - leaving < 10
    assert not any(t.name.startswith("sandbox-") for t in threading.enumerate())
    assert list((tmp_path / "run").iterdir()) == []
