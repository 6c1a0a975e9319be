"""What the bundled clients share about talking to a running server: the API key, the error
envelope, and the names of the generation settings /v1/generate takes."""

from __future__ import annotations

import os

import httpx

from server.api.schemas import GenerateRequest

API_KEY_VARIABLE = "LLADA_API_KEY"
# Every field of /v1/generate but the prompt, the stream switch and constraints (positions in
# one answer, which no client-wide setting can give).
NOT_SETTINGS = ("prompt", "messages", "input_ids", "stream", "constraints")
GENERATION_SETTINGS = tuple(name for name in GenerateRequest.model_fields if name not in NOT_SETTINGS)


class ServerError(Exception):
    """The server's error envelope (or a refusal without one), as a client error."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.code = code


def auth_headers(api_key: str | None = None) -> dict[str, str]:
    """The Bearer header for api_key, else for $LLADA_API_KEY; none when neither is set."""
    key = api_key or os.environ.get(API_KEY_VARIABLE)
    return {"Authorization": f"Bearer {key}"} if key else {}


def error_of(status: int, body: object) -> ServerError:
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return ServerError(status, error["message"], error.get("code"))
    return ServerError(status, str(body)[:500])


def check(response: httpx.Response) -> httpx.Response:
    """The response, or ServerError if its status is not 200 (the body must have been read)."""
    if response.status_code != 200:
        try:
            body = response.json()
        except ValueError:
            body = response.text
        raise error_of(response.status_code, body)
    return response
