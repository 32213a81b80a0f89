"""Secret scanning: the gate that keeps credentials out of commits, logs and pull requests.

Built on detect-secrets (its high-signal plugins, run in-process) and on a port of the rules
of gitleaks (https://github.com/gitleaks/gitleaks, MIT licence, Copyright (c) 2019 Zachary
Rice): vendor token formats, private key blocks, its generic API key rule and its
allowlists. ticketd adds credentials in URLs, a generic ``name = "<high-entropy value>"``
rule and filters for look-alikes (placeholders, templates, hashes, UUIDs, git SHAs, public
keys). Inline ``gitleaks:allow`` and ``pragma: allowlist secret`` comments are honoured, and
a baseline file lists the fingerprints of known findings to ignore.

A :class:`Finding` never holds a secret: its ``redacted`` field shows at most the first 4
characters and its ``fingerprint`` is a sha256 of file, rule and secret.

Modules: ``scan`` (the API below), ``rules`` and ``regex`` (the rule model and gitleaks'
regex dialect), ``gitleaks_rules`` and ``stopwords`` (the ported tables), ``ours`` (ticketd's
own rules), ``filters`` (look-alikes) and ``ds`` (the detect-secrets plugins).
"""

from __future__ import annotations

from daemon.secrets.scan import (
    Finding,
    load_baseline,
    redact,
    scan_added,
    scan_paths,
    scan_text,
    write_baseline,
)

__all__ = [
    "Finding",
    "load_baseline",
    "redact",
    "scan_added",
    "scan_paths",
    "scan_text",
    "write_baseline",
]
