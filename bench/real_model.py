"""The builtin agent against aider, on the same small tickets, with a real model.

Run by hand against a real model served with the Ollama API (for example the shared kit's
``real-model/serve.sh start``: Qwen2.5-Coder-1.5B-Instruct as qwen2.5-coder:1.5b on
http://127.0.0.1:11434); a run takes minutes, the whole bench an hour or more on a CPU.

The fixture is a small package, ``textkit/`` (strings, stats, lists, inventory) with passing
pytest tests in ``tests/``, and 12 tickets, two of each kind: add a function, fix an
off-by-one, rename a parameter, write a docstring, make a failing test pass (the repo holds that
test, in a file only that ticket's check runs; the check also refuses an edited test) and add a
module. Each ticket has a check, an argv run in the checkout, that fails on the base commit and
passes after a reference fix. First, always, every ticket is verified in a scratch copy: its
check fails before and passes after its fix, and the passing tests still pass; a broken fixture
stops the bench (``--verify-only`` stops there, and needs no model).

Then for each ticket and each agent, interleaved (ticket 1 builtin, ticket 1 aider, ...), a
fresh project (bench/project.py: a repo with the fixture committed and pushed to a bare
remote.git, backlog/, config.yaml) whose config has ``agent.kind: builtin``, or ``command``
with config.yaml's default aider command (its executable from ``--aider``); ``timeout_s`` from
``--timeout``; ``ollama.host`` the counting proxy below and ``ollama.models: [--model]``; the
ticket's check and the passing tests (``tests``) as ``checks`` (120 s each), as a project
would have them; ``retry.enabled: false``; all else default. The ticket goes into
backlog/todo/ as a Backlog.md task and one ``python -m daemon run --once --config ...`` runs
it, with a timeout of ``--timeout`` + 120 s.

A run is done when its ticket ends in backlog/done/. The pushed branch (the only one besides
main in remote.git) is cloned and both checks run there again, outside any sandbox; a ticket done
whose branch fails the check, or one not done whose branch passes, is reported as MISMATCH.
The failure code is ``errorCode`` of ``backlog/failed/*.error.json`` (else the folder the ticket
ended in). Calls and tokens come from a proxy in this process that forwards every request to
``--host`` and streams the answer back unchanged, counting both agents alike: a call is a
/api/chat or /api/generate request with messages or a prompt (loading the model is not one);
tokens are the final object's ``prompt_eval_count`` + ``eval_count``. ``--log`` writes each
call's messages and full reply as JSON lines. ``--keep`` keeps every run's folder
(``<agent>-<n>/``: daemon.out, logs/, state/, backlog/, repo/, remote.git, verify/).
Prints figures; asserts nothing.

    python bench/real_model.py --verify-only
    python bench/real_model.py [--agents builtin,aider] [--tickets 1,3,5] [--aider PATH]
        [--model qwen2.5-coder:1.5b] [--host URL] [--timeout 900] [--log calls.jsonl]
        [--json results.json] [--keep]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any

import httpx
import yaml
from project import PY, git, make_project, run_in_tempdir

REPO = Path(__file__).resolve().parent.parent
AGENTS = ("builtin", "aider")
CHECK_TIMEOUT_S = 120
BASE: dict[str, str] = {
    ".gitignore": "__pycache__/\n.pytest_cache/\n",
    "textkit/__init__.py": '"""textkit: small helpers for text, numbers, lists and stock."""\n',
    "textkit/strings.py": '''"""String helpers."""


def slugify(text: str) -> str:
    """Lowercase words joined by hyphens: "Hello, World" -> "hello-world"."""
    cleaned = "".join(c if c.isalnum() else " " for c in text.lower())
    return "-".join(cleaned.split())


def truncate(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters, ending in "..." when it was cut."""
    if len(text) < limit:
        return text
    return text[: limit - 3] + "..."


def count_words(text: str) -> int:
    """How many whitespace-separated words ``text`` has."""
    return len(text.split())
''',
    "textkit/stats.py": '''"""Statistics over lists of numbers."""


def mean(values: list[float]) -> float:
    if not values:
        raise ValueError("mean of an empty sequence")
    return sum(values) / len(values)


def median(values: list[float]) -> float:
    """The middle value (the mean of the two middle ones for an even count)."""
    if not values:
        raise ValueError("median of an empty sequence")
    ordered = sorted(values)
    mid = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[mid]
    return (ordered[mid - 1] + ordered[mid]) / 2


def moving_average(values: list[float], window: int) -> list[float]:
    """The mean of each run of ``window`` consecutive values, in order."""
    if window <= 0:
        raise ValueError("window must be positive")
    return [mean(values[i : i + window]) for i in range(len(values) - window)]
