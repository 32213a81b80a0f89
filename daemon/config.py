"""Load and validate ``config.yaml`` into frozen objects.

The file is found by ``--config``, then ``$TICKETD_CONFIG``, then ``./config.yaml``. Relative
paths resolve against the config file's folder. ``OLLAMA_HOST`` overrides ``ollama.host``
(not ``ollama.hosts``, a pool).
Unknown keys and bad values raise ``ConfigError`` naming the file, the key, its line and the
problem. This is the only module that reads the environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from daemon.errors import ConfigError

PLACEHOLDERS = ("prompt_file", "worktree", "ticket_file", "ticket_id", "model")
SECRET_WORDS = ("token", "password", "secret", "api_key", "apikey")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Changes to these need a person before they go out (SENSITIVE_PATH): CI that runs with the
# repository's secrets, code that runs on developers' machines, what git itself obeys, and
# who must review. A pattern without "/" matches a file name at any depth.
SENSITIVE_PATHS = (
    ".github/workflows/*",
    ".github/actions/*",
    ".github/dependabot.yml",
    ".gitlab-ci.yml",
    ".gitlab/*",
    ".circleci/*",
    ".travis.yml",
    ".drone.yml",
    ".buildkite/*",
    "azure-pipelines.yml",
    "bitbucket-pipelines.yml",
    "Jenkinsfile",
    ".gitmodules",
    ".gitattributes",
    ".githooks/*",
    ".husky/*",
    ".pre-commit-config.yaml",
    "lefthook.yml",
    ".lefthook.yml",
    "CODEOWNERS",
)


class RepoConfig(_Section):
    path: Path = Path()
    base_branch: str = "main"
    remote: str = "origin"  # a remote of repo.path, or a URL
    branch_prefix: str = "ticketd/"
    push_retries: int = Field(default=3, ge=0, le=20)
    git_timeout_s: float = Field(default=120, gt=0)
    sign_commits: bool = False
    sensitive_paths: tuple[str, ...] = SENSITIVE_PATHS


class Statuses(_Section):
    todo: str = "To Do"
    in_progress: str = Field(default="In Progress", alias="in-progress")
    review: str = "Review"
    done: str = "Done"
    failed: str = "Failed"

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class BacklogConfig(_Section):
    dir: Path = Path("backlog")
    # folders: a folder per state (todo/ ... failed/); backlog.md: a Backlog.md project's
    # tasks/ with the state in each task's status; auto: backlog.md when dir holds config.yml
    # and tasks/
    layout: Literal["auto", "folders", "backlog.md"] = "auto"
    id_prefix: str = "task"
    statuses: Statuses = Statuses()
    assignee: str = Field(default="@ticketd", min_length=1)  # backlog.md: the hand-off
    label: str | None = None  # backlog.md: a label that hands a task over too


class LoggingConfig(_Section):
    dir: Path = Path("logs")
    level: Literal["TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR"] = "INFO"
    json_format: bool = Field(default=False, alias="json")
    rotation: str = "10 MB"
    retention: str = "14 days"
    compression: Literal["gz", "bz2", "xz", "zip", "none"] = "gz"

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class AgentConfig(_Section):
    kind: Literal["command", "builtin"] = "command"
    command: tuple[str, ...] = (
        "aider",
        "--yes-always",
        "--no-auto-commits",
        "--no-gitignore",
        "--no-check-update",
        "--no-show-model-warnings",
        "--model",
        "ollama_chat/{model}",
        "--message-file",
        "{prompt_file}",
    )
    timeout_s: float = Field(default=1800, gt=0)
    kill_grace_s: float = Field(default=10, ge=0)
    env: dict[str, str] = {}
    exclude: tuple[str, ...] = (".aider*",)
    max_reflections: int = Field(default=3, ge=0, le=20)
    max_memory_mb: float = Field(default=0, ge=0)  # the agent's process tree; 0: no limit
    max_context_files: int = Field(default=12, ge=0, le=200)
    whole_files: int = Field(default=3, ge=1, le=50)  # builtin: shown whole; others outlined
    candidates: int = Field(default=3, ge=1, le=10)  # builtin: fresh attempts per model
    edit_format: Literal["auto", "search-replace", "whole", "udiff"] = "auto"  # builtin
    sandbox: Literal["auto", "required", "off"] = "auto"
    allow_hosts: tuple[str, ...] = ()  # host:port the agent and checks may reach (a proxy)
    pass_env: tuple[str, ...] = ()  # names of the daemon's environment variables to pass on
    uses_ollama: bool | Literal["auto"] = "auto"  # auto: {model} in its command or env

    @field_validator("allow_hosts")
    @classmethod
    def _hosts(cls, hosts: tuple[str, ...]) -> tuple[str, ...]:
        for item in hosts:
            host, _, port = item.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{item!r} is not host:port (for example pypi.org:443)")
        return hosts

    @field_validator("command")
    @classmethod
    def _command(cls, argv: tuple[str, ...]) -> tuple[str, ...]:
        if not argv or not argv[0].strip():
            raise ValueError("must be a non-empty list: the program, then its arguments")
        for arg in argv:
            try:
                arg.format(**{name: "" for name in PLACEHOLDERS})
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(
                    f"bad placeholder in {arg!r} ({e}); "
                    f"known: {', '.join('{' + p + '}' for p in PLACEHOLDERS)}"
                ) from None
        return argv


class HealthCheckConfig(_Section):
    interval_s: float = Field(default=30, gt=0)
    timeout_s: float = Field(default=5, gt=0)


class BreakerConfig(_Section):
    failure_threshold: int = Field(default=3, ge=1)
    success_threshold: int = Field(default=1, ge=1)
    half_open_requests: int = Field(default=1, ge=1)
    reset_timeout_s: float = Field(default=30, gt=0)


class OllamaHost(_Section):
    """One Ollama server of the pool (``ollama.hosts``)."""

    url: str
    weight: float = Field(default=1, gt=0)  # its share of tickets, against the others'
    max_tickets: int | None = Field(default=None, ge=1)  # tickets pinned to it at once

    @field_validator("url")
    @classmethod
    def _url(cls, url: str) -> str:
        url = url.strip().rstrip("/")
        full = url if "://" in url else f"http://{url}"
        try:
            parts = urlsplit(full)
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError as e:
            raise ValueError(f"{url!r} is not a URL: {e}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r} is not an http(s)://host:port URL")
        if parts.username is not None:  # the ollama client would drop it without a word
            raise ValueError(f"{url!r}: a user or password in the URL is not sent to Ollama")
        return full


class OllamaConfig(_Section):
    host: str = "http://127.0.0.1:11434"
    hosts: tuple[OllamaHost, ...] = ()  # a pool of servers; empty: the one ollama.host
    models: tuple[str, ...] = ("qwen2.5-coder:7b",)
    models_by_label: dict[str, tuple[str, ...]] = {}
    review_model: str | None = None
    num_ctx: int = Field(default=16384, ge=512)
    num_predict: int = Field(default=4096, ge=64)
    keep_alive: str = "10m"
    temperature: float | None = Field(default=0.0, ge=0, le=2)  # null: the server's (0.8)
    seed: int | None = 42  # null: the server's (random)
    timeout_s: float = Field(default=300, gt=0)
    retries: int = Field(default=3, ge=0, le=10)
    health_check: HealthCheckConfig = HealthCheckConfig()
    circuit_breaker: BreakerConfig = BreakerConfig()

    @field_validator("models")
    @classmethod
    def _models(cls, models: tuple[str, ...]) -> tuple[str, ...]:
        if not models:
            raise ValueError("list at least one model")
        return models

    @field_validator("hosts", mode="before")
    @classmethod
    def _short_hosts(cls, hosts: Any) -> Any:
        """A host may be given as its URL alone."""
        if isinstance(hosts, list | tuple):
            return [{"url": h} if isinstance(h, str) else h for h in hosts]
        return hosts

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, hosts: tuple[OllamaHost, ...]) -> tuple[OllamaHost, ...]:
        urls = [h.url for h in hosts]
        twice = sorted({u for u in urls if urls.count(u) > 1})
        if twice:
            raise ValueError(f"{', '.join(twice)} listed more than once")
        return hosts

    @model_validator(mode="after")
    def _one_form(self) -> OllamaConfig:
        if self.hosts and "host" in self.model_fields_set:
            raise ValueError("set ollama.host (one server) or ollama.hosts (a pool), not both")
        return self

    @property
    def pool(self) -> tuple[OllamaHost, ...]:
        """The servers tickets are routed to: ``hosts``, else the one ``host``."""
        return self.hosts or (OllamaHost(url=self.host),)


class CheckCommand(_Section):
    name: str
    run: tuple[str, ...]
    timeout_s: float = Field(default=600, gt=0)

    @field_validator("run")
    @classmethod
    def _run(cls, argv: tuple[str, ...]) -> tuple[str, ...]:
        if not argv:
            raise ValueError("must be a non-empty argument list")
        return argv


class AnalysisCommand(_Section):
    glob: str
    run: tuple[str, ...]  # "{files}" expands to the changed files matching glob
    timeout_s: float = Field(default=120, gt=0)


class StaticAnalysisConfig(_Section):
    python: bool = True  # syntax check, and ruff --fix when ruff is on PATH
    commands: tuple[AnalysisCommand, ...] = ()


class ConcurrencyConfig(_Section):
    max_tickets: int = Field(default=1, ge=1, le=64)
    min_free_memory_mb: float = Field(default=0, ge=0)  # 0: no guard
    max_load: float = Field(default=0, ge=0)  # 1-minute load average; 0: no guard


class IntakeConfig(_Section):
    reconcile_interval_s: float = Field(default=30, gt=0)
    settle_s: float = Field(default=1.0, ge=0)
    duplicate_threshold: float = Field(default=0.8, gt=0, le=1)
    duplicate_window_days: float = Field(default=30, ge=0)


class BackoffConfig(_Section):
    base_s: float = Field(default=300, gt=0)
    factor: float = Field(default=2.0, ge=1)
    max_s: float = Field(default=21600, gt=0)


class RetryConfig(_Section):
    enabled: bool = True
    check_interval_s: float = Field(default=300, gt=0)
    max_retries: int = Field(default=3, ge=0)
    max_age_days: float = Field(default=7, gt=0)
    backoff: BackoffConfig = BackoffConfig()


class InsightsConfig(_Section):
    interval_s: float = Field(default=3600, gt=0)
    window_days: int = Field(default=14, ge=1)
    min_runs: int = Field(default=5, ge=1)


class ShutdownConfig(_Section):
    grace_s: float = Field(default=60, ge=0)


class SecretsConfig(_Section):
    enabled: bool = True
    on_finding: Literal["review", "fail"] = "review"
    baseline: Path | None = None


class ReviewConfig(_Section):
    enabled: bool = False
    strictness: Literal["low", "normal", "high"] = "normal"
    check_for: tuple[Literal["security", "bugs", "performance", "style"], ...] = (
        "security",
        "bugs",
        "performance",
        "style",
    )
    block_on_critical: bool = True
    on_block: Literal["review", "draft_pr"] = "review"
    on_error: Literal["fail", "allow"] = "fail"


class GithubConfig(_Section):
    enabled: bool = False
    token_env: str = "GITHUB_TOKEN"  # noqa: S105 - the name of a variable
    repo: str | None = None  # owner/name; default: parsed from the remote's URL
    base_url: str | None = None  # GitHub Enterprise: https://HOST/api/v3
    draft: bool = False
    labels: tuple[str, ...] = ()
    retries: int = Field(default=3, ge=0, le=10)
    max_rate_limit_wait_s: float = Field(default=120, ge=0)
    done_when: Literal["merged", "opened"] = "merged"  # when a ticket with a PR is done
    poll_interval_s: float = Field(default=60, gt=0)  # each open PR is asked this often
    full_read_s: float = Field(default=900, gt=0)  # the conversation is re-read this often
    trigger: str = Field(default="@ticketd", min_length=2)  # what asks for a revision
    allowed_logins: tuple[str, ...] = ()  # may ask without write access
    revise_on_changes_requested: bool = False
    debounce_s: float = Field(default=30, ge=0)  # requests this close are one revision
    max_revisions: int = Field(default=5, ge=0, le=100)  # per pull request
    max_revisions_per_hour: int = Field(default=10, ge=0)  # all pull requests together
    webhook_secret_env: str = "TICKETD_WEBHOOK_SECRET"  # noqa: S105 - the name of a variable


class ServerConfig(_Section):
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(default=8765, ge=0, le=65535)
    token_env: str | None = None  # a variable holding a bearer token the endpoints require


class NotifyConfig(_Section):
    """Messages to operators through apprise (``daemon.alerts``)."""

    urls: tuple[str, ...] = ()  # apprise URLs holding no secret (json://host/path, ntfy://topic)
    urls_env: tuple[str, ...] = ()  # names of variables each holding one apprise URL (tokens)
    on: tuple[
        Literal["failed", "held", "pr_opened", "pr_merged", "ollama_down", "ollama_up", "crashed"],
        ...,
    ] = ("failed", "held", "ollama_down", "ollama_up", "crashed")
    batch_s: float = Field(default=60, ge=0)  # events this soon after the first: one message
    retries: int = Field(default=3, ge=0, le=10)  # extra tries of a failed send
    timeout_s: float = Field(default=10, gt=0)  # each send's connect and each read

    @model_validator(mode="before")
    @classmethod
    def _yaml_on(cls, data: Any) -> Any:
        """YAML 1.1 reads an unquoted ``on:`` key as ``true``: it is the ``on`` key."""
        if isinstance(data, dict) and any(key is True for key in data):
            return {"on" if key is True else key: value for key, value in data.items()}
        return data

    @field_validator("urls")
    @classmethod
    def _urls(cls, urls: tuple[str, ...]) -> tuple[str, ...]:
        if urls:
            import apprise  # here: its plugins take a quarter second to load, worth it only now

            for url in urls:
                if not apprise.Apprise().add(url):
                    raise ValueError(f"{url!r} is not an apprise URL apprise can read")
        return urls


class Config(_Section):
    """The whole validated configuration; ``path`` is the file it came from."""

    path: Path = Path("config.yaml")
    repo: RepoConfig = RepoConfig()
    backlog: BacklogConfig = BacklogConfig()
    state_dir: Path = Path(".ticketd")
    logging: LoggingConfig = LoggingConfig()
    agent: AgentConfig = AgentConfig()
    ollama: OllamaConfig = OllamaConfig()
    checks: tuple[CheckCommand, ...] = ()
    static_analysis: StaticAnalysisConfig = StaticAnalysisConfig()
    concurrency: ConcurrencyConfig = ConcurrencyConfig()
    intake: IntakeConfig = IntakeConfig()
    shutdown: ShutdownConfig = ShutdownConfig()
    retry: RetryConfig = RetryConfig()
    insights: InsightsConfig = InsightsConfig()
    secrets: SecretsConfig = SecretsConfig()
    review: ReviewConfig = ReviewConfig()
    github: GithubConfig = GithubConfig()
    server: ServerConfig = ServerConfig()
    notify: NotifyConfig = NotifyConfig()

    def snapshot(self) -> dict[str, Any]:
        """The effective configuration as plain data, secrets masked, for the run history."""
        masked: dict[str, Any] = _mask(self.model_dump(mode="json", by_alias=True))
        return masked

    @property
    def agent_uses_ollama(self) -> bool:
        """Does the agent use a model of ``ollama.models``? The builtin agent does; a command
        agent does when ``agent.uses_ollama`` says so, or (auto) when ``{model}`` appears in
        its command or its ``agent.env``."""
        a = self.agent
        if a.kind == "builtin" or a.uses_ollama is True:
            return True
        return a.uses_ollama == "auto" and any(
            "{model}" in text for text in (*a.command, *a.env.values())
        )

    @property
    def wanted_models(self) -> list[str]:
        """The models runs may ask for: ``ollama.models``, those of ``models_by_label``, and
        the review's, each once."""
        o = self.ollama
        wanted = [*o.models, *(m for models in o.models_by_label.values() for m in models)]
        if self.review.enabled and o.review_model:
            wanted.append(o.review_model)
        return list(dict.fromkeys(wanted))

    @property
    def needs_ollama(self) -> bool:
        """Does any configured work call Ollama (the agent, or the review)?"""
        return self.agent_uses_ollama or self.review.enabled

    def github_token(self) -> str | None:
        return os.environ.get(self.github.token_env) or None

    def webhook_secret(self) -> str | None:
        return os.environ.get(self.github.webhook_secret_env) or None

    def server_token(self) -> str | None:
        return os.environ.get(self.server.token_env) or None if self.server.token_env else None

    def secret_values(self) -> list[str]:
        """Values that must never reach a log, a commit or an ``.error.json``."""
        tokens = [
            os.environ.get(self.github.token_env, ""),
            self.server_token() or "",
            self.webhook_secret() or "",
            *(os.environ.get(name, "") for name in self.notify.urls_env),  # whole URLs
        ]
        return [t for t in tokens if len(t) >= 4]

    def notify_urls(self) -> dict[str, str]:
        """The variables ``notify.urls_env`` names that are set (apprise URLs with tokens)."""
        return {n: os.environ[n] for n in self.notify.urls_env if n in os.environ}

    def agent_env(self) -> dict[str, str]:
        """The agents' (and checks') environment: a few harmless variables of the daemon's
        (AGENT_ENV), those named in agent.pass_env, the Ollama host, then agent.env. Never the
        daemon's tokens, whatever pass_env says."""
        hidden = self._hidden_vars()
        env = {
            k: v
            for k, v in os.environ.items()
            if (k in AGENT_ENV or k.startswith("LC_") or k in self.agent.pass_env)
            and k not in hidden
        }
        first = self.ollama.pool[0].url  # a run using Ollama gets its own host (see pool)
        env.setdefault("OLLAMA_HOST", first)
        env.setdefault("OLLAMA_API_BASE", first)
        env.update(self.agent.env)
        return env

    def git_env(self) -> dict[str, str]:
        """The environment of ticketd's own git commands: the daemon's, less its tokens (a
        push uses the user's git credentials: ssh keys, a credential helper)."""
        hidden = self._hidden_vars()
        return {k: v for k, v in os.environ.items() if k not in hidden}

    def _hidden_vars(self) -> set[str | None]:
        """The daemon's own variables no child of it gets: its tokens and systemd's."""
        g = self.github
        return {
            g.token_env,
            g.webhook_secret_env,
            self.server.token_env,
            *self.notify.urls_env,
            *NOTIFY_VARS,
        }


