"""The logging filter that keeps API keys out of every log."""

from __future__ import annotations

import logging

from api.auth import new_key
from fedloom_core.redact import RedactKeys, redact


def test_keys_in_any_form_are_masked() -> None:
    admin, client = new_key("fladmin"), new_key("fl")
    text = (
        f'"WebSocket /api/v1/ws/events?since=3&api_key={admin}" accepted; Authorization: Bearer {client}; key={admin}'
    )
    cleaned = redact(text)
    assert admin not in cleaned and client not in cleaned
    assert "api_key=<redacted>" in cleaned and "Bearer <redacted>" in cleaned
    assert "since=3" in cleaned  # the rest of the line is kept


def test_the_filter_rewrites_records_and_tracebacks(caplog) -> None:  # type: ignore[no-untyped-def]
    key = new_key("fladmin")
    logger = logging.getLogger("fedloom.test.redact")
    logger.addFilter(RedactKeys())
    with caplog.at_level(logging.INFO, logger="fedloom.test.redact"):
        logger.info("connecting with %s", key)
        try:
            raise ValueError(f"bad key {key}")
        except ValueError:
            logger.exception("failed")
    assert key not in caplog.text
    assert caplog.text.count("<redacted>") >= 2
