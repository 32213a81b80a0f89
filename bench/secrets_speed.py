"""Speed of the secret scanner on a large real tree, and what it finds there.

Scans folders with ``daemon.secrets.scan_paths``, the call behind ``ticketd secrets scan``.
First, untimed, it reads the same files the scan reads (``daemon.secrets.scan.texts``: no
``.git/``, links, binaries or files over 1 MiB) to count files and lines; then it loads the
rules with a one-line scan, so that start-up is not counted; then it times one
``scan_paths`` call over all the paths: wall seconds (``perf_counter``) and CPU seconds of
this process (``process_time``). Lines per second are lines over wall seconds.

Prints files, lines, wall and CPU seconds, lines/s, and the findings by rule. ``--save FILE``
writes the findings (file, line, rule, fingerprint; never a secret) as JSON; ``--compare
FILE`` prints the findings present in only one of that file and this scan, so that two
versions of the scanner can be shown to find the same. Asserts nothing.

    python bench/secrets_speed.py [PATH ...] [--save F] [--compare F]

The default path is the running interpreter's standard library, without its
``site-packages`` (third-party code, not the standard library).
"""

from __future__ import annotations

import argparse
import json
import sysconfig
import time
from collections import Counter
from pathlib import Path

from daemon.secrets import Finding, scan_paths, scan_text
from daemon.secrets.scan import texts

Key = tuple[str, int, str, str]


def stdlib() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.iterdir() if p.name != "site-packages")


def keys(findings: list[Finding]) -> list[Key]:
    return sorted((f.file, f.line, f.rule, f.fingerprint) for f in findings)


def by_rule(found: list[Key]) -> str:
    counts = Counter(rule for _, _, rule, _ in found)
    return ", ".join(f"{rule} {n}" for rule, n in counts.most_common()) or "-"


def compare(before: list[Key], after: list[Key]) -> None:
    old, new = set(before), set(after)
    for name, only in (("only before", old - new), ("only after", new - old)):
        print(f"{name}: {len(only)} ({by_rule(sorted(only))})")
        for file, line, rule, _ in sorted(only):
            print(f"  {file}:{line}: {rule}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="*", type=Path, help="files or folders (default: stdlib)")
    parser.add_argument("--save", type=Path, help="write the findings to this JSON file")
    parser.add_argument("--compare", type=Path, help="compare with findings saved by --save")
    args = parser.parse_args()
    paths = args.paths or stdlib()
    shown = " ".join(map(str, args.paths)) or f"{paths[0].parent} (without site-packages)"

    files = lines = 0
    for _, text in texts(paths):
        files += 1
        lines += text.count("\n") + (text[-1:] not in ("", "\n"))
    scan_text("warm up", "warm.py")

    wall, cpu = time.perf_counter(), time.process_time()
    findings = scan_paths(paths)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu

    found = keys(findings)
    print(f"scanned: {shown}")
    print(f"files {files}, lines {lines}")
    print(f"wall {wall:.2f} s, CPU {cpu:.2f} s, {lines / wall:,.0f} lines/s")
    print(f"findings {len(found)}: {by_rule(found)}")
    if args.save:
        args.save.write_text(json.dumps(found, indent=1) + "\n", encoding="utf-8")
    if args.compare:
        compare([tuple(k) for k in json.loads(args.compare.read_text(encoding="utf-8"))], found)


if __name__ == "__main__":
    main()