''',
    "textkit/lists.py": '''"""List helpers."""


def chunk(items: list, n: int) -> list[list]:
    """``items`` in consecutive pieces of ``n`` items (the last may be shorter)."""
    if n <= 0:
        raise ValueError("n must be positive")
    return [items[i : i + n] for i in range(0, len(items), n)]


def flatten(nested: list[list]) -> list:
    return [item for group in nested for item in group]


def dedupe(items: list) -> list:
    """``items`` without repeats, each kept where it first appeared."""
    seen = set()
    out = []
    for item in items:
        if item not in seen:
            seen.add(item)
            out.append(item)
    return out
''',
    "textkit/inventory.py": '''"""A small stock inventory: quantities by item name."""

from textkit.lists import chunk


class Inventory:
    def __init__(self) -> None:
        self._stock: dict[str, int] = {}

    def add(self, name: str, qty: int = 1) -> None:
        """Add ``qty`` of ``name`` (a new item starts at 0)."""
        if qty < 0:
            raise ValueError("qty must not be negative")
        self._stock[name] = self._stock.get(name, 0) + qty

    def remove(self, name: str, quantity: int = 1) -> None:
        """Take ``quantity`` of ``name`` out of stock."""
        self._stock[name] = self._stock.get(name, 0) - quantity

    def count(self, name: str) -> int:
        return self._stock.get(name, 0)

    def total(self) -> int:
        return sum(self._stock.values())

    def names(self) -> list[str]:
        return sorted(self._stock)

    def restock(self, levels: dict[str, int]) -> None:
        """Bring each named item up to at least the given level."""
        for name, level in levels.items():
            missing = level - self.count(name)
            if missing > 0:
                self.add(name, qty=missing)

    def pages(self, per_page: int) -> list[list[str]]:
        """The item names, sorted, in pages of ``per_page``."""
        return chunk(self.names(), per_page)
