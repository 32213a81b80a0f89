"""ticketd inside a real Backlog.md project (``backlog.layout: backlog.md``), driven with the
real ``backlog`` CLI: tasks handed over by assignee run, and the board shows where they are."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import PY, Daemon, Project, fill, git, small_disk, ticketd, wait_until
from fake_github import FakeGitHub

from daemon import tickets


@dataclass
class Board:
    """A Backlog.md project in the test repository, and its CLI."""

    program: Path
    project: Project

    @property
    def root(self) -> Path:
        return self.project.repo / "backlog"

    def __call__(self, *args: str, ok: bool = True) -> str:
        done = subprocess.run(
            [str(self.program), *args],
            cwd=self.project.repo,
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "NO_COLOR": "1"},
        )
        if ok:
            assert done.returncode == 0, f"backlog {args}: {done.stdout}\n{done.stderr}"
        return done.stdout + done.stderr

    def create(self, title: str, *args: str) -> str:
        """``backlog task create``; returns the new id (``TASK-3``)."""
        out = self("task", "create", title, *args, "--plain")
        found = re.search(r"Task (\w+-\d+) - ", out)
        assert found, out
        return found[1]

    def view(self, task_id: str) -> str:
        return self("task", "view", task_id, "--plain")

    def file(self, task_id: str) -> Path:
        (path,) = (self.root / "tasks").glob(f"{task_id.lower()} - *.md")
        return path

    def commit(self) -> None:
        """The tasks as the person's repository has them: committed and pushed."""
        git(self.project.repo, "add", "backlog")
        git(self.project.repo, "commit", "--quiet", "-m", "tasks")
        git(self.project.repo, "push", "--quiet", "origin", "main")


def write_agent(extra: str = "") -> list[str]:
    """An agent writing ``<id>.txt``, and doing ``extra`` (Python) in its checkout."""
    source = (
        "import sys, pathlib\n"
        "pathlib.Path(sys.argv[1] + '.txt').write_text('done by agent\\n')\n" + extra
    )
    return [PY, "-c", source, "{ticket_id}"]


@pytest.fixture
def board(project: Project, backlog_cli: Path) -> Iterator[Board]:
    b = Board(backlog_cli, project)
    b("init", "demo", "--defaults", "--agent-instructions", "none")
    b("config", "set", "remoteOperations", "false")
    project.write_config(backlog={"dir": "repo/backlog"})
    yield b


def run_once(project: Project, *args: str) -> subprocess.CompletedProcess[str]:
    return ticketd("run", "--once", "--config", str(project.config_path), *args, timeout=120)


def status(project: Project) -> dict:
    done = ticketd("status", "--json", "--config", str(project.config_path))
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def test_a_task_assigned_to_ticketd_runs_and_the_board_shows_it_done(board: Board) -> None:
    """The hand-off by assignee, in place: the task stays in tasks/, its status goes to Done
    with its branch in references, the branch holds the change and nothing of the backlog
    (the agent edited its task file, as Backlog.md's AGENTS.md tells agents to), and the
    tasks that are not ticketd's are left byte for byte."""
    project = board.project
    mine = board.create(
        "Write the greeting", "-a", "@ticketd", "-d", "Say hello.", "--ac", "It says hello"
    )
    person = board.create("A person's task", "-a", "@alice")
    nobody = board.create("Nobody's task")
    draft = board("task", "create", "A draft", "-a", "@ticketd", "--draft", "--plain")
    assert "DRAFT-" in draft.upper()
    board.commit()
    others = {t: board.file(t).read_bytes() for t in (person, nobody)}
    edit_task = (
        "for p in pathlib.Path('backlog/tasks').glob('*.md'):\n"
        "    p.write_text(p.read_text().replace('status: To Do', 'status: Done'))\n"
        "pathlib.Path('backlog/tasks/task-99 - Sneaked-in.md').write_text('x')\n"
    )
    project.write_config(backlog={"dir": "repo/backlog"}, agent={"command": write_agent(edit_task)})

    done = run_once(project)
    assert done.returncode == 0, done.stderr

    assert board.file(mine).parent.name == "tasks"
    view = board.view(mine)
    assert re.search(r"Status: .*Done", view), view
    (branch,) = [b for b in project.remote_branches() if b.startswith("ticketd/")]
    assert branch in view  # the board says where the work is
    assert "Done:" in board("task", "list", "--plain", "-s", "Done")
    assert mine in board("task", "list", "--plain", "-s", "Done")
    tree = git(project.remote, "ls-tree", "-r", "--name-only", branch).split()
    assert f"{mine}.txt" in tree
    assert not [p for p in tree if p.startswith("backlog/tasks/task-99")]
    main_tasks = git(project.remote, "diff", "--stat", "main", branch, "--", "backlog")
    assert main_tasks == ""  # the agent's edits under backlog/ never reach the branch
    assert {t: board.file(t).read_bytes() for t in others} == others
    assert "No duplicate IDs" in board("doctor")


