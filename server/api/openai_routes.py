"""`POST /v1/completions` and `POST /v1/chat/completions`: OpenAI's shapes over the same engine
jobs as /v1/generate (one job per choice). Streams are `data:` chunks, each carrying the newly
committed text of a choice (server/api/committed_text.py), then `data: [DONE]`."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi import APIRouter, Request
from sse_starlette.sse import EventSourceResponse

from server.api import openai_requests
from server.api.committed_text import CommittedText, answer_text
from server.api.engine_client import RequestHandle
from server.api.errors import ApiError, count_rejection
from server.api.openai_requests import ChoiceJob, Plan
from server.api.openai_schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    CompletionUsage,
    OpenAIChoice,
    OpenAIRequest,
    OpenAIResponse,
)
from server.api.routes import ENGINE, error_responses, log_fields, results_or_disconnect, sse_content, state_of
from server.api.state import ServerState
from server.engine.events import GenerationDone, GenerationStep

router = APIRouter()

RESPONSES = {**ENGINE, **error_responses(404)}


def _streamed(model: type) -> dict:
    return {
        **RESPONSES,
        200: {
            "model": model,
            "content": sse_content(),
            "description": "JSON, or with stream=true `data:` chunks of newly committed text, then `data: [DONE]`",
        },
    }


@dataclass(frozen=True)
class Shape:
    """What differs between the two routes: ids, object names and where a choice's text goes."""

    id_prefix: str
    response: type[OpenAIResponse]
    choice: Callable[[int, str, str], OpenAIChoice]  # (index, text, finish_reason)
    chunk_object: str
    first_delta: dict | None  # sent once per choice before any text
    text_delta: Callable[[str], dict]
    finish_delta: dict


COMPLETIONS = Shape(
    id_prefix="cmpl",
    response=Completion,
    choice=lambda index, text, reason: CompletionChoice(index=index, text=text, finish_reason=reason),
    chunk_object="text_completion",
    first_delta=None,
    text_delta=lambda text: {"text": text, "logprobs": None},
    finish_delta={"text": "", "logprobs": None},
)
CHAT = Shape(
    id_prefix="chatcmpl",
    response=ChatCompletion,
    choice=lambda index, text, reason: ChatChoice(
        index=index, message=AssistantMessage(content=text), finish_reason=reason
    ),
    chunk_object="chat.completion.chunk",
    first_delta={"delta": {"role": "assistant", "content": ""}, "logprobs": None},
    text_delta=lambda text: {"delta": {"content": text}, "logprobs": None},
    finish_delta={"delta": {}, "logprobs": None},
)


@router.post("/v1/completions", response_model=Completion, responses=_streamed(Completion))
async def completions(body: CompletionRequest, request: Request):
    return await _serve(request, body, openai_requests.completion_prompts(body), COMPLETIONS)


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses=_streamed(ChatCompletion))
async def chat_completions(body: ChatCompletionRequest, request: Request):
    return await _serve(request, body, openai_requests.chat_prompt(body), CHAT)


async def _serve(request: Request, body: OpenAIRequest, prompts: list[dict], shape: Shape):
    state = state_of(request)
    plan = openai_requests.plan(body, prompts, state.info, state.config)
    if body.stream:
        return _stream(state, request, body, plan, shape)
    request_id, handles = _submit(state, request, plan, shape, stream=False)
    done: list[GenerationDone] = await results_or_disconnect(request, handles)
    log_fields(request).update(answer_tokens=sum(len(d.token_ids) for d in done), steps=max(d.steps for d in done))
    stops = state.info.special.stops
    texts = [answer_text(state.info.codec, d.token_ids, stops, plan.stop) for d in done]
    return shape.response(
        id=request_id,
        created=int(time.time()),
        model=state.info.name,
        choices=[shape.choice(i, text, reason) for i, (text, reason) in enumerate(texts)],
        usage=_usage(plan),
    )


