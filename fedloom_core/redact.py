"""Keep API keys out of logs: a logging filter that masks anything shaped like one."""

from __future__ import annotations

import logging
import re

# fedloom's keys are "<prefix>_<43 url-safe characters>" (admin "fladmin_", clients "fl_"), and
# browsers may pass one as ``?api_key=`` on the WebSocket URL.
_KEY = re.compile(r"\b(fl[a-z]*_)[A-Za-z0-9_-]{20,}")
_QUERY = re.compile(r"(api_key=)[^&\s\"']+")
_BEARER = re.compile(r"(Bearer\s+)[^\s\"',]+", re.I)


def redact(text: str) -> str:
    """``text`` with every API key replaced by ``<redacted>``."""
    text = _QUERY.sub(r"\1<redacted>", text)
    text = _BEARER.sub(r"\1<redacted>", text)
    return _KEY.sub(r"\1<redacted>", text)


class RedactKeys(logging.Filter):
    """Rewrites a record's message (and arguments) before any handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def install(*logger_names: str) -> None:
    """Attach the filter to the root handlers and to the named loggers (e.g. uvicorn's own)."""
    flt = RedactKeys()
    for handler in logging.getLogger().handlers:
        handler.addFilter(flt)
    for name in logger_names:
        logging.getLogger(name).addFilter(flt)