def test_a_failed_task_goes_back_to_to_do_unassigned_and_says_why(board: Board) -> None:
    """Failure shows on the board: To Do, ticketd's handle gone (so it is not taken again),
    a dated line in Implementation Notes; the full record in state_dir; ``retry-failed``
    hands it back; ``status`` counts it as failed."""
    project = board.project
    task = board.create("Cannot be done", "-a", "@ticketd,@alice", "--notes", "Earlier note.")
    board.commit()
    project.write_config(
        backlog={"dir": "repo/backlog"},
        agent={"command": [PY, "-c", "print('the model is confused'); raise SystemExit(3)"]},
    )

    assert run_once(project).returncode == 1

    view = board.view(task)
    assert re.search(r"Status: .*To Do", view), view
    assert re.search(r"Assignee: @alice\n", view), view
    assert "Earlier note." in view
    dated = r"\d{4}-\d\d-\d\d \d\d:\d\d ticketd: failed in stage agent \(AGENT_FAILED\)"
    assert re.search(dated, view), view
    assert "assign it to @ticketd again" in view
    record = project.root / "state" / "board" / "failed" / f"{task.lower()}.error.json"
    data = json.loads(record.read_text())
    assert (data["taskId"], data["errorCode"]) == (task, "AGENT_FAILED")
    assert data["file"] == board.file(task).name
    assert status(project)["counts"]["failed"] == 1
    assert run_once(project).returncode == 0  # not taken again: no longer assigned
    assert re.search(r"Assignee: @alice\n", board.view(task))

    again = ticketd(
        "retry-failed", "--task-id", task, "--force", "--config", str(project.config_path)
    )
    assert again.returncode == 0, again.stderr
    assert "retried" in again.stdout
    view = board.view(task)
    assert re.search(r"Assignee: .*@ticketd", view), view
    assert not record.exists()
    assert status(project)["counts"] == {
        "todo": 1,
        "in-progress": 0,
        "review": 0,
        "done": 0,
        "failed": 0,
    }
    assert "No duplicate IDs" in board("doctor")


def test_dependencies_resolve_as_backlog_md_resolves_them(board: Board) -> None:
    """A dependency is met when Backlog.md calls it Done (a person's task, done by hand);
    one that is not waits, and ``status`` says what it waits for and where that is."""
    project = board.project
    first = board.create("The person's part", "-a", "@alice")
    second = board.create("Needs the first", "-a", "@ticketd", "--dep", first)
    high = ("--priority", "high")
    third = board.create("Needs the second", "-a", "@ticketd", "--dep", second, *high)
    board("task", "edit", first, "-s", "In Progress")
    board.commit()
    waiting = {w["taskId"]: w["reason"] for w in status(project)["waiting"]}
    assert waiting[second] == f"waits for {first} (In Progress)"
    assert waiting[third] == f"waits for {second} (To Do)"

    board("task", "edit", first, "-s", "Done")
    assert run_once(project).returncode == 0
    for task in (second, third):  # the third, once the second is done, in the same run
        assert re.search(r"Status: .*Done", board.view(task))


