"""Authentication before the body: a request that carries a body is authenticated before a byte of it is read.

Every ``POST``/``PUT``/``PATCH`` under ``/api/v1/`` needs a key (the enrollment token only for
``POST /clients/register``). This middleware resolves the bearer key (through the process's
``PrincipalCache``, so the route's own check that follows costs a dict lookup) and answers 401
``UNAUTHORIZED`` at once when it is missing or unknown, so an unauthenticated body is never read
or parsed. What the key may do (403) is still each route's decision.
"""

from __future__ import annotations

import hmac

from sqlalchemy.exc import SQLAlchemyError
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from api.deps import bearer_key, resolve_principal
from api.errors import error_response
from fedloom_core.errors import Unauthorized

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
API_PREFIX = "/api/v1/"
REGISTER_PATH = "/api/v1/clients/register"


class AuthFirst:
    """ASGI middleware: 401 before the body for unauthenticated requests that carry one."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Resolve the key of a body-carrying API request, or answer 401 without reading the body."""
        if (
            scope["type"] != "http"
            or scope.get("method") not in BODY_METHODS
            or not scope.get("path", "").startswith(API_PREFIX)
        ):
            await self.app(scope, receive, send)
            return
        state = scope["app"].state
        authorization = Headers(scope=scope).get("authorization")
        if not self._enrollment(scope, state, authorization):
            try:
                await resolve_principal(state, authorization)
            except Unauthorized as exc:
                await error_response(401, exc.code, exc.message, exc.details)(scope, receive, send)
                return
            except SQLAlchemyError:
                pass  # the route answers 503 itself when the database is down
        await self.app(scope, receive, send)

    @staticmethod
    def _enrollment(scope: Scope, state, authorization: str | None) -> bool:  # type: ignore[no-untyped-def]
        """Whether this is a registration presenting the enrollment token (the route checks it again)."""
        token = getattr(getattr(state, "settings", None), "enrollment_token", None)
        key = bearer_key(authorization)
        if not (token and key) or scope.get("path", "").rstrip("/") != REGISTER_PATH:
            return False
        return hmac.compare_digest(key.encode(), token.encode())
