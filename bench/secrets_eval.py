"""Secret scanner quality and speed on the labelled dev corpus, beside detect-secrets alone.

Each corpus line (``{"id", "rule", "text", "label": "secret"|"clean", "source", "file"}``) is
scanned as the content of a file named by its ``file`` field; a line is predicted "secret"
when the scanner finds anything in it. Two scanners run on the same lines:

- ``ticketd``: ``daemon.secrets.scan_text(text, file)``;
- ``detect-secrets``: detect-secrets alone with its default plugins and filters
  (``default_settings()``), ``scan_file`` on a temporary file of that name.

Prints precision, recall, F1 and lines per second for each, then the ids (never the text) of
the lines each one gets wrong.

    python bench/secrets_eval.py [CORPUS]   # default: ../shared/corpus/secrets-dev.jsonl

(with ticketd installed in the environment, as ``pip install -e '.[test]'`` does).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from detect_secrets.core.scan import scan_file
from detect_secrets.settings import default_settings

from daemon.secrets import scan_text

DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "secrets-dev.jsonl"


def load(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def ticketd(row: dict[str, str]) -> bool:
    return bool(scan_text(row["text"], row["file"]))


def detect_secrets_alone(folder: Path) -> Callable[[dict[str, str]], bool]:
    def predict(row: dict[str, str]) -> bool:
        file = folder / Path(row["file"]).name
        file.write_text(row["text"] + "\n", encoding="utf-8")
        return any(True for _ in scan_file(str(file)))

    return predict


def evaluate(
    name: str, predict: Callable[[dict[str, str]], bool], rows: list[dict[str, str]]
) -> None:
    start = time.perf_counter()
    predicted = [predict(row) for row in rows]
    elapsed = time.perf_counter() - start
    pairs = list(zip(predicted, rows, strict=True))
    wrong_fp = [r["id"] for p, r in pairs if p and r["label"] != "secret"]
    wrong_fn = [r["id"] for p, r in pairs if not p and r["label"] == "secret"]
    tp = sum(p and r["label"] == "secret" for p, r in pairs)
    fp, fn = len(wrong_fp), len(wrong_fn)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    print(
        f"{name:15} precision {precision:.3f}  recall {recall:.3f}  F1 {f1:.3f}  "
        f"{len(rows) / elapsed:8.0f} lines/s  (tp {tp}, fp {fp}, fn {fn})"
    )
    print(f"{'':15} false positives: {' '.join(wrong_fp) or '-'}")
    print(f"{'':15} false negatives: {' '.join(wrong_fn) or '-'}")


def main() -> None:
    corpus = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_CORPUS
    if not corpus.is_file():
        sys.exit(f"no corpus at {corpus}")
    rows = load(corpus)
    labels = sum(r["label"] == "secret" for r in rows)
    print(f"corpus {corpus.name}: {len(rows)} lines ({labels} secret, {len(rows) - labels} clean)")
    evaluate("ticketd", ticketd, rows)
    with tempfile.TemporaryDirectory() as tmp, default_settings():
        evaluate("detect-secrets", detect_secrets_alone(Path(tmp)), rows)


if __name__ == "__main__":
    main()
