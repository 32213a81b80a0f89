"""Secret scanning: the gate that keeps credentials out of commits, logs and pull requests.

Built on detect-secrets (its high-signal plugins, run in-process) and on a port of the rules
of gitleaks (https://github.com/gitleaks/gitleaks, MIT licence, Copyright (c) 2019 Zachary
Rice): vendor token formats, private key blocks, its generic API key rule and its
allowlists. ticketd adds credentials in URLs, a generic ``name = "<high-entropy value>"``
rule and filters for look-alikes (placeholders, templates, hashes, UUIDs, git SHAs, public
keys). Inline ``gitleaks:allow`` and ``pragma: allowlist secret`` comments are honoured, and
a baseline file lists the fingerprints of known findings to ignore. Given the daemon's own
secret values, the scan also reports them and their encodings (base64, hex) as
``ticketd-known-secret``, which neither comment nor baseline hides.

:func:`spans` and :func:`mask` serve redaction (``daemon.redact``): the same detector, but
allowlist comments are ignored (whoever writes a log line can write one too) and each secret
is replaced by ``***(<rule>)``.

A :class:`Finding` never holds a secret: its ``redacted`` field shows at most the first 4
characters and its ``fingerprint`` is a sha256 of file, rule and secret.

Modules: ``scan`` (the API below), ``rules`` and ``regex`` (the rule model and gitleaks'
regex dialect), ``gitleaks_rules`` and ``stopwords`` (the ported tables), ``ours`` (ticketd's
own rules), ``filters`` (look-alikes), ``ds`` (the detect-secrets plugins) and ``prefilter``
(each pattern tried only where the literals it needs stand; the same matches, faster).
"""

from __future__ import annotations

from daemon.secrets.scan import (
    KNOWN_RULE,
    Finding,
    load_baseline,
    mask,
    redact,
    scan_added,
    scan_paths,
    scan_text,
    spans,
    write_baseline,
)

__all__ = [
    "KNOWN_RULE",
    "Finding",
    "load_baseline",
    "mask",
    "redact",
    "scan_added",
    "scan_paths",
    "scan_text",
    "spans",
    "write_baseline",
]
