"""The systemd unit for this installation: load the template, render, install, verify.

The templates ship inside the package (``daemon/units/``, read with importlib.resources, so a
non-editable install has them too); ``systemd/`` in the source tree links to the same files.
A template holds ``@EXEC@``, ``@CONFIG@``, ``@WORKDIR@``, ``@RW_PATHS@``, ``@USER@`` and a
line ``@ENVIRONMENT@``. ``render`` fills them in with systemd's quoting (``%`` specifiers,
``$`` variables, spaces), so any path survives; it raises ``ValueError`` for a value no unit
file can hold (a relative path, a control character, a bad user or variable name).

``unit_for`` is what ``ticketd install-service`` writes for a configuration; ``ticketd
doctor`` finds the units installed (``installed``) and compares each with it, reading back
the unit's ``User=`` and ``Environment=`` with ``unit_settings`` and ``unit_environment``.
"""

from __future__ import annotations

import difflib
import os
import pwd
import re
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

from daemon.files import atomic_write

if TYPE_CHECKING:
    from daemon.config import Config

UNIT_NAME = "ticketd.service"
SYSTEM_UNIT_DIR = Path("/etc/systemd/system")
USER_UNIT_DIR = Path(".config/systemd/user")  # under the home directory
TEMPLATES = {False: "ticketd.service", True: "ticketd-user.service"}  # by user_unit
VERIFY_TIMEOUT_S = 60.0

PLACEHOLDERS = frozenset(
    {"@EXEC@", "@CONFIG@", "@WORKDIR@", "@RW_PATHS@", "@USER@", "@ENVIRONMENT@"}
)
_PLACEHOLDER = re.compile(r"@[A-Z][A-Z_]*@")
_NEEDS_QUOTES = re.compile(r"""[\s"'\\]""")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_USER = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}|[0-9]+")
_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NO_ENVIRONMENT: Mapping[str, str] = MappingProxyType({})


def load_template(user_unit: bool) -> str:
    """The packaged template for a system unit, or for a user unit."""
    units = resources.files("daemon") / "units"
    return (units / TEMPLATES[user_unit]).read_text(encoding="utf-8")


def render(
    template: str,
    *,
    executable: Path,
    config: Path,
    workdir: Path,
    rw_paths: Sequence[Path],
    user: str | None,
    environment: Mapping[str, str] = _NO_ENVIRONMENT,
) -> str:
    """The unit file: ``template`` with its placeholders filled in. A line holding ``@USER@``
    is left out when ``user`` is None; ``@ENVIRONMENT@`` becomes one ``Environment=`` line per
    variable. ``rw_paths`` are deduplicated and a path inside another is dropped."""
    unknown = set(_PLACEHOLDER.findall(template)) - PLACEHOLDERS
    if unknown:
        raise ValueError(f"unknown placeholders in the template: {', '.join(sorted(unknown))}")
    if user is not None and "@USER@" not in template:
        raise ValueError("this template has no User= to set (a user unit runs as its owner)")
    writable = _outermost(rw_paths)
    if not writable and "@RW_PATHS@" in template:
        raise ValueError("rw_paths is empty: the daemon could write nowhere")
    values = {
        "@EXEC@": _word(_absolute(executable, "executable")),  # never variable-expanded
        "@CONFIG@": _word(_absolute(config, "config"), dollar=True),
        "@WORKDIR@": _absolute(workdir, "workdir").replace("%", "%%"),
        "@RW_PATHS@": " ".join(_word(p) for p in writable),
        "@USER@": _user(user) if user is not None else "",
    }
    lines: list[str] = []
    for line in template.splitlines(keepends=True):
        if line.strip() == "@ENVIRONMENT@":
            lines.extend(_environment_line(k, v) for k, v in environment.items())
            continue
        if "@USER@" in line and user is None:
            continue
        lines.append(_PLACEHOLDER.sub(lambda m: values[m.group()], line))
    return "".join(lines)


def writable_paths(cfg: Config) -> list[Path]:
    """The only paths the unit lets the daemon write: the repository, the backlog, the state
    and the logs."""
    return [cfg.repo.path, cfg.backlog.dir, cfg.state_dir, cfg.logging.dir]


def unit_for(cfg: Config, *, user_unit: bool, executable: Path, user: str | None, path: str) -> str:
    """The unit ``ticketd install-service`` writes: this ``executable`` running this config
    (its folder the working directory), as ``user`` (a system unit; ignored for a user unit),
    with ``PATH`` set to ``path`` so that the daemon finds the programs the installing shell
    finds. ``ValueError`` as ``render``."""
    return render(
        load_template(user_unit),
        executable=executable,
        config=cfg.path,
        workdir=cfg.path.parent,
        rw_paths=writable_paths(cfg),
        user=None if user_unit else user,
        environment={"PATH": path},
    )


def find_executable(argv0: str, python: str) -> Path | None:
    """The ``ticketd`` program to put in ExecStart=: the one running (``argv0``), else the
    one on PATH, else the one beside ``python`` (the same virtualenv); None when none is."""
    if Path(argv0).name == "ticketd":
        return Path(argv0).resolve()
    if found := shutil.which("ticketd"):
        return Path(found).resolve()
    beside = Path(python).parent / "ticketd"
    return beside if beside.is_file() else None