def _usage(plan: Plan) -> CompletionUsage:
    completion = sum(job.params.gen_length for job in plan.jobs)
    return CompletionUsage(
        prompt_tokens=plan.prompt_tokens, completion_tokens=completion, total_tokens=plan.prompt_tokens + completion
    )


def _submit(state: ServerState, request: Request, plan: Plan, shape: Shape, stream: bool):
    """One job per choice; if one is refused (429, draining), those already queued are cancelled."""
    request_id = f"{shape.id_prefix}-{uuid.uuid4().hex}"
    log_fields(request).update(id=request_id, prompt_tokens=plan.prompt_tokens, choices=len(plan.jobs))
    handles: list[RequestHandle] = []
    try:
        for job in plan.jobs:
            handles.append(state.client.generate(job.prompt_ids, job.params, stream))
            state.metrics.prompt_tokens_total.inc(len(job.prompt_ids))
    except ApiError:
        for handle in handles:
            handle.cancel()
        raise
    return request_id, handles


def _stream(state: ServerState, request: Request, body: OpenAIRequest, plan: Plan, shape: Shape) -> EventSourceResponse:
    request_id, handles = _submit(state, request, plan, shape, stream=True)
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    created = int(time.time())

    def chunk(choices: list[dict], **extra) -> dict:
        payload = {"id": request_id, "object": shape.chunk_object, "created": created, "model": state.info.name}
        payload["choices"] = choices
        if include_usage:
            payload["usage"] = extra.get("usage")
        return {"data": json.dumps(payload)}

    async def chunks():
        try:
            if shape.first_delta is not None:
                for job in plan.jobs:
                    yield chunk([{"index": job.index, **shape.first_delta, "finish_reason": None}])
            choices = [_choice_deltas(state, job, handle, plan.stop) for job, handle in zip(plan.jobs, handles)]
            async for index, delta, finish_reason in _merge(choices):
                if delta:
                    yield chunk([{"index": index, **shape.text_delta(delta), "finish_reason": None}])
                if finish_reason is not None:
                    yield chunk([{"index": index, **shape.finish_delta, "finish_reason": finish_reason}])
            if include_usage:
                yield chunk([], usage=_usage(plan).model_dump())
            yield {"data": "[DONE]"}
        except ApiError as error:
            count_rejection(state.metrics, error)
            log_fields(request).update(error=error.code, error_status=error.status)
            yield {"data": json.dumps(error.body())}
        finally:
            for handle in handles:
                handle.cancel()

    return EventSourceResponse(chunks(), ping=15)


async def _choice_deltas(
    state: ServerState, job: ChoiceJob, handle: RequestHandle, stop: tuple[str, ...]
) -> AsyncIterator[tuple[int, str, str | None]]:
    """(index, newly committed text, finish_reason or None) for one choice, until its text is
    decided; then its job is cancelled, as nothing it would still reveal can change the text."""
    params = job.params
    text = CommittedText(state.info.codec, state.info.special.stops, stop, params.gen_length, params.constraints)
    try:
        async for event in handle.events():
            if isinstance(event, GenerationStep):
                delta = text.reveal(event.reveals, event.settled)
            elif isinstance(event, GenerationDone):
                delta = text.finish(event.token_ids)
            else:
                continue
            yield job.index, delta, text.finish_reason
            if text.finish_reason is not None:
                return
    finally:
        handle.cancel()


_END = object()


async def _merge(streams: list[AsyncIterator]) -> AsyncIterator:
    """Items of several async iterators as they come; the first error ends them all."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(stream: AsyncIterator) -> None:
        try:
            async for item in stream:
                queue.put_nowait((item, None))
        except Exception as exc:  # handed to the consumer, which raises it
            queue.put_nowait((None, exc))
        else:
            queue.put_nowait((_END, None))

    tasks = [asyncio.ensure_future(pump(stream)) for stream in streams]
    try:
        running = len(tasks)
        while running:
            item, exc = await queue.get()
            if exc is not None:
                raise exc
            if item is _END:
                running -= 1
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
