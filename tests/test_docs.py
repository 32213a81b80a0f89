"""The README tells the truth: its commands are the ones CI runs, every key is documented."""

from __future__ import annotations

import re
from pathlib import Path

from daemon import config as configuration

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _shell_blocks() -> list[str]:
    return re.findall(r"```sh\n(.*?)```", README, re.S)


def test_ci_runs_the_readme_test_command() -> None:
    test_command = next(b.strip() for b in _shell_blocks() if "pytest" in b)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci


def test_the_quick_start_starts_the_daemon_on_the_default_config() -> None:
    start = _shell_blocks()[0].strip()
    assert start.endswith("ticketd run")
    assert "pip install -e ." in start


def test_every_config_key_has_a_row_in_the_readme() -> None:
    def keys(value: object, prefix: str = "") -> list[str]:
        if isinstance(value, dict):
            return [k for name, v in value.items() for k in keys(v, f"{prefix}{name}.")]
        return [prefix.rstrip(".")]

    data = configuration.parse("", ROOT / "config.yaml").model_dump(by_alias=True)
    data.pop("path")
    for key in keys(data):
        if key.startswith("backlog.statuses."):
            assert "`backlog.statuses.todo` ... `.failed`" in README
            continue
        leaf = key.rsplit(".", 1)[-1]
        assert (
            f"`{key}`" in README
            or f"`.{leaf}`" in README
            or f"`{key.split('.')[0]}.{leaf}`" in README
        ), key


def test_every_error_code_in_the_table_is_in_errors() -> None:
    from daemon.errors import CODES

    documented = re.findall(r"^\| `([A-Z_]+)` \|", README, re.M)
    assert documented
    assert set(documented) <= set(CODES)
