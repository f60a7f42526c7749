"""Per-address budget of failed authentications, checked before any key lookup.

The rate-limit middleware (``api/ratelimit.py``) counts every request answered 401 (no key, a
malformed header, an unknown or revoked key; a WebSocket closed 4401) toward the limit
``auth_failures`` of the client's address, in the same counter store as the other limits. Once an
address is past it, this process refuses that address's requests 429 until the window ends, without
reading the database, unless they carry a key it trusts: the admin key, the enrollment token, or a
key it resolved within ``api.deps.VERIFIED_KEEP_S`` (so valid clients behind one NAT keep working).
Another replica learns of the block at its own next failure from that address.

Failures are logged with the address, the path and the count, never the key; at most one line per
address per ``LOG_EVERY_S`` and ``LOG_MAX_PER_S`` lines a second in all.
"""

from __future__ import annotations

import hmac
import logging
import math
import time

from starlette.types import Scope

from api.auth import hash_key
from api.deps import principal_cache

log = logging.getLogger("fedloom.api.auth")

LOG_EVERY_S = 10.0
LOG_MAX_PER_S = 5
TRACKED_MAX = 100_000


def address_of(scope: Scope) -> str:
    """The client address of a request (the proxy's unless uvicorn is told to trust forwarded headers)."""
    client = scope.get("client")
    return client[0] if client else "unknown"


class AuthFailureGuard:
    """Which addresses are past their auth-failure budget, and the throttled log of their failures."""

    def __init__(self, limit: int, window_s: float) -> None:
        self.limit = limit
        self.window_s = window_s
        self._blocked: dict[str, float] = {}  # address -> Unix time its block ends
        self._logged: dict[str, float] = {}  # address -> monotonic time of its last log line
        self._second = (0, 0)  # (whole second, lines logged in it)

    def trusted(self, scope: Scope, key: str) -> bool:
        """Whether ``key`` is one this process knows to be valid (checked without I/O)."""
        state = scope["app"].state
        digest = hash_key(key)
        admin = getattr(state, "admin_key_hash", None)
        if admin and hmac.compare_digest(digest, admin):
            return True
        settings = getattr(state, "settings", None)
        token = settings.enrollment_token if settings is not None else None
        if token and hmac.compare_digest(key.encode(), token.encode()):
            return True
        return getattr(state, "engine", None) is not None and principal_cache(state).verified(digest)

    def retry_after(self, address: str, now: float | None = None) -> int:
        """Seconds until ``address``'s block ends (0 when it is not blocked)."""
        until = self._blocked.get(address)
        if until is None:
            return 0
        now = time.time() if now is None else now
        if now >= until:
            del self._blocked[address]
            return 0
        return max(1, math.ceil(until - now))

    def block(self, address: str, until: float, count: int) -> None:
        """Refuse ``address``'s untrusted requests until ``until`` (Unix seconds); log when it starts."""
        if address not in self._blocked:
            log.warning(
                "authentication failures: %s is over its budget (%d in the current %g s window, limit %d); "
                "its requests without a verified key are refused for %d s",
                address,
                count,
                self.window_s,
                self.limit,
                max(1, math.ceil(until - time.time())),
            )
        if address not in self._blocked and len(self._blocked) >= TRACKED_MAX:
            now = time.time()
            for stale in [a for a, end in self._blocked.items() if end <= now] or [next(iter(self._blocked))]:
                del self._blocked[stale]
        self._blocked[address] = until

    def details(self, retry_after: int) -> str:
        """The ``details`` of the 429 answer."""
        return (
            f"{self.limit} failed authentication(s) per {self.window_s:g} s from this address; "
            f"retry in {retry_after} s (requests with a valid key already used here are still served)"
        )

    def note(self, address: str, path: str, count: int | None, refused: bool) -> None:
        """Log a failure (``count`` in the window) or a refusal, throttled; the key is never logged."""
        now = time.monotonic()
        last = self._logged.get(address)
        if last is not None and now - last < LOG_EVERY_S:
            return
        second, lines = self._second
        if int(now) == second and lines >= LOG_MAX_PER_S:
            return
        self._second = (int(now), lines + 1 if int(now) == second else 1)
        if len(self._logged) >= TRACKED_MAX:
            self._logged.clear()
        self._logged[address] = now
        shown = path[:200]
        if refused:
            log.warning("authentication failures: address %s is over its budget; refused %r", address, shown)
        else:
            log.warning(
                "authentication failure from %s on %r: %s in the current %g s window (limit %d)",
                address,
                shown,
                count if count is not None else "?",
                self.window_s,
                self.limit,
            )