NOTIFY_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
AGENT_ENV = frozenset(
    "PATH HOME USER LOGNAME SHELL LANG LANGUAGE TZ TERM TMPDIR XDG_CACHE_HOME SSL_CERT_FILE"
    " SSL_CERT_DIR".split()
)


def notify_env() -> dict[str, str]:
    """systemd's sd_notify variables, for the daemon's own notifier (never for its agents)."""
    return {k: os.environ[k] for k in NOTIFY_VARS if k in os.environ}


def find_config(explicit: Path | None) -> Path:
    """--config, then $TICKETD_CONFIG, then ./config.yaml."""
    if explicit is not None:
        return explicit
    env = os.environ.get("TICKETD_CONFIG")
    return Path(env) if env else Path("config.yaml")


def load(explicit: Path | None = None) -> Config:
    path = find_config(explicit).absolute()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file (see --config, $TICKETD_CONFIG)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from e
    return parse(text, path)


def parse(text: str, path: Path) -> Config:
    try:
        data = yaml.safe_load(text)
        lines = _key_lines(yaml.compose(text))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{path}{where}: not valid YAML: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of keys, not {type(data).__name__}"
        )
    host = os.environ.get("OLLAMA_HOST")
    if host:
        data.setdefault("ollama", {})
        if isinstance(data["ollama"], dict) and not data["ollama"].get("hosts"):
            data["ollama"]["host"] = host
    try:
        config = Config.model_validate({**data, "path": path})
    except ValidationError as e:
        raise ConfigError(_describe(e, path, lines)) from None
    return _resolve_paths(config, path.parent)


