"""The one error envelope every failure is answered with, and the one rule for which of them count
as rejections in `llada_rejected_total{reason}`."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.metrics import Metrics

# status -> llada_rejected_total reason (a 503 counts only when it is the draining refusal)
REJECTION_REASONS = {
    400: "invalid",
    415: "invalid",
    422: "invalid",
    401: "unauthorized",
    413: "too_large",
    429: "queue_full",
    504: "timeout",
}

TYPES_BY_STATUS = {
    401: "authentication_error",
    429: "overloaded",
    503: "overloaded",
    504: "timeout",
}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str = "invalid_request",
        error_type: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type or TYPES_BY_STATUS.get(
            status, "server_error" if status >= 500 else "invalid_request_error"
        )
        self.headers = headers

    @property
    def rejection(self) -> str | None:
        """The reason this error counts under in llada_rejected_total, or None."""
        if self.status == 503:
            return "draining" if self.code == "draining" else None
        return REJECTION_REASONS.get(self.status)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def count_rejection(metrics: Metrics, error: ApiError) -> None:
    """Called wherever an error is sent (handlers, the gate, a stream's error event): each once."""
    if error.rejection is not None:
        metrics.rejected_total.labels(reason=error.rejection).inc()


def _location(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or None


def validation_error(exc: RequestValidationError) -> ApiError:
    first = exc.errors()[0]
    param = _location(tuple(first.get("loc", ())))
    if first.get("type") == "json_invalid":
        return ApiError(400, f"the body is not valid JSON: {first.get('msg')}", code="invalid_json")
    message = first.get("msg", "invalid request")
    if first.get("type") == "extra_forbidden":
        message = f"unknown field {param!r}"
    elif param:
        message = f"{param}: {message}"
    return ApiError(422, message, param=param, code=first.get("type", "invalid_schema"))


STATUS_CODES = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large", 415: "unsupported_media_type"}


def install_error_handlers(app: FastAPI) -> None:
    def respond(error: ApiError) -> JSONResponse:
        count_rejection(app.state.server.metrics, error)
        return error.response()

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return respond(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return respond(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        return respond(
            ApiError(
                exc.status_code,
                message,
                code=STATUS_CODES.get(exc.status_code, "http_error"),
                headers=getattr(exc, "headers", None),
            )
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return ApiError(500, f"internal error: {type(exc).__name__}", code="internal_error").response()