def default_user(config: Path) -> str:
    """Whom a system unit runs as unless told: the config file's owner."""
    return pwd.getpwuid(config.stat().st_uid).pw_name


def unit_path(user_unit: bool, home: Path) -> Path:
    """Where systemd looks for our unit: /etc/systemd/system/ticketd.service, or
    ~/.config/systemd/user/ticketd.service for the user manager."""
    return (home / USER_UNIT_DIR if user_unit else SYSTEM_UNIT_DIR) / UNIT_NAME


@dataclass(frozen=True)
class Installed:
    """A unit of ticketd's found installed; ``text`` None when it cannot be read."""

    user_unit: bool
    path: Path
    text: str | None


def installed(home: Path) -> list[Installed]:
    """The units installed: the system one, then the user one (under ``home``)."""
    units = []
    for user_unit in (False, True):
        path = unit_path(user_unit, home)
        if not os.path.lexists(path):
            continue
        try:
            text: str | None = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            text = None
        units.append(Installed(user_unit, path, text))
    return units


def changed_lines(old: str, new: str) -> list[str]:
    """The lines of ``old`` that ``new`` drops and the lines it adds."""
    diff = difflib.unified_diff(old.splitlines(), new.splitlines(), n=0, lineterm="")
    return [d[1:].strip() for d in diff if d[:1] in "+-" and not d.startswith(("+++", "---"))]


def install(text: str, path: Path) -> Path:
    """Write the unit atomically (mode 0644), creating its folder. ``OSError`` (for example
    ``PermissionError`` for a system unit without root) is the caller's to report. systemd
    sees the change after ``systemctl [--user] daemon-reload``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text)
    return path


def unit_settings(text: str, key: str) -> list[str]:
    """The values of the ``key=`` lines of a unit file, in order (comments skipped)."""
    found = []
    for line in text.splitlines():
        name, eq, value = line.partition("=")
        if eq and name.strip() == key and not line.lstrip().startswith(("#", ";")):
            found.append(value.strip())
    return found


def unit_environment(text: str) -> dict[str, str]:
    """The variables a unit's ``Environment=`` lines set (a later line wins), ``%%`` read
    back as ``%``; a line systemd could not split either is skipped."""
    env: dict[str, str] = {}
    for value in unit_settings(text, "Environment"):
        try:
            words = shlex.split(value)
        except ValueError:
            continue
        for word in words:
            name, eq, setting = word.partition("=")
            if eq and _VARIABLE.fullmatch(name):
                env[name] = setting.replace("%%", "%")
    return env


def verify(text: str, *, timeout: float = VERIFY_TIMEOUT_S) -> tuple[bool, str]:
    """Run ``systemd-analyze verify`` on a temporary copy of the unit. Returns (ok, output);
    ok means it exited 0 and said nothing about our unit (it exits 0 on mere warnings such as
    an unknown key). ExecStart='s program must exist. Without systemd-analyze: (False, why)."""
    with tempfile.TemporaryDirectory(prefix="ticketd-verify-") as tmp:
        unit = Path(tmp) / UNIT_NAME
        unit.write_text(text, encoding="utf-8")
        try:
            proc = subprocess.run(
                ["systemd-analyze", "verify", "--man=no", str(unit)],
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
                check=False,
            )
        except FileNotFoundError:
            return False, "systemd-analyze not found: cannot verify the unit"
        except subprocess.TimeoutExpired:
            return False, f"systemd-analyze verify did not finish within {timeout:g}s"
        except OSError as e:
            return False, f"cannot run systemd-analyze: {e}"
    output = "\n".join(s for s in (proc.stdout.strip(), proc.stderr.strip()) if s)
    output = output.replace(str(unit), UNIT_NAME)
    return proc.returncode == 0 and UNIT_NAME not in output, output


def _absolute(path: Path, what: str) -> str:
    if not path.is_absolute():
        raise ValueError(f"{what} must be an absolute path, not {str(path)!r}")
    text = str(path)
    if _CONTROL.search(text):
        raise ValueError(f"{what} holds a control character: {text!r}")
    return text


def _outermost(paths: Sequence[Path]) -> list[str]:
    """Each path once, in order, leaving out those inside another path of the list."""
    absolute = [Path(_absolute(p, "rw_paths entry")) for p in paths]
    kept: list[Path] = []
    for p in absolute:
        inside = any(p != q and p.is_relative_to(q) for q in absolute)
        if p not in kept and not inside:
            kept.append(p)
    return [str(p) for p in kept]


def _word(text: str, *, dollar: bool = False) -> str:
    """One word of a setting systemd splits into words (ExecStart=, ReadWritePaths=,
    Environment=): ``%`` escaped (specifiers), ``$`` too where variables expand (the
    arguments of ExecStart=), and double-quoted when it holds a space, a quote or a
    backslash."""
    text = text.replace("%", "%%")
    if dollar:
        text = text.replace("$", "$$")
    if not _NEEDS_QUOTES.search(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _user(name: str) -> str:
    if not _USER.fullmatch(name):
        raise ValueError(f"not a valid user name for User=: {name!r}")
    return name


def _environment_line(name: str, value: str) -> str:
    if not _VARIABLE.fullmatch(name):
        raise ValueError(f"not a valid environment variable name: {name!r}")
    if _CONTROL.search(value):
        raise ValueError(f"the value of {name} holds a control character")
    return f"Environment={_word(f'{name}={value}')}\n"