''',
    "tests/test_strings.py": """from textkit.strings import count_words, slugify, truncate


def test_slugify():
    assert slugify("Hello, World") == "hello-world"
    assert slugify("  many   spaces ") == "many-spaces"


def test_truncate():
    assert truncate("hello world", 8) == "hello..."
    assert truncate("hi", 10) == "hi"


def test_count_words():
    assert count_words("one two  three") == 3
""",
    "tests/test_stats.py": """import pytest

from textkit.stats import mean, median


def test_mean():
    assert mean([1, 2, 3, 4]) == 2.5
    with pytest.raises(ValueError):
        mean([])


def test_median():
    assert median([3, 1, 2]) == 2
    assert median([4, 1, 3, 2]) == 2.5
""",
    "tests/test_lists.py": """from textkit.lists import chunk, dedupe, flatten


def test_chunk():
    assert chunk([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5]]


def test_flatten_and_dedupe():
    assert flatten([[1], [2, 3], []]) == [1, 2, 3]
    assert dedupe([3, 1, 3, 2, 1]) == [3, 1, 2]
""",
    "tests/test_inventory.py": """from textkit.inventory import Inventory


def test_add_count_total():
    inv = Inventory()
    inv.add("pen", 2)
    inv.add("pen")
    inv.add("ink", 4)
    assert inv.count("pen") == 3
    assert inv.total() == 7
    assert inv.names() == ["ink", "pen"]


def test_restock_and_pages():
    inv = Inventory()
    inv.add("pen", 5)
    inv.restock({"pen": 3, "ink": 2, "pad": 1})
    assert (inv.count("pen"), inv.count("ink"), inv.count("pad")) == (5, 2, 1)
    assert inv.pages(2) == [["ink", "pad"], ["pen"]]
""",
    "tests/test_inventory_remove.py": """import pytest

from textkit.inventory import Inventory


def test_removing_more_than_in_stock_raises():
    inv = Inventory()
    inv.add("pen", 2)
    with pytest.raises(ValueError):
        inv.remove("pen", 3)
    assert inv.count("pen") == 2


def test_removing_the_last_one_drops_the_item():
    inv = Inventory()
    inv.add("pen", 2)
    inv.remove("pen", 2)
    assert inv.count("pen") == 0
    assert inv.names() == []
""",
    "tests/test_slugify_apostrophes.py": """from textkit.strings import slugify


def test_apostrophes_do_not_split_words():
    assert slugify("Don't Panic") == "dont-panic"
    assert slugify("It's a dog's life") == "its-a-dogs-life"


def test_other_punctuation_still_separates_words():
    assert slugify("Hello, World") == "hello-world"
""",
}
FAILING_TESTS = ("tests/test_inventory_remove.py", "tests/test_slugify_apostrophes.py")
PASSING_TESTS = sorted(p for p in BASE if p.startswith("tests/") and p not in FAILING_TESTS)
SUITE = [PY, "-B", "-m", "pytest", "-q", "-p", "no:cacheprovider", *PASSING_TESTS]


@dataclass(frozen=True)
class Ticket:
    n: int
    kind: str
    title: str
    description: str
    criteria: tuple[str, ...]
    check: list[str]
    fix: dict[str, str]  # path -> its whole content after a reference fix


def code(source: str) -> list[str]:
    return [PY, "-B", "-c", source]


def test_passes(path: str) -> list[str]:
    """Runs the test file, after making sure it is still the one the fixture wrote."""
    digest = hashlib.sha256(BASE[path].encode()).hexdigest()
    return code(
        f"import hashlib, sys, pytest\n"
        f"assert hashlib.sha256(open({path!r}, 'rb').read()).hexdigest() == {digest!r}, "
        f"'{path} was changed'\n"
        f"sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', {path!r}]))"
    )


def edit(path: str, *pairs: tuple[str, str]) -> dict[str, str]:
    text = BASE[path]
    for old, new in pairs:
        assert old in text, f"reference fix: {old!r} not in {path}"
        text = text.replace(old, new)
    return {path: text}


TICKETS = [
    Ticket(1, "add function", "Add reverse_words to textkit/strings.py",
           "We need a helper that reverses the order of the words in a sentence. Add"
           " `reverse_words(text: str) -> str` to textkit/strings.py: split on whitespace and"
           " join the words back in reverse order with single spaces.",
           ('reverse_words("one two three") returns "three two one"',
            'extra whitespace is collapsed: reverse_words("  a   b ") returns "b a"',
            'reverse_words("") returns ""'),
           code("from textkit.strings import reverse_words as r\nassert r('one two three') =="
                " 'three two one'\nassert r('  a   b ') == 'b a'\nassert r('') == ''"),
           {"textkit/strings.py": BASE["textkit/strings.py"] + '\n\ndef reverse_words(text: str)'
            ' -> str:\n    """The words of ``text`` in reverse order."""\n'
            '    return " ".join(reversed(text.split()))\n'}),
    Ticket(2, "off-by-one", "moving_average drops the last window",
           "`textkit.stats.moving_average([1, 2, 3, 4], 2)` returns `[1.5, 2.5]`, but there are"
           " three windows of two: it should be `[1.5, 2.5, 3.5]`. Looks like an off-by-one in"
           " the range.",
           ("moving_average([1, 2, 3, 4], 2) == [1.5, 2.5, 3.5]", "moving_average([5], 1) == [5.0]",
            "a window longer than the list still gives []"),
           code("from textkit.stats import moving_average as m\nassert m([1, 2, 3, 4], 2) =="
                " [1.5, 2.5, 3.5]\nassert m([5], 1) == [5.0]\nassert m([1, 2], 3) == []"),
           edit("textkit/stats.py", ("len(values) - window)", "len(values) - window + 1)"))),
    Ticket(3, "rename parameter", "Rename the n parameter of chunk to size",
           "In textkit/lists.py, `chunk(items, n)`: `n` reads like the number of chunks, but it"
           " is the size of each. Rename the parameter to `size`, in the docstring and the error"
           " message too. Callers that pass it positionally keep working.",
           ("chunk([1, 2, 3, 4, 5], size=2) returns [[1, 2], [3, 4], [5]]",
            "chunk has no parameter called n any more"),
           code("import inspect\nfrom textkit.lists import chunk\nassert chunk([1, 2, 3, 4, 5],"
                " size=2) == [[1, 2], [3, 4], [5]]\nassert list(inspect.signature(chunk)"
                ".parameters) == ['items', 'size']"),
           edit("textkit/lists.py", ("n: int", "size: int"), ("of ``n``", "of ``size``"),
                ("if n <= 0", "if size <= 0"), ('"n must', '"size must'),
                ("i + n]", "i + size]"), ("len(items), n)", "len(items), size)"))),
    Ticket(4, "docstring", "Document stats.mean",
           "`mean` is the only function in the stats module without a docstring. Add one that"
           " says what it returns and that it raises ValueError for an empty sequence.",
           ("textkit.stats.mean has a docstring",
            "the docstring mentions the ValueError for an empty sequence",
            "mean behaves as before"),
           code("import textkit.stats as s\nd = s.mean.__doc__ or ''\nassert 'ValueError' in d"
                " and 'empty' in d.lower(), d\nassert s.mean([1, 2, 3]) == 2\ntry:\n"
                "    s.mean([])\nexcept ValueError:\n    pass\nelse:\n    raise AssertionError"),
           edit("textkit/stats.py", ("float:\n    if not values:\n        raise ValueError(\"mean",
                "float:\n    \"\"\"The arithmetic mean; ValueError when ``values`` is empty."
                "\"\"\"\n    if not values:\n        raise ValueError(\"mean"))),
    Ticket(5, "failing test", "Inventory.remove lets stock go negative",
           "Removing more than we have leaves a negative count. tests/test_inventory_remove.py"
           " describes what we want and fails right now: make it pass (do not change the test).",
           ("tests/test_inventory_remove.py passes, unchanged",
            "removing more than is in stock raises ValueError and leaves the count as it was",
            "removing the last one drops the item from names()"),
           test_passes("tests/test_inventory_remove.py"),
           edit("textkit/inventory.py", (
               "        self._stock[name] = self._stock.get(name, 0) - quantity\n",
               "        have = self._stock.get(name, 0)\n        if quantity > have:\n"
               '            raise ValueError(f"only {have} {name} in stock")\n'
               "        if quantity == have:\n            self._stock.pop(name, None)\n"
               "        else:\n            self._stock[name] = have - quantity\n"))),
    Ticket(6, "add module", "Add a numbers module with clamp",
           "Add a new module textkit/numbers.py with `clamp(value, low, high)`: the value limited"
           " to the range low..high. low greater than high is a caller bug: raise ValueError.",
           ("clamp(5, 0, 3) == 3, clamp(-1, 0, 3) == 0, clamp(2, 0, 3) == 2",
            "clamp(1, 3, 0) raises ValueError", "floats work too: clamp(0.5, 0.0, 1.0) == 0.5"),
           code("from textkit.numbers import clamp as c\nassert (c(5, 0, 3), c(-1, 0, 3), c(2, 0,"
                " 3), c(0.5, 0.0, 1.0)) == (3, 0, 2, 0.5)\ntry:\n    c(1, 3, 0)\nexcept"
                " ValueError:\n    pass\nelse:\n    raise AssertionError('no ValueError')"),
           {"textkit/numbers.py": '"""Number helpers."""\n\n\ndef clamp(value: float, low: float,'
            ' high: float) -> float:\n    if low > high:\n        raise ValueError("low > high")'
            "\n    return max(low, min(value, high))\n"}),
    Ticket(7, "add function", "Inventory - list the items that are running low",
           "For the reorder report I need `Inventory.low_stock(threshold)`: the names of the"
           " items whose quantity is below the threshold, sorted alphabetically. An item at"
           " exactly the threshold is fine.",
           ('with pen=1, ink=5, pad=3, low_stock(3) returns ["pen"]',
            'and low_stock(6) returns ["ink", "pad", "pen"]', "an empty inventory returns []"),
           code("from textkit.inventory import Inventory\ninv = Inventory()\nassert"
                " inv.low_stock(3) == []\nfor name, q in (('pen', 1), ('ink', 5), ('pad', 3)):\n"
                "    inv.add(name, q)\nassert inv.low_stock(3) == ['pen']\nassert"
                " inv.low_stock(6) == ['ink', 'pad', 'pen']"),
           {"textkit/inventory.py": BASE["textkit/inventory.py"] + "\n    def low_stock(self,"
            " threshold: int) -> list[str]:\n        return sorted(n for n, q in"
            " self._stock.items() if q < threshold)\n"}),
    Ticket(8, "off-by-one", "truncate cuts strings that already fit",
           '`truncate("hello", 5)` returns "he..." although "hello" is exactly 5 characters and'
           " fits. Only strings longer than the limit should be cut.",
           ('truncate("hello", 5) == "hello"', 'truncate("hello world", 8) == "hello..." as now',
            'truncate("hi", 5) == "hi"'),
           code("from textkit.strings import truncate as t\nassert t('hello', 5) == 'hello'\n"
                "assert t('hello world', 8) == 'hello...'\nassert t('hi', 5) == 'hi'"),
           edit("textkit/strings.py", ("len(text) < limit", "len(text) <= limit"))),
    Ticket(9, "rename parameter", "Inventory.add - rename qty to quantity",
           "We spell out `quantity` everywhere else; `Inventory.add(name, qty=1)` is the odd one"
           " out. Rename its parameter to `quantity` and update whatever passes it by keyword.",
           ('Inventory().add("pen", quantity=2) works', "add has no qty parameter any more",
            "restock still works"),
           code("import inspect\nfrom textkit.inventory import Inventory\ninv = Inventory()\n"
                "inv.add('pen', quantity=2)\nassert list(inspect.signature(inv.add).parameters)"
                " == ['name', 'quantity']\ninv.restock({'pen': 5, 'ink': 1})\nassert"
                " (inv.count('pen'), inv.count('ink')) == (5, 1)"),
           edit("textkit/inventory.py", ("qty: int = 1) -> None:\n        \"\"\"Add ``qty``",
                "quantity: int = 1) -> None:\n        \"\"\"Add ``quantity``"),
                ("if qty < 0", "if quantity < 0"), ('"qty must', '"quantity must'),
                ("0) + qty", "0) + quantity"), ("qty=missing", "quantity=missing"))),
    Ticket(10, "docstring", "Docstring for flatten",
           "textkit.lists.flatten has no docstring, and people keep assuming it flattens all the"
           " way down. Document it: it flattens one level only, e.g. [[1, [2]], [3]] gives"
           " [1, [2], 3].",
           ("flatten has a docstring", "it says that only one level of nesting is flattened"),
           code("from textkit.lists import flatten\nd = flatten.__doc__ or ''\nassert 'level' in"
                " d.lower(), d\nassert flatten([[1, [2]], [3]]) == [1, [2], 3]"),
           edit("textkit/lists.py", ("list:\n    return [item for group",
                'list:\n    """The items of each inner list, in order: one level only."""\n'
                "    return [item for group"))),
    Ticket(11, "failing test", "slugify splits words at apostrophes",
           "slugify(\"Don't Panic\") gives \"don-t-panic\", it should be \"dont-panic\". I added"
           " tests/test_slugify_apostrophes.py, which fails at the moment; fix slugify so that"
           " it passes.",
           ("tests/test_slugify_apostrophes.py passes, unchanged", "tests/test_strings.py passes"),
           test_passes("tests/test_slugify_apostrophes.py"),
           edit("textkit/strings.py",
                ("in text.lower())", "in text.lower().replace(\"'\", \"\"))"))),
    Ticket(12, "add module", "camelCase helper for field names",
           "The API client needs to turn our snake_case field names into camelCase. Please add a"
           " `cases` module to textkit with `snake_to_camel(name)`.",
           ('snake_to_camel("user_id") == "userId"',
            'snake_to_camel("http_response_code") == "httpResponseCode"',
            "a name without underscores comes back unchanged"),
           code("from textkit.cases import snake_to_camel as s\nassert s('user_id') == 'userId'\n"
                "assert s('http_response_code') == 'httpResponseCode'\nassert s('name') =="
                " 'name'"),
           {"textkit/cases.py": '"""Name case conversions."""\n\n\ndef snake_to_camel(name: str)'
            ' -> str:\n    first, *rest = name.split("_")\n'
            '    return first + "".join(w.capitalize() for w in rest)\n'}),
]  # fmt: skip


def write_files(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def passes(argv: list[str], cwd: Path) -> tuple[bool, str]:
    try:
        p = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=CHECK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return False, "timed out"
    return p.returncode == 0, (p.stdout + p.stderr).strip()


def verify() -> list[str]:
    """Each ticket in a scratch copy: check fails, reference fix, check and old tests pass."""
    suite = SUITE
    problems = []
    with tempfile.TemporaryDirectory(prefix="ticketd-real-verify-") as tmp:
        write_files(Path(tmp) / "base", BASE)
        ok, out = passes(suite, Path(tmp) / "base")
        if not ok:
            problems.append(f"the passing tests fail on the base commit:\n{out}")
        for t in TICKETS:
            work = Path(tmp) / f"t{t.n}"
            write_files(work, BASE)
            if passes(t.check, work)[0]:
                problems.append(f"ticket {t.n}: its check passes before the fix")
            write_files(work, t.fix)
            ok, out = passes(t.check, work)
            if not ok:
                problems.append(f"ticket {t.n}: its check fails after the fix:\n{out[-800:]}")
            ok, out = passes(suite, work)
            if not ok:
                problems.append(f"ticket {t.n}: its fix breaks the passing tests:\n{out[-800:]}")
            state = "ok" if not any(p.startswith(f"ticket {t.n}:") for p in problems) else "BROKEN"
            print(f"  {state:<6} {t.n:>2} {t.kind:<16} {t.title}", flush=True)
    return problems


@dataclass
class Call:
    prompt_tokens: int
    eval_tokens: int
    done_reason: str | None
    status: int


class Proxy(ThreadingHTTPServer):
    """Forwards everything to ``upstream``, streaming back; counts chat/generate calls."""

    daemon_threads = True

    def __init__(self, upstream: str, log: IO[str] | None) -> None:
        super().__init__(("127.0.0.1", 0), Forward)
        self.upstream, self.log = upstream.rstrip("/"), log
        self.client = httpx.Client(timeout=httpx.Timeout(None, connect=10))
        self.lock = threading.Lock()
        self.run = ""  # the key of the run being counted
        self.calls: dict[str, list[Call]] = defaultdict(list)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def begin(self, path: str, body: bytes) -> tuple[Call, dict[str, Any]] | None:
        """A call of the current run, counted when asked (an answer cut short counts too)."""
        try:
            req = json.loads(body)
        except ValueError:
            return None
        if not isinstance(req, dict) or not req.get("messages" if "chat" in path else "prompt"):
            return None  # loads or unloads the model
        call = Call(0, 0, "unfinished", 0)
        with self.lock:
            self.calls[self.run].append(call)
            run = self.run
        return call, {"run": run, "path": path, **req}

    def finish(self, call: Call, req: dict[str, Any], status: int, answer: bytes) -> None:
        """Tokens and done_reason from the answer's final object; the log line."""
        final: dict[str, Any] = {}
        reply = []
        for line in answer.decode(errors="replace").splitlines():
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                reply.append((obj.get("message") or {}).get("content") or obj.get("response") or "")
                final = obj if obj.get("done") or "error" in obj else final
        with self.lock:
            call.status = status
            call.prompt_tokens = final.get("prompt_eval_count") or 0
            call.eval_tokens = final.get("eval_count") or 0
            if final:
                error = final.get("error")
                call.done_reason = f"error: {error}" if error else final.get("done_reason")
            if self.log:
                keep = ("run", "path", "model", "messages", "system", "prompt")
                entry = {k: req[k] for k in keep if k in req} | {"reply": "".join(reply)}
                self.log.write(json.dumps(entry | asdict(call)) + "\n")
                self.log.flush()


HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "te", "trailer",
       "upgrade", "proxy-connection", "accept-encoding"}  # fmt: skip


class Forward(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Proxy

    def forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path = self.path.split("?")[0]
        counted = path in ("/api/chat", "/api/generate") and self.command == "POST"
        call = self.server.begin(path, body) if counted else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
        url = self.server.upstream + self.path
        request = self.server.client.build_request(self.command, url, headers=headers, content=body)
        try:
            resp = self.server.client.send(request, stream=True)
        except httpx.HTTPError as e:
            self.send_error(502, f"upstream {url}: {e}")
            if call:
                self.server.finish(*call, 502, b"")
            return
        answer, chunked = bytearray(), "content-length" not in resp.headers
        try:
            self.send_response(resp.status_code)
            for k, v in resp.headers.items():
                if k.lower() not in HOP:
                    self.send_header(k, v)
            if chunked:
                self.send_header("Transfer-Encoding", "chunked")
            else:
                self.send_header("Content-Length", resp.headers["content-length"])
            self.end_headers()
            for piece in resp.iter_raw():
                answer += piece
                if piece and self.command != "HEAD":
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                    self.wfile.flush()
            if chunked and self.command != "HEAD":
                self.wfile.write(b"0\r\n\r\n")
        except OSError:
            self.close_connection = True  # the client went away mid-answer
        finally:
            resp.close()
        if call:
            self.server.finish(*call, resp.status_code, bytes(answer))

    do_GET = do_POST = do_HEAD = do_DELETE = do_PUT = forward

    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass
class Result:
    agent: str
    ticket: int
    kind: str
    folder: str  # where the ticket file ended: done, failed, review, in-progress, todo, gone
    code: str | None
    error: str | None
    calls: int
    prompt_tokens: int
    eval_tokens: int
    seconds: float
    exit_status: int | None  # of `run --once`; None when the bench's timeout ended it
    branch: str | None
    branch_passes: bool | None  # the check on a clone of the pushed branch
    done_reasons: list[str | None] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.folder == "done"

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.eval_tokens

    @property
    def mismatch(self) -> bool:
        return self.done != bool(self.branch_passes)


def write_ticket(todo: Path, t: Ticket) -> str:
    name = f"task-{t.n} - {re.sub(r'[^A-Za-z0-9]+', '-', t.title).strip('-')}.md"
    criteria = "".join(f"- [ ] #{i} {c}\n" for i, c in enumerate(t.criteria, 1))
    text = (
        f"---\nid: task-{t.n}\ntitle: {t.title}\nstatus: To Do\n---\n\n"
        f"## Description\n\n{t.description}\n\n## Acceptance Criteria\n\n{criteria}"
    )
    part = todo.parent / f".{name}.part"
    part.write_text(text)
    part.rename(todo / name)
    return name


def configure(config: Path, agent: str, t: Ticket, args: argparse.Namespace, host: str) -> None:
    data = yaml.safe_load(config.read_text())
    if agent == "builtin":
        data["agent"] = {"kind": "builtin", "timeout_s": args.timeout}
    else:
        default = yaml.safe_load((REPO / "config.yaml").read_text())["agent"]["command"]
        command = [args.aider, *default[1:]]
        data["agent"] = {"kind": "command", "command": command, "timeout_s": args.timeout}
    data["ollama"] = {"host": host, "models": [args.model]}
    data["checks"] = [
        {"name": "check", "run": t.check, "timeout_s": CHECK_TIMEOUT_S},
        {"name": "tests", "run": SUITE, "timeout_s": CHECK_TIMEOUT_S},
    ]
    data["retry"] = {"enabled": False}
    config.write_text(yaml.safe_dump(data, sort_keys=False))


def pushed(base: Path, t: Ticket) -> tuple[str | None, bool | None]:
    """The branch pushed besides main, and whether the check passes on a clone of it."""
    heads = subprocess.run(["git", "ls-remote", "--heads", str(base / "remote.git")],
                           capture_output=True, text=True, check=True).stdout  # fmt: skip
    branches = [r.split("refs/heads/", 1)[1] for r in heads.splitlines() if "refs/heads/" in r]
    branches = [b for b in branches if b != "main"]
    if not branches:
        return None, None
    clone = base / "verify"
    git(base, "clone", "--quiet", "--branch", branches[0], str(base / "remote.git"), str(clone))
    return branches[0], passes(t.check, clone)[0] and passes(SUITE, clone)[0]


def run_one(root: Path, agent: str, t: Ticket, args: argparse.Namespace, proxy: Proxy) -> Result:
    base = root / f"{agent}-{t.n}"
    base.mkdir()
    config = make_project(base, max_tickets=1)
    repo = base / "repo"
    write_files(repo, BASE)
    git(repo, "add", ".")
    git(repo, "commit", "--quiet", "-m", "textkit")
    git(repo, "push", "--quiet", "origin", "main")
    configure(config, agent, t, args, proxy.url)
    name = write_ticket(base / "backlog" / "todo", t)
    with proxy.lock:
        proxy.run = base.name
    env = {**os.environ, "OLLAMA_HOST": proxy.url}  # $OLLAMA_HOST would override ollama.host
    argv = [PY, "-m", "daemon", "run", "--once", "--config", str(config)]
    start = time.monotonic()
    status: int | None
    try:
        proc = subprocess.run(argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              timeout=args.timeout + 120)  # fmt: skip
        status, output = proc.returncode, proc.stdout
    except subprocess.TimeoutExpired as e:
        out = e.output or ""
        status, output = None, out.decode(errors="replace") if isinstance(out, bytes) else out
    seconds = time.monotonic() - start
    (base / "daemon.out").write_text(output)
    with proxy.lock:
        calls = proxy.calls[base.name]
    found = [p.parent.name for p in (base / "backlog").glob(f"*/{name}")]
    folder = found[0] if found else "gone"
    code = error = None
    if folder == "failed":
        record = json.loads((base / "backlog" / "failed" / (name[:-3] + ".error.json")).read_text())
        code, error = record.get("errorCode"), record.get("error")
    elif folder != "done":
        code = "BENCH_TIMEOUT" if status is None else folder.upper()
    branch, branch_passes = pushed(base, t)
    return Result(agent, t.n, t.kind, folder, code, error, len(calls),
                  sum(c.prompt_tokens for c in calls), sum(c.eval_tokens for c in calls),
                  round(seconds, 1), status, branch, branch_passes,
                  [c.done_reason for c in calls])  # fmt: skip


def line(r: Result) -> str:
    state = "done" if r.done else r.folder
    verdict = {None: "no branch", True: "passes", False: "fails"}[r.branch_passes]
    loud = "  MISMATCH: the pushed branch's check disagrees" if r.mismatch else ""
    return (f"  {r.ticket:>2} {r.kind:<16} {state:<8} {r.code or '-':<20} {r.calls:>3} calls"
            f" {r.tokens:>7} tok {r.seconds:>6.0f} s  branch {verdict}{loud}")  # fmt: skip


def report(results: list[Result], agents: list[str]) -> None:
    for agent in agents:
        rs = [r for r in results if r.agent == agent]
        if not rs:
            continue
        done = sum(r.done for r in rs)
        tokens = sum(r.tokens for r in rs)
        per = f"{tokens / done:.0f}" if done else "-"
        wall = [r.seconds for r in rs]
        print(f"{agent}: done {done}/{len(rs)}, {sum(r.calls for r in rs)} calls,"
              f" {sum(r.prompt_tokens for r in rs)} prompt + {sum(r.eval_tokens for r in rs)}"
              f" eval = {tokens} tokens, {per} tokens per finished ticket, wall {sum(wall):.0f} s"
              f" (median {statistics.median(wall):.0f} s per ticket)")  # fmt: skip
        for r in rs:
            print(line(r))
    bad = [r for r in results if r.mismatch]
    print(f"mismatches (ticket folder vs the check on the pushed branch): {len(bad) or 'none'}")


def bench(root: Path, args: argparse.Namespace, tickets: list[Ticket], agents: list[str]) -> None:
    log = open(args.log, "w") if args.log else None  # noqa: SIM115
    proxy = Proxy(args.host, log)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    results: list[Result] = []
    try:
        runs = [(t, a) for t in tickets for a in agents]
        for i, (t, agent) in enumerate(runs, 1):
            print(f"[{i}/{len(runs)}] ticket {t.n} ({t.kind}) {agent} ...", flush=True)
            results.append(run_one(root, agent, t, args, proxy))
            print(line(results[-1]), flush=True)
    finally:
        proxy.shutdown()
        proxy.client.close()
        if log:
            log.close()
        if args.json:
            data = {"args": vars(args), "results": [asdict(r) for r in results]}
            Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
    beside = Path(PY).parent / "ruff"  # where the daemon looks when PATH has none
    ruff = shutil.which("ruff") or (str(beside) if beside.is_file() else None)
    print(f"method: {len(tickets)} tickets x {agents}, model {args.model} at {args.host} through"
          f" a counting proxy, one `run --once` per ticket and agent, agent.timeout_s"
          f" {args.timeout:g}, ruff for static analysis {ruff or 'not found'},"
          f" python {sys.version.split()[0]}")  # fmt: skip
    report(results, agents)


def reachable(host: str, model: str) -> str | None:
    """Why the model cannot be used at ``host``, or None."""
    try:
        tags = httpx.get(host.rstrip("/") + "/api/tags", timeout=10).json()
    except (httpx.HTTPError, ValueError) as e:
        return f"no Ollama API at {host}: {e}"
    names = [m.get("name") for m in tags.get("models", [])]
    return None if model in names else f"{host} does not serve {model} (it has {names})"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    ap.add_argument("--host", default=os.environ.get("OLLAMA_HOST", "http://127.0.0.1:11434"),
                    help="the Ollama API (default: $OLLAMA_HOST, else %(default)s)")  # fmt: skip
    ap.add_argument("--model", default="qwen2.5-coder:1.5b", help="default: %(default)s")
    ap.add_argument("--agents", default=",".join(AGENTS), help="default: %(default)s")
    ap.add_argument("--aider", default=shutil.which("aider"), help="aider executable (PATH's)")
    ap.add_argument("--tickets", help="a subset by number, e.g. 1,3,5 (default: all 12)")
    ap.add_argument("--timeout", type=float, default=900, help="agent.timeout_s (%(default)s)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--log", help="write every call's messages and reply to this JSON-lines file")
    ap.add_argument("--json", help="write all raw results to this file")
    ap.add_argument("--verify-only", action="store_true", help="verify the fixture, then stop")
    args = ap.parse_args()
    agents = [a.strip() for a in args.agents.split(",") if a.strip()]
    if set(agents) - set(AGENTS):
        sys.exit(f"--agents: choose from {', '.join(AGENTS)}")
    numbers = {str(t.n): t for t in TICKETS}
    wanted = args.tickets.split(",") if args.tickets else list(numbers)
    if set(wanted) - set(numbers):
        sys.exit(f"--tickets: numbers from 1 to {len(TICKETS)}, e.g. 1,3,5")
    tickets = [t for n, t in numbers.items() if n in wanted]
    print(f"verifying the fixture: each check fails before and passes after its fix ({PY})")
    if problems := verify():
        sys.exit("the fixture is broken:\n" + "\n".join(problems))
    print(f"fixture ok: {len(TICKETS)} tickets")
    if args.verify_only:
        return
    if "aider" in agents and not (args.aider and os.access(args.aider, os.X_OK)):
        sys.exit(f"no aider executable ({args.aider}): pass --aider PATH or --agents builtin")
    if why := reachable(args.host, args.model):
        sys.exit(why)
    run_in_tempdir("ticketd-real-", args, lambda root: bench(root, args, tickets, agents))


if __name__ == "__main__":
    main()
