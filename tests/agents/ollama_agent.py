"""A command agent that works the way aider does on Ollama, for the tests.

``ollama_agent.py --model ollama_chat/MODEL --message-file PROMPT`` sends the prompt to
``$OLLAMA_API_BASE/api/chat`` with that model and applies the answer to the current folder.
Like aider, it prints an error and exits 0 when Ollama cannot be reached or lacks the model,
having changed nothing. The answer's format: ``FILE <path>`` lines, each followed by the
file's new text up to a line ``END``; ``EXIT <n>`` makes it print what follows and exit n;
``SPAM <n>`` prints n lines of noise first.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path


def ask(host: str, model: str, prompt: str) -> str | None:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": False}
    request = urllib.request.Request(
        host.rstrip("/") + "/api/chat",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=20) as answer:
            return str(json.load(answer)["message"]["content"])
    except urllib.error.HTTPError as e:
        print(f"litellm.NotFoundError: OllamaException - {e.read().decode(errors='replace')}")
    except (urllib.error.URLError, OSError) as e:
        print(f"litellm.APIConnectionError: OllamaException - {e}")
    return None


def main() -> int:
    args = sys.argv[1:]
    model = args[args.index("--model") + 1].removeprefix("ollama_chat/")
    prompt = Path(args[args.index("--message-file") + 1]).read_text()
    answer = ask(os.environ["OLLAMA_API_BASE"], model, prompt)
    if answer is None:
        return 0  # aider too ends with status 0 here
    lines = answer.splitlines()
    if lines and lines[0].startswith("SPAM "):
        for i in range(int(lines.pop(0).split()[1])):
            print(f"\x1b[2Kthinking {i} " + "." * 200)
    if lines and lines[0].startswith("EXIT "):
        print("\n".join(lines[1:]))
        return int(lines[0].split()[1])
    path: Path | None = None
    text: list[str] = []
    for line in lines:
        if line.startswith("FILE "):
            path, text = Path(line[5:].strip()), []
        elif line == "END" and path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(t + "\n" for t in text))
            print(f"Applied edit to {path}")
            path = None
        elif path is not None:
            text.append(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
