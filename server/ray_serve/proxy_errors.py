"""ASGI middleware for Ray Serve's HTTP proxy: the answers the proxy writes itself get the server's
error envelope.

Ray's proxy answers some requests without a replica's word, in plain text: 429 when its queue is
full (backpressure), 503 when no replica can take the request, 500 when the replica handling it
died, 404 while no application is deployed. The server's own answers are JSON, a stream, the page
or /metrics text, and its errors always JSON. Ray loads this middleware into every proxy when the
proxy's environment has RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH set to `CALLBACK`; it rewrites
those answers as the envelope (Retry-After kept; the 404 becomes a 503), and ends an event stream
whose replica stopped midway with an `error` event instead of a cut-off body.
"""

from __future__ import annotations

import json

from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import ApiError

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "server.ray_serve.proxy_errors:proxy_middlewares"

# status the proxy answered -> (status the client gets, envelope code, what the client should know)
PROXY_ERRORS = {
    # The application serves every path, so a 404 of the proxy's own means none is deployed here
    # now: it is starting, or shutting down (its route goes first, then its replicas drain).
    404: (503, "unavailable", "no application serves this address now (starting or shutting down); retry"),
    429: (429, "queue_full", "every replica is busy and the proxy's queue is full; retry after Retry-After seconds"),
    500: (500, "replica_failed", "the replica handling this request failed before it answered; retry"),
    503: (503, "unavailable", "no replica can take this request now; retry"),
}
STREAM_CUT = ApiError(
    500, "the replica serving this stream failed; the answer is incomplete, retry", code="replica_failed"
)


def proxy_middlewares() -> list[Middleware]:
    return [Middleware(ProxyErrors)]


def proxy_error(status: int, text: str) -> ApiError:
    said = text.strip()
    if status not in PROXY_ERRORS:
        return ApiError(status, said or f"the proxy answered {status}", code="proxy_error")
    answered, code, meaning = PROXY_ERRORS[status]
    return ApiError(answered, f"{meaning} (Ray Serve: {said})" if said else meaning, code=code)


class ProxyErrors:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        response = _Response(send)
        try:
            await self.app(scope, receive, response.send)
        except Exception:
            await response.finish()
            raise
        await response.finish()


class _Response:
    """Passes the server's answers through; holds a plain-text error until its body is read."""

    def __init__(self, send: Send):
        self.downstream = send
        self.started = False
        self.complete = False
        self.stream = False
        self.held: Message | None = None
        self.held_body: list[bytes] = []

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            content_type = Headers(raw=message["headers"]).get("content-type", "")
            if message["status"] >= 400 and not content_type.startswith("application/json"):
                self.held = message
                return
            self.started = True
            self.stream = content_type.startswith("text/event-stream")
        elif message["type"] == "http.response.body":
            if self.held is not None:
                self.held_body.append(message.get("body", b""))
                if not message.get("more_body", False):
                    await self._rewrite()
                return
            self.complete = not message.get("more_body", False)
        await self.downstream(message)

    async def _rewrite(self) -> None:
        held = self.held
        error = proxy_error(held["status"], b"".join(self.held_body).decode("utf-8", "replace"))
        body = json.dumps(error.body()).encode()
        kept = [(k, v) for k, v in held["headers"] if k.lower() not in (b"content-type", b"content-length")]
        headers = [*kept, (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        self.held = None
        self.started = True
        await self.downstream({"type": "http.response.start", "status": error.status, "headers": headers})
        await self.downstream({"type": "http.response.body", "body": body})
        self.complete = True

    async def finish(self) -> None:
        """After the proxy is done with the request: whatever it left unsaid, say as an error."""
        if self.complete:
            return
        if self.held is not None:
            await self._rewrite()
        elif not self.started:  # nothing at all: the replica died before answering
            self.held = {"status": 500, "headers": []}
            await self._rewrite()
        elif self.stream:
            event = f"event: error\ndata: {json.dumps(STREAM_CUT.body())}\n\n".encode()
            await self.downstream({"type": "http.response.body", "body": event, "more_body": False})
            self.complete = True
