"""Keep secrets out of logs, ``.error.json`` files and messages.

Known secret values (the forge token) are replaced wherever they appear, and so are the
credentials of any ``scheme://user:password@host`` URL.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/\s:@]+(?::[^/\s@]*)?@", re.I)
MASK = "***"


class Redactor:
    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, MASK)
        return URL_CREDENTIALS.sub(lambda m: f"{m['scheme']}{MASK}@", text)
