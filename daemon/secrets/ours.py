"""ticketd's own rules, beside the ported gitleaks ones.

``url-credentials``: ``scheme://user:password@host`` with a real password (not a placeholder,
not a template, not the user name again). ``generic-secret``: a secret-sounding name
(``password``, ``api_key``, ``client_secret``, ``token``…) assigned a literal whose entropy
passes :data:`GENERIC_ENTROPY`; unlike gitleaks' generic rule it takes any printable value,
so ``p4$$w0rd{…}``-style passwords are caught too. In source files the value must be quoted,
so that expressions (``token = self.read()``) never count.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

from daemon.secrets.gitleaks_rules import GENERIC_API_KEY, GENERIC_NAME_ALLOW
from daemon.secrets.regex import shannon_entropy
from daemon.secrets.rules import Rule, rule
from daemon.secrets.stopwords import GENERIC_STOPWORDS

GENERIC_ENTROPY = 3.0

URL_CREDENTIALS = rule(
    "url-credentials",
    r"""\b[a-zA-Z][a-zA-Z0-9+.-]{1,30}://([^\s:@/?#'"<>`\\]{0,128}):([^\s:@/?#'"<>`\\]{1,256})@([\w.-]+)""",
    "://",
    group=2,
)

# A name is secret-sounding when it holds one of these: ``DB_PASSWORD``, ``stripeApiKey``;
# but not "pass" ending a longer word (``proxy_bypass``, ``compass``).
_SENSITIVE_WORDS = (
    r"passw(?:or)?d|passphrase|(?<!by)(?<!com)(?<!sur)(?<!tres)pass(?![a-z])|pwd|secret|token"
    r"|contrase(?:ñ|n)a|api[_.-]?key"
    r"|(?:access|private|priv|auth|service|account|client|db|database|session|signing|encryption"
    r"|master)[_.-]?key|credentials?|creds"
)
SECRET_NAME = re.compile(f"(?i){_SENSITIVE_WORDS}")
# A secret-sounding name, standing alone or as a quoted key ("password": …) but never a word
# inside a string, then maybe a type (``password: str =``, ``var password string =``).
_KEY = (
    r"""(?<![\w.\-"'])(["'])?(?=[\w.-]*?(?i:"""
    + _SENSITIVE_WORDS
    + r"""))[\w.-]+(?(1)\1)(?:\][ \t]*(?==))?[ \t]*"""
    + r"""(?(1)|(?:(?::[ \t]*|[ \t]+)[A-Za-z_][\w.\[\]<>|]*[ \t]*(?==))?)"""
)
_QUOTED = (
    r"""(?:=|:=|::=|:|=>|->|\?=|\|\|=|==|!=|,|\()[ \t]*@?(["'`])((?:(?!\2)[^\s\\]){8,200})\2"""
)
_BARE = r"""(?:=|:=|::=|:|=>|\?=)[ \t]*([^\s"'`,;=:<][^\s"'`,;=<]{7,199}={0,2})(?=[\s,;]|$)"""
_XML = (
    r"""<(?=[\w.:-]*?(?i:"""
    + _SENSITIVE_WORDS
    + r"""))([\w.:-]+)(?:[ \t][^>]*)?>([^<\s]{8,200})</\1>"""
)

GENERIC_SECRET_QUOTED = rule(
    "generic-secret",
    _KEY + _QUOTED,
    "pass,pwd,secret,token,key,cred,contrase",
    group=3,
    generic=True,
)
GENERIC_SECRET_XML = rule(
    "generic-secret", _XML, "pass,pwd,secret,token,key,cred,contrase", group=2, generic=True
)
GENERIC_SECRET_BARE = rule(
    "generic-secret",
    _KEY + _BARE,
    "pass,pwd,secret,token,key,cred,contrase",
    group=2,
    generic=True,
)

