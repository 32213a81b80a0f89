"""The dashboard, in a real browser: Debian's chromium driven by Selenium (the tests install
chromium and its driver with apt where they are missing) against a real daemon. The HTTP
level (who may act, cross-site requests, bad ids) is tested with plain requests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import PY, SIDE_CHANNEL, Daemon, Project, wait_until
from test_server import served

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts"  # screenshots the tests leave for a person to look at
TOKEN = "dash-t0ken-for-tests"
XSS = "<img src=x onerror=\"document.title='pwned'\">Fix it"

# An agent that waits for ``release`` (beside the checkout's project) before it writes its
# file, and fails for tickets whose id ends in "-9": a ticket can be watched while it runs.
GATED_AGENT = [
    PY,
    "-c",
    "import sys, time, pathlib\n"
    "gate = pathlib.Path(sys.argv[2])\n"
    "while not gate.exists(): time.sleep(0.05)\n"
    "if sys.argv[1].endswith('-9'): sys.exit('the agent gives up')\n"
    "pathlib.Path(sys.argv[1] + '.txt').write_text('done')\n",
    "{ticket_id}",
]


def _apt_install(*packages: str) -> bool:
    """Install Debian packages as root (or with sudo -n); False when that cannot be done."""
    if shutil.which("apt-get") is None:
        return False
    prefix = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}

    def apt(*args: str) -> bool:
        done = subprocess.run(
            [*prefix, "apt-get", *args],
            capture_output=True,
            env=env,
            timeout=900,
            stdin=subprocess.DEVNULL,
        )
        return done.returncode == 0

    install = ("install", "-y", "-q", *packages)
    return apt(*install) or (apt("update", "-q") and apt(*install))


@pytest.fixture(scope="session")
def chromium() -> tuple[str, str]:
    """Debian's chromium and chromedriver, installed when missing. Without them the browser
    tests skip saying why, except in CI, where that is a failure."""
    found = shutil.which("chromium"), shutil.which("chromedriver")
    if None in found and _apt_install("chromium", "chromium-driver"):
        found = shutil.which("chromium"), shutil.which("chromedriver")
    browser, driver = found
    if browser is None or driver is None:
        why = "chromium and chromium-driver (Debian) could not be installed"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    return browser, driver


@pytest.fixture
def browser(chromium: tuple[str, str]) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,1100"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=chromium[1]))
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()


def dashboard(project: Project, daemons: list[Daemon], *, token: bool = True) -> str:
    project.write_config(
        agent={"command": [*GATED_AGENT, str(project.root / "release")], **SIDE_CHANNEL},
        server={"enabled": True, "port": 0, "token_env": "TICKETD_TEST_DASH" if token else None},
        retry={"enabled": False},
    )
    os.environ["TICKETD_TEST_DASH"] = TOKEN
    try:
        daemons.append(d := Daemon(project))
    finally:
        del os.environ["TICKETD_TEST_DASH"]
    return served(d)


def text_of(driver: Any, css: str) -> str:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    try:
        return str(driver.find_element("css selector", css).text)
    except (NoSuchElementException, StaleElementReferenceException):
        return ""


def test_an_operator_watches_tickets_run_and_retries_a_failure(
    project: Project, daemons: list[Daemon], browser: Any
) -> None:
    url = dashboard(project, daemons)
    browser.get(url + "/")
    assert browser.current_url == url + "/login"  # the token is asked for
    browser.find_element("id", "token").send_keys("wrong")
    browser.find_element("id", "sign-in").click()
    wait_until(lambda: "not the server token" in text_of(browser, "#wrong"), what="refused")
    browser.find_element("id", "token").send_keys(TOKEN)
    browser.find_element("id", "sign-in").click()
    wait_until(lambda: "Queue" in browser.page_source, what="the dashboard")

    project.ticket("task-1 - Runs.md", title=XSS)
    project.ticket("task-9 - Fails.md", body="Try the impossible.")
    running = wait_until(
        lambda: browser.find_elements("css selector", ".run[data-ticket='task-1']"),
        what="task-1 running, shown without a reload",
    )
    assert running
    assert browser.title != "pwned" and "<img" in text_of(browser, "#live")  # text, not markup
    (project.root / "release").touch()
    wait_until(
        lambda: "done" in text_of(browser, "#recent") and "task-1" in text_of(browser, "#recent"),
        what="task-1 done, shown without a reload",
    )
    wait_until(lambda: "task-9" in text_of(browser, "#attention"), what="task-9 failed")
    assert "AGENT_FAILED" in text_of(browser, "#attention")
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "dashboard.png"))

    browser.find_element("link text", "task-9").click()
    wait_until(lambda: "failed/" in text_of(browser, "#folder"), what="task-9's page")
    assert "the agent gives up" in text_of(browser, "#record")
    browser.find_element("id", "retry").click()
    wait_until(
        lambda: len(browser.find_elements("css selector", "#runs tr")) == 3,
        what="a second run of task-9 after the retry",
    )
    assert "back in todo/" in browser.page_source
    browser.save_screenshot(str(ARTIFACTS / "ticket.png"))
    assert [f for f in os.listdir(project.folder("failed")) if f.endswith(".md")] == [
        "task-9 - Fails.md"
    ]


# -- the HTTP level ---------------------------------------------------------------------------


def ask(
    url: str, data: dict[str, str] | None = None, headers: dict[str, str] | None = None
) -> tuple[int, str, dict[str, str]]:
    """One request; redirects are not followed (their status is the answer)."""

    class Keep(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    body = urllib.parse.urlencode(data).encode() if data is not None else None
    request = urllib.request.Request(url, data=body, headers=headers or {})
    try:
        with urllib.request.build_opener(Keep).open(request, timeout=10) as answer:
            return answer.status, answer.read().decode(), dict(answer.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), dict(e.headers)


def test_actions_need_the_token_and_refuse_other_sites(
    project: Project, daemons: list[Daemon]
) -> None:
    (project.root / "release").touch()
    url = dashboard(project, daemons)
    project.ticket("task-9 - Fails.md")
    wait_until(lambda: project.where().get("failed"), what="task-9 failed")
    retry = url + "/tickets/task-9/retry"

    status, _, headers = ask(url + "/login", {"token": TOKEN})
    assert status == 303
    cookie = headers["Set-Cookie"].split(";")[0]
    assert "HttpOnly" in headers["Set-Cookie"] and "SameSite=Strict" in headers["Set-Cookie"]
    page = ask(url + "/tickets/task-9", headers={"Cookie": cookie})[1]
    csrf = page.split('name="csrf" value="')[1].split('"')[0]

    assert ask(url + "/", headers={})[0] == 303  # no token: to the sign-in page
    assert ask(url + "/status")[0] == 401
    assert ask(retry, {"csrf": csrf})[0] == 403  # no session
    assert ask(retry, {}, {"Cookie": cookie})[0] == 403  # no form token
    evil = {"Cookie": cookie, "Origin": "http://evil.example"}
    assert ask(retry, {"csrf": csrf}, evil)[0] == 403
    cross = {"Cookie": cookie, "Sec-Fetch-Site": "cross-site"}
    assert ask(retry, {"csrf": csrf}, cross)[0] == 403
    assert ask(url + "/tickets/task-9/retry", headers={"Cookie": cookie})[0] == 405  # a GET
    assert project.where().get("failed") == ["task-9 - Fails.md"]  # nothing acted

    assert ask(retry, {"csrf": csrf}, {"Cookie": cookie})[0] == 303
    wait_until(lambda: "todo" in project.where() or len(_runs(project)) == 2, what="the retry")
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    assert ask(url + "/tickets/TASK%2D9", headers=bearer)[0] == 200  # ids match as ids do
    missing = ask(url + "/tickets/task-404", headers=bearer)
    assert missing[0] == 404 and "No ticket" in missing[1] and "<html" in missing[1]
    assert ask(url + "/tickets/task-404/retry", {}, bearer)[0] == 404
    assert ask(url + "/static/../server.py")[0] == 404


def test_without_a_token_the_pages_are_read_only(project: Project, daemons: list[Daemon]) -> None:
    (project.root / "release").touch()
    url = dashboard(project, daemons, token=False)
    project.ticket("task-9 - Fails.md")
    wait_until(lambda: project.where().get("failed"), what="task-9 failed")
    status, page, headers = ask(url + "/tickets/task-9")
    assert status == 200 and "Retry now" not in page and "read-only" in page
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert ask(url + "/tickets/task-9/retry", {"csrf": ""})[0] == 403
    assert project.where().get("failed") == ["task-9 - Fails.md"]
    # a record whose link is a script, and a form too large to read: refused, not followed
    project.ticket("task-5 - Held.md", folder="review")
    record = {"taskId": "task-5", "reason": "PR_OPEN", "prUrl": "javascript:alert(1)"}
    (project.folder("review") / "task-5 - Held.review.json").write_text(json.dumps(record))
    page = ask(url + "/tickets/task-5")[1]
    assert "javascript:alert(1)" in page and 'href="javascript:' not in page
    assert ask(url + "/tickets/task-9/retry", {"csrf": "x" * 5000})[0] == 413


def _runs(project: Project) -> list[Any]:
    import sqlite3

    db = sqlite3.connect(project.root / "state" / "history.sqlite3")
    try:
        return db.execute("SELECT outcome FROM runs").fetchall()
    finally:
        db.close()


def test_cancel_ends_a_running_ticket(project: Project, daemons: list[Daemon]) -> None:
    url = dashboard(project, daemons)  # the agent waits for "release": it runs until cancelled
    project.ticket("task-1 - Waits.md")
    wait_until(lambda: project.where().get("in-progress"), what="task-1 running")
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    page = ask(url + "/tickets/task-1", headers=bearer)[1]
    assert 'id="cancel"' in page and "in-progress/" in page
    assert ask(url + "/tickets/task-1/cancel", {}, bearer)[0] == 303
    wait_until(lambda: ("cancelled",) in _runs(project), what="the run cancelled")
    (project.root / "release").touch()