def test_two_files_with_one_id_neither_runs_and_both_are_named(board: Board) -> None:
    """Backlog.md's ambiguous id: ticketd runs neither and names both files."""
    project = board.project
    task = board.create("Original", "-a", "@ticketd")
    original = board.file(task)
    copy = original.with_name(f"{task.lower()} - Copy.md")
    copy.write_text(original.read_text().replace("title: Original", "title: Copy"))
    board.commit()

    done = run_once(project)
    log = (project.root / "logs" / "ticketd.log").read_text()
    assert done.returncode == 0
    assert project.remote_branches() == ["main"]
    assert original.name in log and copy.name in log and "backlog doctor --fix" in log
    reasons = [w["reason"] for w in status(project)["waiting"]]
    assert len([r for r in reasons if copy.name in r and original.name in r]) == 2
    check = ticketd("validate", "--config", str(project.config_path))
    assert check.returncode == 1 and "used by" in check.stdout


def test_ticketd_new_numbers_as_backlog_md_and_the_cli_reads_it(board: Board) -> None:
    """``ticketd new`` takes the next id over tasks, drafts, completed and archive (ids are
    never reused), and writes a task the CLI shows as its own would be."""
    project = board.project
    for title in ("One", "Two", "Three"):
        board.create(title)
    board("task", "create", "A draft", "--draft")
    board("task", "archive", "TASK-3")
    (board.root / "completed").mkdir(exist_ok=True)
    board.file("TASK-2").rename(board.root / "completed" / board.file("TASK-2").name)
    made = ticketd(
        "new", "Add a greeting", "-d", "Say hello.", "--ac", "It says hello",
        "--config", str(project.config_path),
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    path = Path(made.stdout.strip())
    assert path.parent == board.root / "tasks"
    assert path.name == "task-4 - Add-a-greeting.md"
    view = board.view("TASK-4")
    assert "Task TASK-4 - Add a greeting" in view
    assert re.search(r"Assignee: .*@ticketd", view) and re.search(r"Status: .*To Do", view)
    assert "It says hello" in view and "Say hello." in view
    assert "No duplicate IDs" in board("doctor")
    again = board.create("After ticketd's")
    assert again == "TASK-5"


def test_zero_padded_ids_and_a_custom_prefix_are_honoured(
    project: Project, backlog_cli: Path
) -> None:
    b = Board(backlog_cli, project)
    b(
        "init", "demo", "--defaults", "--agent-instructions", "none",
        "--task-prefix", "job", "--zero-padded-ids", "3",
    )  # fmt: skip
    b.create("First")
    project.write_config(backlog={"dir": "repo/backlog"})
    made = ticketd("new", "Second", "--config", str(project.config_path))
    assert made.returncode == 0, made.stderr
    assert Path(made.stdout.strip()).name == "job-002 - Second.md"
    assert "Task JOB-002 - Second" in b.view("JOB-002")


def test_a_model_chosen_by_label_survives_the_cli_editing_the_task(board: Board) -> None:
    """Backlog.md drops frontmatter keys it does not know (``model:``); a ``model:`` label
    survives every edit, so that is the per-ticket model choice in this layout."""
    task = board.create("Pick a model", "-l", "backend,model:qwen2.5-coder:1.5b")
    path = board.file(task)
    path.write_text(path.read_text().replace("labels:", "model: other:7b\nlabels:", 1))
    board("task", "edit", task, "-s", "In Progress", "--append-notes", "moved")
    after = tickets.parse_file(board.file(task))
    assert "model" not in after.frontmatter  # what the CLI does
    assert after.models == ("qwen2.5-coder:1.5b",)


def test_a_persons_edit_during_a_run_is_kept(board: Board) -> None:
    """A person edits the task while it runs (notes, a new title: Backlog.md renames the
    file): the run goes on under the task's id and its status write merges into the edit."""
    project = board.project
    task = board.create("Slow work", "-a", "@ticketd")
    board.commit()
    gate = project.root / "go"
    wait_for_gate = (
        f"import time\nwhile not pathlib.Path({str(gate)!r}).exists(): time.sleep(0.05)\n"
    )
    project.write_config(
        backlog={"dir": "repo/backlog"},
        agent={"command": write_agent(wait_for_gate), "sandbox": "off"},
    )
    daemon = Daemon(project)
    try:
        wait_until(lambda: "In Progress" in board.file(task).read_text(), what="the claim")
        board("task", "edit", task, "-t", "Slow work renamed", "--append-notes", "Person's note")
        renamed = board.file(task).with_name(f"{task.lower()} - Slow-work-renamed.md")
        board.file(task).rename(renamed)  # as a person (or Backlog.md) may name it anew
        gate.write_text("go")
        wait_until(lambda: "Done" in board.view(task), timeout=60, what="done")
    finally:
        daemon.stop()
    view = board.view(task)
    assert "Slow work renamed" in view and "Person's note" in view
    assert board.file(task).name == f"{task.lower()} - Slow-work-renamed.md"
    assert len(list((board.root / "tasks").glob("*.md"))) == 1


def test_kill_9_mid_run_puts_the_task_back_to_to_do_and_it_runs_again(board: Board) -> None:
    project = board.project
    task = board.create("Interrupted", "-a", "@ticketd")
    board.commit()
    project.write_config(
        backlog={"dir": "repo/backlog"},
        agent={"command": write_agent("import time; time.sleep(60)\n")},
    )
    daemon = Daemon(project)
    try:
        wait_until(lambda: "In Progress" in board.view(task), what="the claim")
        assert status(project)["counts"]["in-progress"] == 1
        daemon.proc.kill()
        daemon.proc.wait()
    finally:
        daemon.stop()
    project.write_config(backlog={"dir": "repo/backlog"})
    assert run_once(project).returncode == 0
    assert re.search(r"Status: .*Done", board.view(task))
    assert (project.root / "logs" / "ticketd.log").read_text().count("recovered") == 1


def test_a_held_change_waits_in_the_projects_review_status(board: Board) -> None:
    """A project with a review status: a change a person must look at waits there; its
    record is kept in state_dir, the status shows it in review."""
    project = board.project
    config = board.root / "config.yml"
    config.write_text(
        config.read_text().replace(
            'statuses: ["To Do", "In Progress", "Done"]',
            'statuses: ["To Do", "In Progress", "In Review", "Done"]',
        )
    )
    task = board.create("Touch CI", "-a", "@ticketd")
    board.commit()
    ci = "pathlib.Path('.github/workflows').mkdir(parents=True)\n"
    ci += "pathlib.Path('.github/workflows/x.yml').write_text('on: push')\n"
    project.write_config(backlog={"dir": "repo/backlog"}, agent={"command": write_agent(ci)})
    assert run_once(project).returncode == 0
    assert re.search(r"Status: .*In Review", board.view(task))
    record = project.root / "state" / "board" / "review" / f"{task.lower()}.review.json"
    assert json.loads(record.read_text())["reason"] == "SENSITIVE_PATH"
    assert status(project)["counts"]["review"] == 1
    assert project.remote_branches() == ["main"]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"statuses": {"review": "Review"}}, "backlog.statuses.review is 'Review', which is not"),
        ({"layout": "backlog.md", "dir": "repo/nowhere"}, "nowhere/config.yml: missing"),
    ],
)
def test_a_bad_mapping_or_a_missing_project_is_a_clear_error(
    board: Board, change: dict, expected: str
) -> None:
    project = board.project
    project.write_config(backlog={"dir": "repo/backlog", **change})
    done = run_once(project)
    assert done.returncode == 2
    assert expected in done.stderr
    assert "config.yml" in done.stderr or "config.yaml" in done.stderr


