"""Credentials never printed: URIs with a password (``http://user:pw@host``,
``postgresql://u:pw@db/mlflow``) or a secret in their query (``?token=...``) are shown with those
parts as ``***``. Every message the project prints or logs goes through :func:`redact`: the
error type (segflow.errors), the log handlers of the CLI and of pipeline tasks
(:class:`RedactingFilter`), and the URIs the commands print.

A leaf module: it imports nothing of segflow's.
"""

from __future__ import annotations

import logging
import re

# scheme://USERINFO@ (greedy up to the last '@' before the path: a password may hold an '@').
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/\s?#]+)@")
# ?name=value or &name=value where the name speaks of a secret (password, token, key, signature ...).
_SECRET_QUERY = re.compile(
    r"(?i)(?P<name>[?&;][\w.\-]*(?:pass|pwd|secret|token|key|signature|credential|auth|sig)[\w.\-]*=)[^&\s#'\"]+"
)


def redact(text: str) -> str:
    """``text`` with every URI's userinfo and secret query values replaced by ``***``."""
    text = str(text)
    if "://" not in text and "=" not in text:
        return text
    text = _USERINFO.sub(lambda m: f"{m['scheme']}***@", text)
    return _SECRET_QUERY.sub(lambda m: f"{m['name']}***", text)


class RedactingFilter(logging.Filter):
    """A handler filter: the record's formatted message, redacted (arguments merged in first, so
    a URI passed as ``%s`` is caught too)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


# Libraries that log through handlers of their own (MLflow's logger does not propagate to the root).
OWN_HANDLERS = ("mlflow",)


def redact_logging() -> None:
    """Put :class:`RedactingFilter` on every handler of the root logger, and of the libraries'
    loggers that keep their own handlers (once each)."""
    for name in ("", *OWN_HANDLERS):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(RedactingFilter())
