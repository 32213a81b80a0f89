"""Throughput on a pool of Ollama hosts: does it scale with the number of hosts?

For each N of ``--hosts`` (default 1, 2, 4, 8) the bench builds a throwaway project
(bench/project.py: a real git repo, a bare remote) and starts N fake Ollama servers
(tests/fake_ollama.py) in this process, each serving one ticket at a time
(``ollama.hosts[*].max_tickets: 1``) with a simulated model time: every answer streams in
three pieces with ``--model-s`` / 3 seconds between them. The daemon runs the builtin agent
(its sandbox as configured by default) with ``concurrency.max_tickets: N`` on
``--per-host`` x N tickets, each answered by one SEARCH/REPLACE block that applies.

One ``python -m daemon run --once`` runs them all. Throughput is tickets per second from the
moment the daemon says "watching" (start-up left out) until it exits with every ticket done
(checked in its history); scaling is throughput(N) / (N x throughput(1)). The bench
also prints how many tickets each host served. Asserts nothing.

    python bench/pool.py [--hosts 1,2,4,8] [--per-host 3] [--model-s 10] [--keep]
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import time
from pathlib import Path

import yaml
from overhead import run_once
from project import make_project, run_in_tempdir

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from fake_ollama import FakeOllama

MODEL = "qwen2.5-coder:7b"
EDIT = "README.md\n```\n<<<<<<< SEARCH\nhello\n=======\nhello world\n>>>>>>> REPLACE\n```\n"
WORDS = "amber birch cedar dune ember fjord grove heath iris jade kelp larch moss".split()


def add_tickets(todo: Path, count: int) -> None:
    for n in range(1, count + 1):
        name = f"task-{n} - Bench-{n}.md"
        words = " ".join(WORDS[(n * k) % len(WORDS)] for k in (1, 3, 7))
        part = todo.parent / f".{name}.part"
        part.write_text(
            f"---\nid: task-{n}\ntitle: Bench {n} {words}\nstatus: To Do\n---\n\n"
            f"Change README.md to say hello world ({words} {n}).\n"
        )
        part.rename(todo / name)


def configure(config: Path, fakes: list[FakeOllama]) -> None:
    data = yaml.safe_load(config.read_text())
    data["agent"] = {"kind": "builtin", "candidates": 1, "edit_format": "search-replace"}
    data["ollama"] = {
        "hosts": [{"url": f.url, "max_tickets": 1} for f in fakes],
        "models": [MODEL],
        "retries": 0,
        "health_check": {"interval_s": 5, "timeout_s": 2},
    }
    data["concurrency"] = {"max_tickets": len(fakes)}
    data["intake"] = {"settle_s": 0, "duplicate_threshold": 1.0}
    config.write_text(yaml.safe_dump(data, sort_keys=False))


def measure(root: Path, hosts: int, per_host: int, model_s: float) -> tuple[float, list[int]]:
    """(tickets per second, tickets each host served) for one pool of ``hosts``."""
    config = make_project(root, max_tickets=hosts)
    fakes = [FakeOllama() for _ in range(hosts)]
    for fake in fakes:
        fake.start()
        fake.default_reply = EDIT
        fake.slow(model_s / 3)
    try:
        configure(config, fakes)
        add_tickets(root / "backlog" / "todo", hosts * per_host)
        watching, total, code, output = run_once(config)
        took = total - watching
        served = [len(f.requests_to("/api/chat")) for f in fakes]
    finally:
        for fake in fakes:
            fake.stop()
    if code != 0:
        sys.exit(f"the daemon failed ({code}):\n{output[-3000:]}")
    db = sqlite3.connect(root / "state" / "history.sqlite3")
    outcomes = [row[0] for row in db.execute("SELECT outcome FROM runs")]
    db.close()
    if outcomes != ["done"] * (hosts * per_host):
        sys.exit(f"not every ticket was done: {outcomes}")
    return len(outcomes) / took, served


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", default="1,2,4,8", help="pool sizes, comma-separated")
    parser.add_argument("--per-host", type=int, default=3, help="tickets per host")
    parser.add_argument("--model-s", type=float, default=10.0, help="simulated model time")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folders")
    args = parser.parse_args()
    sizes = [int(n) for n in args.hosts.split(",")]
    print(f"{args.per_host} tickets per host, {args.model_s:g} s of model time per ticket")
    print(f"{'hosts':>5}  {'tickets':>7}  {'tickets/min':>11}  {'scaling':>7}  served per host")
    one: float | None = None
    result: dict[int, tuple[float, list[int]]] = {}
    for n in sizes:
        t = time.monotonic()

        def bench(root: Path, n: int = n) -> None:
            result[n] = measure(root, n, args.per_host, args.model_s)

        run_in_tempdir(f"ticketd-pool-{n}-", args, bench)
        rate, served = result[n]
        one = one if one is not None else (rate if n == 1 else None)
        scaling = f"{rate / (n * one):.1%}" if one else "-"
        print(
            f"{n:>5}  {n * args.per_host:>7}  {rate * 60:>11.2f}  {scaling:>7}  {served}"
            f"  ({time.monotonic() - t:.0f} s)"
        )


if __name__ == "__main__":
    main()