def test_a_project_config_without_statuses_is_an_error_naming_it(board: Board) -> None:
    config = board.root / "config.yml"
    config.write_text(re.sub(r"statuses: .*", "statuses: Todo", config.read_text()))
    done = run_once(board.project)
    assert done.returncode == 2
    assert f"{config}: statuses must be a list" in done.stderr


def test_the_agent_gets_everything_the_task_holds_once(board: Board) -> None:
    """Description, acceptance criteria, Definition of Done, references, documentation, plan
    and notes reach the agent's prompt, each once."""
    project = board.project
    task = board.create(
        "Everything", "-a", "@ticketd", "-d", "DESC-TEXT", "--ac", "AC-TEXT", "--dod", "DOD-TEXT",
        "--ref", "REF-TEXT", "--doc", "DOC-TEXT", "--notes", "NOTES-TEXT",
    )  # fmt: skip
    board("task", "edit", task, "--plan", "PLAN-TEXT")
    board.commit()
    copy = project.root / "prompt.md"
    keep = f"import shutil; shutil.copy(sys.argv[2], {str(copy)!r})\n"
    project.write_config(
        backlog={"dir": "repo/backlog"},
        agent={"command": [*write_agent(keep), "{prompt_file}"], "sandbox": "off"},
    )
    assert run_once(project).returncode == 0
    prompt = copy.read_text()
    for text in ("DESC", "AC", "DOD", "REF", "DOC", "PLAN", "NOTES"):
        assert prompt.count(f"{text}-TEXT") == 1, (text, prompt)
    assert "## Definition of Done" in prompt and "## References" in prompt


