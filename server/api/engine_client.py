"""The asyncio side of the engine: submit a job, then await its events from a per-request queue
that the engine thread fills through `loop.call_soon_threadsafe`. This is all the routes know of
the engine: generate, score, cancel (through a handle), stats and the model's info."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from server.api.errors import ApiError
from server.engine.errors import RequestTooLarge
from server.engine.events import TERMINAL, JobFailed
from server.engine.model_info import ModelInfo
from server.engine.sampling_params import SamplingParams, ScoreParams
from server.engine.stats import EngineStats
from server.scheduler import QueueFull, SchedulerClosed

if TYPE_CHECKING:  # the engine module imports torch; this side of the boundary does not
    from server.engine.engine import Engine

# engine failure code -> (HTTP status, error type, envelope code)
FAILURES = {
    "engine_error": (500, "server_error", "engine_error"),
    "engine_dead": (503, "server_error", "engine_dead"),
    "shutdown": (503, "overloaded", "shutting_down"),
    "cancelled": (499, "invalid_request_error", "cancelled"),
}


def failure_error(event: JobFailed) -> ApiError:
    status, error_type, code = FAILURES.get(event.code, (500, "server_error", event.code))
    return ApiError(status, event.message, code=code, error_type=error_type)


def draining_error() -> ApiError:
    return ApiError(503, "the server is shutting down and takes no new requests", code="draining")


class RequestHandle:
    def __init__(self, client: EngineClient, deadline: float):
        self.client = client
        self.deadline = deadline
        self.started = time.monotonic()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.job_id: str | None = None
        self.ended = False
        loop = asyncio.get_running_loop()

        def sink(event: object) -> None:
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, event)
            except RuntimeError:  # the event loop is gone: nobody is waiting any more
                pass

        self.sink = sink

    async def events(self) -> AsyncIterator[object]:
        """Events until the terminal one; a JobFailed or the deadline raises ApiError."""
        while not self.ended:
            remaining = self.deadline - time.monotonic()
            try:
                event = await asyncio.wait_for(self.queue.get(), timeout=max(remaining, 0.0))
            except asyncio.TimeoutError:
                self.cancel()
                raise ApiError(
                    504,
                    f"the request took longer than --request-timeout ({self.client.timeout_s:g}s) and was cancelled",
                    code="timeout",
                ) from None
            if isinstance(event, TERMINAL):
                self.ended = True
            if isinstance(event, JobFailed):
                raise failure_error(event)
            yield event

    async def result(self) -> object:
        last = None
        async for event in self.events():
            last = event
        return last

    def cancel(self) -> None:
        if not self.ended and self.job_id is not None:
            self.ended = True
            self.client.engine.cancel(self.job_id)


class EngineClient:
    def __init__(self, engine: Engine, timeout_s: float):
        self.engine = engine
        self.timeout_s = timeout_s

    @property
    def info(self) -> ModelInfo:
        return self.engine.info

    def stats(self) -> EngineStats:
        return self.engine.stats()

    @property
    def draining(self) -> bool:
        return self.engine.draining

    def _submit(self, submit: Callable[[Callable[[object], None]], str]) -> RequestHandle:
        if not self.engine.alive:
            raise ApiError(503, "the engine is not running", code="engine_dead", error_type="server_error")
        handle = RequestHandle(self, time.monotonic() + self.timeout_s)
        try:
            handle.job_id = submit(handle.sink)
        except QueueFull as exc:
            raise ApiError(
                429,
                f"the server is at capacity ({self.engine.stats().max_queue} requests waiting); retry later",
                code="queue_full",
                headers={"Retry-After": str(max(1, round(exc.retry_after)))},
            ) from None
        except SchedulerClosed:
            raise draining_error() from None
        except RequestTooLarge as exc:
            raise ApiError(400, str(exc), param=exc.param, code="too_large") from None
        return handle

    def generate(self, prompt_ids: list[int], params: SamplingParams, stream: bool) -> RequestHandle:
        """stream: the handle yields a GenerationStep per step before the GenerationDone."""
        return self._submit(lambda sink: self.engine.submit_generate(prompt_ids, params, sink, stream))

    def score(self, pairs: list[tuple[list[int], list[int]]], params: ScoreParams) -> RequestHandle:
        return self._submit(lambda sink: self.engine.submit_score(pairs, params, sink))
