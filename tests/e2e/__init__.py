"""End-to-end tests: the real CLI (`python -m server`) in a subprocess, spoken to over real HTTP
(httpx, SSE through httpx-sse), and the helpers they share.

Every wait for a condition is deadline-based polling, never a blind sleep. Servers that may still hold work
when a test ends get a short --shutdown-grace so the fixture's SIGTERM never waits long.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from httpx_sse import aconnect_sse, connect_sse

from tests.support import REPO_ROOT, ServerProcess

ERROR_TYPES = ("invalid_request_error", "authentication_error", "overloaded", "timeout", "server_error")
HTTP_TIMEOUT = httpx.Timeout(60.0, connect=10.0)


@contextmanager
def running_server(args: list[str], log_dir: Path) -> Iterator[ServerProcess]:
    """A ready server for a module's tests to share (start_server gives one per test)."""
    server = ServerProcess(args, log_dir / "server.log")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def assert_envelope(body: dict, error_type: str, code: str | None = None) -> dict:
    """`body` is DESIGN.md's error envelope (an HTTP body or an SSE error event's data); returns
    the inner error object."""
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert error["type"] in ERROR_TYPES and error["type"] == error_type, error
    if code is not None:
        assert error["code"] == code, error
    return error


def assert_error_response(response: httpx.Response, status: int, error_type: str, code: str | None = None) -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers.get("content-type", "").startswith("application/json"), response.headers
    return assert_envelope(response.json(), error_type, code)


def stream_events(client: httpx.Client, url: str, body: dict, on_step: Callable[[int], bool] | None = None):
    """POST a streaming /v1/generate; returns (step payloads, terminal event name, terminal payload).

    `on_step(n)` is called after the n-th step event; returning True stops reading (the caller
    leaves the connection to be closed) and the terminal event is then None.
    """
    steps: list[dict] = []
    with connect_sse(client, "POST", url + "/v1/generate", json={**body, "stream": True}) as source:
        assert source.response.status_code == 200, source.response.read()
        assert source.response.headers["content-type"].startswith("text/event-stream")
        for event in source.iter_sse():
            if event.event == "step":
                steps.append(event.json())
                if on_step is not None and on_step(len(steps)):
                    return steps, None, None
            elif event.event in ("done", "error"):
                return steps, event.event, event.json()
    raise AssertionError(f"the stream ended without a done or error event after {len(steps)} steps")


async def astream_events(client: httpx.AsyncClient, url: str, body: dict, on_step=None):
    """The asyncio twin of `stream_events`, except: `on_step(n)` is awaited and never stops reading,
    and a refusal before the stream starts returns ("http", {status, body, headers}) as the terminal."""
    steps: list[dict] = []
    async with aconnect_sse(client, "POST", url + "/v1/generate", json={**body, "stream": True}) as source:
        response = source.response
        if response.status_code != 200:
            await response.aread()
            return steps, "http", {"status": response.status_code, "body": response.json(), "headers": response.headers}
        assert response.headers["content-type"].startswith("text/event-stream")
        async for event in source.aiter_sse():
            if event.event == "step":
                steps.append(event.json())
                if on_step is not None:
                    await on_step(len(steps))
            elif event.event in ("done", "error"):
                return steps, event.event, event.json()
    raise AssertionError(f"the stream ended without a done or error event after {len(steps)} steps")


def check_answer(answer: dict, body: dict) -> None:
    """A full /v1/generate response for request `body`."""
    assert set(answer) >= {"id", "model", "text", "token_ids", "finish_reason", "usage", "timing"}, answer
    gen_length = body.get("gen_length", 128)
    assert len(answer["token_ids"]) == gen_length, answer
    assert answer["usage"]["completion_tokens"] == gen_length, answer
    assert 1 <= answer["usage"]["nfe"] <= body.get("steps", 128), answer
    assert answer["finish_reason"] in ("stop", "length"), answer


def chat_answer(url: str, question: str, flags: list[str]) -> str:
    """The answer `llada-server chat` (piped, no API key) prints to one question."""
    result = subprocess.run(
        [sys.executable, "-m", "server", "chat", "--url", url, *flags],
        input=question + "\n/exit\n",
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.split("you> ")[1].removeprefix("llada> ").removesuffix("\n")