# Names that hold something about a secret rather than the secret itself.
_META_SUFFIXES = (
    "name names id ids type types path paths file files dir field fields length len size header"
    " headers url uri urls endpoint version prefix suffix format label hint regex pattern policy"
    " expiry expires expiration ttl count min max enabled required env var variable param kind"
    " mode provider location source ref hash hashed digest arn store manager class column input"
    " placeholder prompt text message msg error timeout rotation query keyname"
).split()
_NOT_A_SECRET_NAME = re.compile(
    r"(?:^|[_.-])(?i:" + "|".join(_META_SUFFIXES) + r")$"
    r"|(?<=[a-z0-9])(?:" + "|".join(w.capitalize() for w in _META_SUFFIXES) + r")$"
    r"|(?i:public|^pub[_.-]|csrf|xsrf|reset|forgot)"
)
_LETTERS_ONLY = re.compile(r"^[a-zA-Z_.-]+$")
_SYMBOL = re.compile(r"[^A-Za-z0-9_.=+/-]")
_PATH_LIKE = re.compile(r"^(?:~|\.{1,2})?/?(?:[a-z0-9_.-]+/)+[a-z0-9_.-]*$|://")
# Source files: an unquoted right-hand side is an expression, not a literal.
_CODE_SUFFIXES = frozenset(
    ".py .pyi .js .jsx .mjs .cjs .ts .tsx .java .kt .kts .scala .groovy .go .rb .php .cs .fs"
    " .vb .c .h .cc .cpp .hpp .cxx .m .mm .swift .rs .dart .lua .pl .pm .r .jl .ex .exs .erl"
    " .clj .hs .ml .sql .vue .svelte".split()
)


def is_source_file(path: str) -> bool:
    return PurePosixPath(path).suffix.lower() in _CODE_SUFFIXES


GENERIC_SECRET = (GENERIC_SECRET_QUOTED, GENERIC_SECRET_XML, GENERIC_SECRET_BARE)


def applies(rule_: Rule, path: str) -> bool:
    """Whether ``rule_`` runs on the file ``path``: all do, but an unquoted value
    (``GENERIC_SECRET_BARE``) in a source file."""
    return rule_ is not GENERIC_SECRET_BARE or not is_source_file(path)


def accept_generic_secret(name: str, value: str) -> bool:
    """Whether a ``generic-secret`` candidate ``name = value`` looks like a real credential.

    A value with symbols (``p4$$w0rd!``) is beyond what gitleaks' generic rule reads, and
    passes at :data:`GENERIC_ENTROPY`; a value of word characters is held to that rule's own
    bar (entropy above 3.5, no stopword), so the two generic rules agree on it."""
    entropy = shannon_entropy(value)
    if (
        not SECRET_NAME.search(name)
        or _NOT_A_SECRET_NAME.search(name)
        or GENERIC_NAME_ALLOW.search(name)
        or _LETTERS_ONLY.match(value)
        or not re.search(r"[A-Za-z]", value)
        or _PATH_LIKE.search(value)
        or entropy < GENERIC_ENTROPY
    ):
        return False
    if _SYMBOL.search(value):
        return True
    low = value.lower()
    return entropy > GENERIC_API_KEY.entropy and not any(w in low for w in GENERIC_STOPWORDS)


_WEAK_PASSWORDS = frozenset(
    "pass password passwd pwd secret user username test token changeme login admin".split()
)


# Host names reserved for documentation and tests (RFC 2606, RFC 6761).
_EXAMPLE_HOST = re.compile(r"(?i)(?:^|\.)(?:example(?:\.(?:com|net|org))?|test|invalid)$")


def accept_url_password(user: str, password: str, host: str) -> bool:
    """Whether a URL's password is real: not ``pass``, not the user again, not a port
    number, not a reference, and not on a documentation host such as ``example.com``."""
    return not (
        password.lower() in _WEAK_PASSWORDS
        or password == user
        or (password.isdigit() and len(password) <= 5)
        or password.startswith("$")
        or _EXAMPLE_HOST.search(host.rstrip("."))
    )
