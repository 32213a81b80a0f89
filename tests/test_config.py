"""config.yaml: defaults, validation messages that name file, key and line, overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ticketd

from daemon import config as configuration
from daemon.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_the_shipped_config_is_valid_and_equals_the_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OLLAMA_HOST", raising=False)
    shipped = configuration.load(ROOT / "config.yaml")
    defaults = configuration.parse("", ROOT / "config.yaml")
    assert shipped == defaults
    assert shipped.repo.path == ROOT
    assert shipped.backlog.dir == ROOT / "backlog"
    assert shipped.agent.command[0] == "aider"


def test_every_documented_key_is_in_the_shipped_config() -> None:
    text = (ROOT / "config.yaml").read_text()
    cfg = configuration.parse("", ROOT / "config.yaml").model_dump(by_alias=True)
    for section, value in cfg.items():
        if section == "path":
            continue
        assert f"\n{section}:" in f"\n{text}", section
        for key in value if isinstance(value, dict) else ():
            assert f" {key}:" in text, f"{section}.{key} is not documented in config.yaml"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "agent:\n  timeout_s: -5\n",
            "cfg.yaml:2: agent.timeout_s: Input should be greater than 0",
        ),
        ("repo:\n  path: .\n  remote_name: x\n", "cfg.yaml:3: repo.remote_name: unknown key"),
        ("agent:\n  kind: magic\n", "cfg.yaml:2: agent.kind: Input should be 'command'"),
        (
            "agent:\n  command: []\n",
            "cfg.yaml:2: agent.command: Value error, must be a non-empty list",
        ),
        ("agent:\n  command: [x, '{promt_file}']\n", "agent.command: Value error, bad placeholder"),
        (
            "concurrency:\n  max_tickets: many\n",
            "cfg.yaml:2: concurrency.max_tickets: Input should be",
        ),
        ("repo: [1, 2]\n", "cfg.yaml:1: repo: Input should be a valid dictionary"),
        ("agent:\n  timeout_s: 5\n   bad: indent\n", "cfg.yaml:3: not valid YAML"),
        ("- just\n- a list\n", "the top level must be a mapping"),
    ],
)
def test_bad_values_name_file_key_and_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "cfg.yaml"
    with pytest.raises(ConfigError) as caught:
        configuration.parse(text, path)
    assert message in caught.value.message.replace(str(tmp_path) + "/", "")


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    cfg = configuration.parse("state_dir: st\nbacklog: {dir: ../b}\nlogging: {dir: /var/x}\n",
                              tmp_path / "sub" / "c.yaml")  # fmt: skip
    assert cfg.state_dir == tmp_path / "sub" / "st"
    assert cfg.backlog.dir == tmp_path / "b"
    assert cfg.logging.dir == Path("/var/x")


def test_environment_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "elsewhere.yaml"
    path.write_text("ollama: {host: 'http://a:1'}\ngithub: {token_env: MY_TOKEN}\n")
    monkeypatch.setenv("TICKETD_CONFIG", str(path))
    monkeypatch.setenv("OLLAMA_HOST", "http://b:2")
    monkeypatch.setenv("MY_TOKEN", "ghp_secretvalue123")
    cfg = configuration.load(None)
    assert cfg.path == path
    assert cfg.ollama.host == "http://b:2"
    assert cfg.secret_values() == ["ghp_secretvalue123"]
    assert "MY_TOKEN" not in cfg.agent_env()


def test_snapshot_masks_secrets(tmp_path: Path) -> None:
    cfg = configuration.parse(
        "agent:\n  env: {OPENAI_API_KEY: sk-123, PLAIN: plain}\n", tmp_path / "c"
    )
    snap = cfg.snapshot()
    assert snap["agent"]["env"] == {"OPENAI_API_KEY": "***", "PLAIN": "plain"}
    assert snap["github"]["token_env"] == "GITHUB_TOKEN"


def test_cli_exits_2_naming_the_problem(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("agent:\n  timout_s: 5\n")
    result = ticketd("run", "--once", "--config", str(path))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"ticketd: bad configuration: {path}:2: agent.timout_s: unknown key"
    )
    missing = ticketd("status", "--config", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2
    assert "no such config file" in missing.stderr


def test_run_refuses_a_repo_that_is_not_git(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("repo: {path: .}\n")
    result = ticketd("run", "--once", "--config", str(tmp_path / "config.yaml"))
    assert result.returncode == 2
    assert f"repo: {tmp_path} is not a git repository" in result.stderr
