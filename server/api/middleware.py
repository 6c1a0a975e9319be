"""ASGI middleware in front of the routes: request metrics and logs, draining, API keys, body size
and content type. Each rejection uses the error envelope."""

from __future__ import annotations

import hmac
import json
import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.engine_client import draining_error
from server.api.errors import ApiError, count_rejection
from server.api.ui import PAGE_FILES

log = logging.getLogger("llada.requests")
LOG_FIELDS = "llada.log_fields"  # scope key: what routes add to the request's log line

JSON_BODY_PATHS = (
    "/v1/generate",
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/loglikelihood",
    "/v1/tokenize",
    "/v1/detokenize",
)
ENDPOINTS = (*JSON_BODY_PATHS, "/v1/models", "/health", "/metrics", *PAGE_FILES)
OPEN_PATHS = ("/health",)  # with the page on, its files are open too (app.py)


def endpoint_label(path: str) -> str:
    """A bounded label: unknown paths are 'other', so scanners cannot blow up the series count."""
    return path if path in ENDPOINTS else "other"


class Gate:
    def __init__(self, app: ASGIApp, *, state, open_paths: tuple[str, ...]) -> None:
        self.app = app
        self.state = state
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        metrics = self.state.metrics
        path, method = scope["path"], scope["method"]
        endpoint = endpoint_label(path)
        start = time.monotonic()
        # 499 (client closed the request) unless a response starts; a stream whose client leaves
        # keeps the status it started with.
        status = 499

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.state.in_flight += 1
        try:
            await self._handle(scope, receive, counting_send, path, method)
        finally:
            self.state.in_flight -= 1
            elapsed = time.monotonic() - start
            metrics.requests_total.labels(endpoint=endpoint, status=str(status)).inc()
            metrics.request_duration_seconds.labels(endpoint=endpoint).observe(elapsed)
            fields = {
                "endpoint": endpoint,
                "method": method,
                "status": status,
                **scope.get(LOG_FIELDS, {}),
                "total_s": round(elapsed, 4),
            }
            # Probes and scrapes come every few seconds: keep them out of the info log.
            level = logging.DEBUG if path in ("/health", "/metrics") else logging.INFO
            log.log(level, "request finished", extra={"fields": fields})

    async def _handle(self, scope: Scope, receive: Receive, send: Send, path: str, method: str) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        rejection = self._reject(headers, path, method)
        if rejection is not None:
            await self._send_error(rejection, send)
            return

        if "content-length" not in headers and method in ("POST", "PUT", "PATCH"):
            # No declared length (chunked): read up to the limit before the app sees anything.
            body = await _read_limited(receive, self.state.config.max_body_bytes)
            if body is None:
                await self._send_error(_too_large(self.state.config.max_body_bytes), send)
                return
            receive = _replay(body, receive)
        await self.app(scope, receive, send)

    async def _send_error(self, error: ApiError, send: Send) -> None:
        count_rejection(self.state.metrics, error)
        await _send_error(error, send)

    def _reject(self, headers: dict[str, str], path: str, method: str) -> ApiError | None:
        config = self.state.config
        if self.state.client.draining and path != "/metrics" and path != "/health":
            return draining_error()
        if (
            config.api_keys
            and needs_key(path, config.metrics_auth, self.open_paths)
            and not key_ok(headers, config.api_keys)
        ):
            return ApiError(
                401,
                "missing or wrong API key: send 'Authorization: Bearer KEY'",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > config.max_body_bytes:
            return _too_large(config.max_body_bytes)
        if method == "POST" and path in JSON_BODY_PATHS:
            content_type = headers.get("content-type", "").split(";")[0].strip().lower()
            if content_type != "application/json":
                return ApiError(
                    415,
                    f"send the body as application/json (got {content_type or 'no content type'})",
                    code="unsupported_media_type",
                )
        return None


def needs_key(path: str, metrics_auth: bool, open_paths: tuple[str, ...]) -> bool:
    if path in open_paths:
        return False
    return metrics_auth or path != "/metrics"


def key_ok(headers: dict[str, str], keys: tuple[str, ...]) -> bool:
    scheme, _, given = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        return False
    # Compare against every key so the time taken does not depend on which one matched.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given.strip().encode(), key.encode())
    return matched


async def _read_limited(receive: Receive, limit: int) -> bytes | None:
    """The whole body, or None as soon as it passes limit bytes."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks)
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limit:
            return None
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: disconnect notifications

    return replay


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the body is larger than {limit} bytes (--max-body-bytes)", code="body_too_large")


async def _send_error(error: ApiError, send: Send) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (error.headers or {}).items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
