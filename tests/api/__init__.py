"""In-process API tests (real tiny model, FastAPI TestClient) and the helpers they share."""

from __future__ import annotations

import json

ERROR_TYPES = ("invalid_request_error", "authentication_error", "overloaded", "timeout", "server_error")


def assert_error(response, status: int, error_type: str, param: object = ..., code: str | None = None) -> dict:
    """The response is `status` with DESIGN.md's envelope; returns the inner error object.

    param: ... skips the check; a set accepts any of its members; anything else must be equal.
    """
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["code"], str) and error["code"], error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert error["type"] in ERROR_TYPES, error
    assert error["type"] == error_type, error
    if isinstance(param, set):
        assert error["param"] in param, error
    elif param is not ...:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def parse_sse(text: str) -> list[tuple[str, dict]]:
    """(event name, decoded JSON data) for each event of a text/event-stream body; comments skipped."""
    events = []
    for block in text.replace("\r\n", "\n").replace("\r", "\n").split("\n\n"):
        name, data = "message", []
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)
        if data:
            events.append((name, json.loads("\n".join(data))))
    return events
