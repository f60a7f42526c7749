"""Request-body caps, enforced as the body arrives and before anything parses it.

A declared ``Content-Length`` over the cap is refused before a byte is read. Model uploads have the
upload limit plus room for the form's other parts, and their routes count what they spool; every
other body is JSON, capped at ``max_json_kb`` as it streams in. Both answer 413 in the spec's error format.
"""

from __future__ import annotations

import re

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response

# Multipart framing and the metrics field beside an upload's model file.
FORM_OVERHEAD = 1 << 20
# Routes whose body is a model file.
UPLOAD_PATHS = re.compile(
    r"^/api/v1/(model/(update|validate)/[^/]+|model/update/[^/]+/sessions/[^/]+"
    r"|experiments/[^/]+/initial_model(/sessions/[^/]+)?)/?$"
)


def _too_large(limit: int) -> str:
    return f"the request body exceeds this route's limit of {limit} bytes"


class BodyLimit:
    """ASGI middleware: 413 for a body over its route's cap."""

    def __init__(self, app: ASGIApp, *, json_limit: int, upload_limit: int) -> None:
        self.app = app
        self.json_limit = json_limit
        self.upload_limit = upload_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        upload = UPLOAD_PATHS.match(scope["path"]) is not None
        limit = self.upload_limit + FORM_OVERHEAD if upload else self.json_limit
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and not declared.isdigit():
            await error_response(400, "INVALID_REQUEST", "Invalid request", "malformed Content-Length")(
                scope, receive, send
            )
            return
        if declared is not None and int(declared) > limit:
            response = error_response(413, "INVALID_REQUEST", "Request body too large", _too_large(limit))
            await response(scope, receive, send)
            return
        if upload:
            await self.app(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # FastAPI passes an HTTPException raised while reading the body through unchanged.
                    raise HTTPException(413, _too_large(limit))
            return message

        await self.app(scope, counted, send)