def test_the_folder_layout_is_kept_where_there_is_no_project(project: Project) -> None:
    """No config.yml and tasks/ in the backlog folder: the folder layout, as before."""
    project.ticket("task-1 - Plain.md")
    assert run_once(project).returncode == 0
    assert project.where() == {"done": ["task-1 - Plain.md"]}
    assert status(project)["layout"] == "folders"


@pytest.mark.parametrize(
    ("statuses", "waiting"),
    [('["To Do", "In Progress", "In Review", "Done"]', "In Review"), (None, "In Progress")],
)
def test_a_pull_request_waits_in_review_on_the_board_until_merged(
    board: Board,
    fake_github: FakeGitHub,
    monkeypatch: pytest.MonkeyPatch,
    statuses: str | None,
    waiting: str,
) -> None:
    """With pull requests reviewed on GitHub, a delivered task waits in the project's review
    status (In Progress where it has none) with the pull request in its references; merged,
    it is Done."""
    project = board.project
    monkeypatch.setenv("GITHUB_TOKEN", "t0k3n")
    if statuses:
        config = board.root / "config.yml"
        config.write_text(re.sub(r"statuses: .*", f"statuses: {statuses}", config.read_text()))
    task = board.create("Open a pull request", "-a", "@ticketd")
    board.commit()
    project.write_config(
        backlog={"dir": "repo/backlog"},
        github={"enabled": True, "repo": "acme/widgets", "base_url": fake_github.url},
    )
    assert run_once(project).returncode == 0
    [pr] = fake_github.open_pulls()
    view = board.view(task)
    assert re.search(rf"Status: .*{waiting}", view), view
    assert pr["html_url"] in view
    assert [p["pr"] for p in status(project)["inReview"]] == [pr["number"]]

    fake_github.merge(pr["number"])
    assert run_once(project).returncode == 0
    assert re.search(r"Status: .*Done", board.view(task))
    assert status(project)["inReview"] == []
    assert not list((project.root / "state" / "board" / "review").iterdir())


def test_the_shipped_config_needs_one_line_for_a_backlog_md_project(board: Board) -> None:
    """The default config.yaml, pointed at the project (the line a user adds), runs it: its
    statuses come from the project, not from the folder layout's defaults."""
    import yaml

    project = board.project
    shipped = yaml.safe_load((Path(__file__).parents[1] / "config.yaml").read_text())
    shipped["backlog"]["dir"] = "repo/backlog"  # the line
    shipped["repo"] = {**shipped["repo"], "path": "repo"}
    shipped["agent"] = {**shipped["agent"], "command": write_agent()}
    shipped["state_dir"], shipped["logging"]["dir"] = "state", "logs"
    project.config_path.write_text(yaml.safe_dump(shipped))
    task = board.create("From the shipped config", "-a", "@ticketd")
    board.commit()
    done = run_once(project)
    assert done.returncode == 0, done.stderr
    assert re.search(r"Status: .*Done", board.view(task))


def test_doctor_names_the_layout_the_hand_off_and_a_status_the_project_lacks(
    board: Board,
) -> None:
    def backlog_check() -> dict:
        done = ticketd("doctor", "--json", "--config", str(board.project.config_path))
        return next(c for c in json.loads(done.stdout)["checks"] if c["name"] == "backlog")

    board.project.write_config(backlog={"dir": "repo/backlog", "label": "agent"})
    check = backlog_check()
    assert check["status"] == "ok"
    assert check["detail"] == (
        f"Backlog.md project {board.root}: tasks for @ticketd or label agent; "
        "To Do -> In Progress -> Done"
    )
    board.project.write_config(backlog={"dir": "repo/backlog", "statuses": {"done": "Shipped"}})
    check = backlog_check()
    assert check["status"] == "FAIL"
    assert (
        "backlog.statuses.done is 'Shipped', which is not one of the statuses of"
        in (check["detail"])
    )