def _resolve_paths(config: Config, base: Path) -> Config:
    def resolve(p: Path) -> Path:
        return (base / p.expanduser()).resolve()

    return config.model_copy(
        update={
            "repo": config.repo.model_copy(update={"path": resolve(config.repo.path)}),
            "backlog": config.backlog.model_copy(update={"dir": resolve(config.backlog.dir)}),
            "state_dir": resolve(config.state_dir),
            "secrets": config.secrets.model_copy(
                update={"baseline": resolve(config.secrets.baseline)}
                if config.secrets.baseline
                else {}
            ),
            "logging": config.logging.model_copy(update={"dir": resolve(config.logging.dir)}),
        }
    )


def _describe(error: ValidationError, path: Path, lines: Mapping[tuple[str, ...], int]) -> str:
    problems = []
    for item in error.errors():
        loc = tuple(str(part) for part in item["loc"])
        key = ".".join(loc) or "(top level)"
        line = _nearest_line(loc, lines)
        where = f"{path}:{line}" if line else str(path)
        msg = item["msg"]
        if item["type"] == "extra_forbidden":
            msg = "unknown key"
        problems.append(f"{where}: {key}: {msg}")
    return "\n".join(problems)


def _nearest_line(loc: tuple[str, ...], lines: Mapping[tuple[str, ...], int]) -> int | None:
    for n in range(len(loc), 0, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return None


def _key_lines(node: yaml.Node | None, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], int]:
    """Map each key path (("agent", "timeout_s"), ("agent", "command", "0")) to its 1-based line."""
    found: dict[tuple[str, ...], int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            path = (*prefix, str(key.value))
            found[path] = key.start_mark.line + 1
            found.update(_key_lines(value, path))
    elif isinstance(node, yaml.SequenceNode):
        for i, value in enumerate(node.value):
            found[(*prefix, str(i))] = value.start_mark.line + 1
            found.update(_key_lines(value, (*prefix, str(i))))
    return found


def _mask(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _mask(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask(v) for v in value]
    lowered = key.lower()
    if value and any(w in lowered for w in SECRET_WORDS) and not lowered.endswith("_env"):
        return "***"
    return value
