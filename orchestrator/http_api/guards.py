"""What a request must pass before anything reads it: the bearer token on /v1, and a bounded body size.

Both are plain ASGI middleware, so they run before the body is read or parsed: a request without the
token learns nothing from how its body would have been judged, and a huge body is refused before it
is held in memory.
"""

import hmac

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from .errors import ApiError


class BearerToken:
    """Refuses /v1 requests without `Authorization: Bearer <token>` (401), as the gRPC API refuses calls."""

    def __init__(self, app, token: str):
        self.app = app
        self._expected = f"Bearer {token}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            refusal = self._refusal(Headers(scope=scope).get("authorization"))
            if refusal is not None:
                return await JSONResponse(refusal.body(), refusal.status)(scope, receive, send)
        await self.app(scope, receive, send)

    def _refusal(self, given: str | None) -> ApiError | None:
        if given is None:
            return ApiError(401, "this server requires 'Authorization: Bearer <token>' (the openai client's "
                                 "api_key)", code="missing_api_key")
        # Constant time, so the reply's timing does not tell how much of a guess was right.
        if not hmac.compare_digest(given.encode(), self._expected):
            return ApiError(401, "the bearer token is not valid for this server", code="invalid_api_key")
        return None


class BodyLimit:
    """Refuses request bodies over `limit` bytes (413): by their Content-Length at once, or as they arrive."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            error = self._too_large(int(declared))
            return await JSONResponse(error.body(), error.status)(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:  # raised where the route reads the body; the app's handlers answer it
                raise HTTPException(413, self._too_large(received).message)
            return message

        await self.app(scope, counted, send)

    def _too_large(self, size: int) -> ApiError:
        return ApiError(413, f"the request body has {size} bytes or more; this server takes at most {self.limit}")
