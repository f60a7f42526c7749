"""Retrying calls to the server: transient failures wait with exponential backoff and full jitter."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import httpx

from fedloom._client import FLAPIError

log = logging.getLogger("fedloom.client")
T = TypeVar("T")
# The longest a 429's Retry-After is honoured for.
MAX_RETRY_AFTER_S = 120.0


@dataclass(frozen=True)
class Backoff:
    """How a failing call is retried: waits drawn from [0, min(cap_s, base_s * 2**attempt)], for at most
    ``max_elapsed_s`` of consecutive failures (a server restart takes seconds, an outage longer)."""

    base_s: float = 0.5
    cap_s: float = 20.0
    max_elapsed_s: float = 300.0

    def delay(self, attempt: int, exc: BaseException) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based) after ``exc``."""
        if isinstance(exc, FLAPIError) and exc.retry_after is not None:
            return min(max(exc.retry_after, 0.0), MAX_RETRY_AFTER_S)
        return random.uniform(0.0, min(self.cap_s, self.base_s * 2.0**attempt))


def transient(exc: BaseException) -> bool:
    """Whether retrying the same call may succeed: no connection, a timeout, a 5xx, a 429, or a 408 (the
    server dropped an upload whose body stalled)."""
    if isinstance(exc, FLAPIError):
        return exc.status >= 500 or exc.status in (408, 429)
    return isinstance(exc, (httpx.TransportError, ConnectionError))


def with_retries(call: Callable[[], T], backoff: Backoff, what: str) -> T:
    """``call()``, retried while it fails transiently and ``backoff``'s time budget lasts; else its error."""
    started = time.monotonic()
    attempt = 0
    while True:
        try:
            return call()
        except Exception as exc:
            if not transient(exc):
                raise
            delay = backoff.delay(attempt, exc)
            if time.monotonic() - started + delay > backoff.max_elapsed_s:
                raise
            log.warning("%s failed (%s); retrying in %.1fs", what, exc, delay)
            time.sleep(delay)
            attempt += 1
