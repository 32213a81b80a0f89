"""detect-secrets' plugins, run in-process.

The plugins' patterns run directly over the whole text rather than through
``detect_secrets.core.scan``, whose settings are process-global; the look-alike filters of
this package replace detect-secrets' own. Left out as too noisy for a gate: the two
high-entropy-string plugins (any random-looking literal, hashes included), the public IP
plugin, the basic auth plugin (``url-credentials`` filters its placeholders) and the private
key plugin (the ``private-key`` rule wants the key body, not a header mentioned in code).

The keyword plugin's patterns (per file type, as the plugin picks them) only propose
candidates: a secret-sounding name and its value, which must then pass the same checks as
``generic-secret`` (entropy, look-alikes, names that describe rather than hold a secret).
They run only on the lines that hold one of the words they look for (``key``, ``pass``…);
the other plugins' patterns run through ``prefilter`` (the same matches as ``finditer``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import cache
from itertools import accumulate

from detect_secrets.plugins.artifactory import ArtifactoryDetector
from detect_secrets.plugins.aws import AWSKeyDetector
from detect_secrets.plugins.azure_storage_key import AzureStorageKeyDetector
from detect_secrets.plugins.cloudant import CloudantDetector
from detect_secrets.plugins.discord import DiscordBotTokenDetector
from detect_secrets.plugins.github_token import GitHubTokenDetector
from detect_secrets.plugins.gitlab_token import GitLabTokenDetector
from detect_secrets.plugins.ibm_cloud_iam import IbmCloudIamDetector
from detect_secrets.plugins.ibm_cos_hmac import IbmCosHmacDetector
from detect_secrets.plugins.jwt import JwtTokenDetector
from detect_secrets.plugins.keyword import (
    PRECEDED_BY_EQUAL_COMPARISON_SIGNS_QUOTES_REQUIRED_REGEX,
    QUOTES_REQUIRED_DENYLIST_REGEX_TO_GROUP,
    REGEX_BY_FILETYPE,
    KeywordDetector,
)
from detect_secrets.plugins.mailchimp import MailchimpDetector
from detect_secrets.plugins.npm import NpmDetector
from detect_secrets.plugins.openai import OpenAIDetector
from detect_secrets.plugins.pypi_token import PypiTokenDetector
from detect_secrets.plugins.sendgrid import SendGridDetector
from detect_secrets.plugins.slack import SlackDetector
from detect_secrets.plugins.softlayer import SoftlayerDetector
from detect_secrets.plugins.square_oauth import SquareOAuthDetector
from detect_secrets.plugins.stripe import StripeDetector
from detect_secrets.plugins.telegram_token import TelegramBotTokenDetector
from detect_secrets.plugins.twilio import TwilioKeyDetector
from detect_secrets.util.filetype import determine_file_type

from daemon.secrets.prefilter import Text, finditer

HIGH_SIGNAL = (
    ArtifactoryDetector,
    AWSKeyDetector,
    AzureStorageKeyDetector,
    CloudantDetector,
    DiscordBotTokenDetector,
    GitHubTokenDetector,
    GitLabTokenDetector,
    IbmCloudIamDetector,
    IbmCosHmacDetector,
    JwtTokenDetector,
    MailchimpDetector,
    NpmDetector,
    OpenAIDetector,
    PypiTokenDetector,
    SendGridDetector,
    SlackDetector,
    SoftlayerDetector,
    SquareOAuthDetector,
    StripeDetector,
    TelegramBotTokenDetector,
    TwilioKeyDetector,
)

_DELIMITERS = frozenset(" \t\r\n\"'`=:,;")
# Plugins whose tokens are UUIDs (npm's legacy auth tokens): the UUID filter spares them.
UUID_TOKENS = frozenset({NpmDetector.__name__})


@cache
def patterns() -> tuple[tuple[str, re.Pattern[str]], ...]:
    """Each plugin's patterns, with ``^``/``$`` made to match at every line of a text."""
    return tuple(
        (cls.__name__, re.compile(p.pattern, p.flags | re.MULTILINE))
        for cls in HIGH_SIGNAL
        for p in cls().denylist
    )


def scan(scanned: Text) -> Iterator[tuple[str, int, int]]:
    """``(plugin name, start, end)`` of each value the high-signal plugins find in a text.

    The plugins' own ``analyze_string`` returns a capture group, which for some is only the
    token's prefix (``ghp``). Here the value is the largest group unless that group is such a
    prefix, then the whole match, trimmed of the delimiters some patterns include."""
    text = scanned.text
    for name, pattern in patterns():
        for m in finditer(pattern, scanned):
            start, end = m.span()
            groups = [g for g in range(1, (m.re.groups or 0) + 1) if m.group(g)]
            if groups:
                g = max(groups, key=lambda g: m.end(g) - m.start(g))
                if m.start(g) > start or 2 * (m.end(g) - m.start(g)) >= end - start:
                    start, end = m.span(g)
            while start < end and text[start] in _DELIMITERS:
                start += 1
            while end > start and text[end - 1] in _DELIMITERS:
                end -= 1
            if end > start:
                yield name, start, end


KEYWORD = KeywordDetector.__name__
# A line the keyword patterns can match holds one of these (lower-cased).
_HINT = re.compile("key|pass|pwd|secret|contrase")


def _name_char(c: str) -> bool:
    return c.isalnum() or c in "_.-"


def _name_around(line: str, at: int) -> str:
    """The identifier of ``line`` that contains position ``at``."""
    start = end = at
    while start > 0 and _name_char(line[start - 1]):
        start -= 1
    while end < len(line) and _name_char(line[end]):
        end += 1
    return line[start:end]


def _hinted_rows(lowered: str) -> Iterator[int]:
    """The numbers (from 0) of the lines of ``lowered`` that hold a hint, in order."""
    row, seen, last = 0, 0, -1
    for m in _HINT.finditer(lowered):
        row += lowered.count("\n", seen, m.start())
        seen = m.start()
        if row != last:
            yield row
            last = row


def keyword_candidates(scanned: Text, path: str) -> Iterator[tuple[int, int, str]]:
    """``(start, end, name)`` of each value detect-secrets' keyword patterns assign to a
    secret-sounding name in a text (the content of ``path``), one line at a time."""
    regexes = REGEX_BY_FILETYPE.get(
        determine_file_type(path), QUOTES_REQUIRED_DENYLIST_REGEX_TO_GROUP
    )
    lines = scanned.text.split("\n")
    before = list(accumulate(map(len, lines), initial=0))  # characters before each line, less "\n"s
    for row in _hinted_rows(scanned.lowered):
        line, offset = lines[row], before[row] + row
        for regex, group in regexes.items():
            for m in regex.finditer(line):
                if m.group(group):
                    reverse = regex is PRECEDED_BY_EQUAL_COMPARISON_SIGNS_QUOTES_REQUIRED_REGEX
                    name = _name_around(line, m.end() - 1 if reverse else m.start(1))
                    yield offset + m.start(group), offset + m.end(group), name