def test_a_label_hands_a_task_over_too_and_a_failure_takes_it_off(board: Board) -> None:
    """With ``backlog.label``, a labelled task is ticketd's; failing, it loses the label (and
    keeps the others), so it is not taken again by itself."""
    project = board.project
    task = board.create("Labelled", "-l", "agent,backend")
    project.write_config(
        backlog={"dir": "repo/backlog", "label": "agent"},
        agent={"command": [PY, "-c", "raise SystemExit(3)"]},
    )
    board.commit()
    assert run_once(project).returncode == 1
    view = board.view(task)
    assert re.search(r"Labels: backend\n", view), view
    project.write_config(backlog={"dir": "repo/backlog", "label": "agent"})
    board("task", "edit", task, "--add-label", "agent")
    assert run_once(project).returncode == 0
    assert re.search(r"Status: .*Done", board.view(task))


CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "backlog"


@pytest.mark.skipif(not CORPUS.is_dir(), reason="the sample corpus (../shared/corpus) is absent")
def test_real_projects_configs_give_statuses_they_have(tmp_path: Path) -> None:
    """Every config.yml of the corpus's public projects: the statuses ticketd would write are
    theirs; Done is Done even where a status comes after it ("Wontfix")."""
    from daemon import config as configuration
    from daemon.board import project_statuses, read_project

    cfg = configuration.parse("", tmp_path / "config.yaml")
    found = sorted(CORPUS.glob("*config.yml"))
    assert found
    for path in found:
        root = tmp_path / path.name
        root.mkdir()
        (root / "config.yml").write_bytes(path.read_bytes())
        project = read_project(root)
        chosen = project_statuses(cfg, project)
        assert set(chosen.values()) <= set(project.statuses), path.name
        assert chosen["todo"] == project.statuses[0] and chosen["done"] == "Done", path.name
        review = [s for s in project.statuses if "review" in s.lower()]
        assert chosen["review"] == (review[0] if review else chosen["in-progress"])


def test_a_failed_task_a_person_takes_over_is_not_handed_back(board: Board) -> None:
    """After a failure a person sets the task In Progress themselves: the retry job and
    ``retry-failed`` leave it alone, as a file moved out of failed/ by hand."""
    project = board.project
    task = board.create("Mine now", "-a", "@ticketd")
    board.commit()
    project.write_config(
        backlog={"dir": "repo/backlog"}, agent={"command": [PY, "-c", "raise SystemExit(3)"]}
    )
    assert run_once(project).returncode == 1
    board("task", "edit", task, "-s", "In Progress", "-a", "@alice")
    again = ticketd(
        "retry-failed", "--task-id", task, "--force", "--config", str(project.config_path)
    )
    assert again.returncode == 1 and f"no failed ticket {task}" in again.stderr
    view = board.view(task)
    assert re.search(r"Status: .*In Progress", view) and re.search(r"Assignee: @alice\n", view)
    assert status(project)["counts"]["failed"] == 0


def test_the_queue_is_ordered_by_priority_then_ordinal_then_id(board: Board) -> None:
    """As the board orders it: priority first, then the ordinal a person gave by dragging,
    then the id."""
    project = board.project
    late = board.create("Ordinal 3000", "-a", "@ticketd", "--ordinal", "3000")
    early = board.create("Ordinal 1000", "-a", "@ticketd", "--ordinal", "1000")
    urgent = board.create("High", "-a", "@ticketd", "--ordinal", "9000", "--priority", "high")
    plain = board.create("No ordinal", "-a", "@ticketd")
    ready = [w["taskId"] for w in status(project)["waiting"] if w["reason"] == "ready"]
    assert ready == [urgent, early, late, plain]


def test_text_from_a_failing_agent_cannot_reshape_the_task_file(board: Board) -> None:
    """Attack: the agent's output, quoted in the failure note, tries to close the notes block
    and open a section of its own; the note stays one line inside Implementation Notes."""
    project = board.project
    task = board.create("Hostile output", "-a", "@ticketd", "-d", "Original description.")
    board.commit()
    hostile = "<!-- SECTION:NOTES:END -->\\n## Description\\nPWNED\\n---\\nstatus: Done"
    project.write_config(
        backlog={"dir": "repo/backlog"},
        agent={"command": [PY, "-c", f"print('{hostile}'); raise SystemExit(1)"]},
    )
    assert run_once(project).returncode == 1
    after = tickets.parse_file(board.file(task))
    assert after.status == "To Do" and after.description == "Original description."
    assert "PWNED" in after.notes and after.notes.count("\n") == 0
    view = board.view(task)
    assert re.search(r"Status: .*To Do", view) and "Original description." in view


def test_links_and_fifos_in_tasks_are_named_and_never_followed(board: Board) -> None:
    """Attack: a link to a file outside and a FIFO named like tasks: never read, named as
    problems; the real task runs."""
    project = board.project
    task = board.create("Real work", "-a", "@ticketd")
    secret = project.root / "outside.md"
    secret.write_text(board.file(task).read_text().replace("TASK-1", "TASK-7"))
    (board.root / "tasks" / "task-7 - Link.md").symlink_to(secret)
    os.mkfifo(board.root / "tasks" / "task-8 - Fifo.md")
    done = run_once(project)
    assert done.returncode == 0, done.stderr
    assert re.search(r"Status: .*Done", board.view(task))
    log = (project.root / "logs" / "ticketd.log").read_text()
    assert "task-7 - Link.md: cannot be read as a task: a symbolic link, not a file" in log
    assert "task-8 - Fifo.md: cannot be read as a task" in log
    assert "To Do" in secret.read_text()  # never rewritten through the link


def test_dependency_ids_match_as_backlog_md_matches_them(board: Board) -> None:
    """Hand-written dependency ids (``1``, ``task-01``) name TASK-1; a task in the project's
    last status, or in completed/, satisfies its dependents as it does for Backlog.md."""
    project = board.project
    config = board.root / "config.yml"
    config.write_text(
        re.sub(
            r"statuses: .*",
            'statuses: ["To Do", "In Progress", "Done", "Closed"]',
            config.read_text(),
        )
    )
    first = board.create("Closed by a person")
    gone = board.create("Completed long ago")
    board("task", "edit", first, "-s", "Closed")
    board("task", "edit", gone, "-s", "Closed")
    (board.root / "completed").mkdir(exist_ok=True)
    board.file(gone).rename(board.root / "completed" / board.file(gone).name)
    task = board.create("Waits for both", "-a", "@ticketd")
    path = board.file(task)
    path.write_text(path.read_text().replace("dependencies: []", "dependencies: ['1', task-02]"))
    board.commit()
    assert run_once(project).returncode == 0
    assert re.search(r"Status: .*Done", board.view(task))


def test_a_full_disk_at_claim_time_leaves_the_task_to_do_and_it_runs_later(
    board: Board, daemons: list
) -> None:
    """Fault: the project's disk is full when ticketd would write In Progress. The status
    write fails whole (temp file + rename), the claim is undone, the task stays To Do and
    runs once there is room."""
    project = board.project
    task = board.create("Full disk", "-a", "@ticketd")
    board.commit()
    saved = project.root / "saved-backlog"
    board.root.rename(saved)
    board.root.mkdir()
    with small_disk(board.root):
        subprocess.run(["cp", "-a", f"{saved}/.", str(board.root)], check=True, timeout=60)
        before = board.file(task).read_bytes()
        filler = fill(board.root)
        try:
            daemons.append(d := Daemon(project))
            wait_until(lambda: "No space left on device" in d.text(), what="the full disk")
            assert board.file(task).read_bytes() == before
            assert status(project)["counts"]["in-progress"] == 0
            filler.unlink()
            wait_until(lambda: "Done" in board.file(task).read_text(), timeout=60, what="done")
            assert "crashed" not in d.text()
        finally:
            for d in daemons:
                d.stop()
