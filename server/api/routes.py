"""The HTTP endpoints of DESIGN.md. Handlers validate, tokenize, hand the job to the engine and
shape its events into JSON or SSE; they never touch tensors."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from functools import lru_cache

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse

from server.api import validation
from server.api.engine_client import RequestHandle
from server.api.errors import ApiError, count_rejection
from server.api.middleware import LOG_FIELDS
from server.api.schemas import (
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorEnvelope,
    GenerateRequest,
    GenerateResponse,
    Health,
    LoglikelihoodRequest,
    LoglikelihoodResponse,
    ModelCard,
    ModelList,
    ScoreResultBody,
    ScoreUsage,
    StepData,
    Timing,
    TokenizeRequest,
    TokenizeResponse,
    UnmaskedToken,
    Usage,
)
from server.api.state import ServerState
from server.engine.events import GenerationDone, GenerationStep, ScoringDone


def error_responses(*statuses: int) -> dict:
    return {status: {"model": ErrorEnvelope, "description": ERROR_MEANINGS[status]} for status in statuses}


ERROR_MEANINGS = {
    400: "a value the server cannot use (the field is named in param)",
    401: "missing or wrong API key",
    404: "the model named is not the one served",
    413: "body too large",
    415: "body is not application/json",
    422: "the body does not match the schema",
    429: "queue full; retry after Retry-After seconds",
    500: "the engine failed on this request's batch",
    503: "draining, shutting down, or the engine is not running",
    504: "the request ran past --request-timeout and was cancelled",
}
# Every route can meet auth and draining; bodies can also be too large, mistyped or invalid.
COMMON = error_responses(401, 503)
BODY = error_responses(400, 401, 413, 415, 422, 503)
ENGINE = error_responses(400, 401, 413, 415, 422, 429, 500, 503, 504)


def sse_content(*events: str) -> dict:
    """The text/event-stream content of a response: each event's fields, its data a JSON text;
    `events` are the event names it sends (none: unnamed events, "message" to a client)."""
    name = {"type": "string", "enum": list(events)} if events else {"type": "string", "const": "message"}
    data = {"type": "string", "contentMediaType": "application/json"}
    event = {"type": "object", "required": ["data"], "properties": {"event": name, "data": data}}
    return {"text/event-stream": {"schema": event}}


router = APIRouter()


def state_of(request: Request) -> ServerState:
    return request.app.state.server


def log_fields(request: Request) -> dict:
    """Fields for the request's one log line, which the middleware writes when it ends."""
    return request.scope.setdefault(LOG_FIELDS, {})


async def _client_gone(request: Request) -> None:
    # The body is already read, so the next message is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def result_or_disconnect(request: Request, handle: RequestHandle) -> object:
    """The job's final event; a client that hangs up first cancels the job."""
    (result,) = await results_or_disconnect(request, [handle])
    return result


async def results_or_disconnect(request: Request, handles: list[RequestHandle]) -> list[object]:
    """Every job's final event; a client that hangs up first, or a job that fails, cancels the rest."""
    results = asyncio.ensure_future(asyncio.gather(*(handle.result() for handle in handles)))
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({results, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not results.done():
            results.cancel()
        for handle in handles:
            handle.cancel()
    if results.cancelled():
        raise ApiError(499, "the client closed the request", code="cancelled")
    return results.result()


@router.get("/health", response_model=Health, responses={503: {"model": Health, "description": "not ready"}})
async def health(request: Request) -> JSONResponse:
    state = state_of(request)
    stats = state.client.stats()
    status = "dead" if not stats.alive else "draining" if stats.draining else "ready"
    body = Health(
        status=status,
        model=state.info.name,
        device=state.info.device,
        dtype=state.info.dtype,
        queue_depth=stats.queue_depth,
        running_jobs=stats.running_jobs,
    )
    return JSONResponse(body.model_dump(), status_code=200 if status == "ready" else 503)


@router.get("/v1/models", response_model=ModelList, responses=COMMON)
async def models(request: Request) -> ModelList:
    state = state_of(request)
    info = state.info
    defaults = validation.family_defaults(info, state.config)
    card = ModelCard(
        id=info.name,
        created=int(state.started_at),
        family=info.family,
        block_diffusion=info.block_diffusion,
        defaults=defaults,
    )
    return ModelList(data=[card])


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        **COMMON,
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text"},
    },
)
async def metrics(request: Request) -> Response:
    body, content_type = state_of(request).metrics.render()
    return Response(body, media_type=content_type)


@router.post("/v1/tokenize", response_model=TokenizeResponse, responses=BODY)
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    state = state_of(request)
    ids = validation.prompt_ids(body, state.info, state.config)
    return TokenizeResponse(tokens=ids, count=len(ids))


@router.post("/v1/detokenize", response_model=DetokenizeResponse, responses=BODY)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    state = state_of(request)
    vocab = state.info.vocab_size
    for i, token in enumerate(body.tokens):
        if token >= vocab:
            raise validation.bad(
                f"tokens[{i}] = {token} is outside the vocabulary (0..{vocab - 1})", "tokens", "token_out_of_range"
            )
    return DetokenizeResponse(prompt=state.info.codec.decode(body.tokens, skip_special_tokens=False))


@router.post(
    "/v1/generate",
    response_model=GenerateResponse,
    responses={
        **ENGINE,
        200: {
            "content": sse_content("step", "done", "error"),
            "description": "JSON, or with stream=true an SSE stream of step events then done (or error)",
        },
    },
)
async def generate(body: GenerateRequest, request: Request):
    state = state_of(request)
    ids = validation.prompt_ids(body, state.info, state.config)
    params = validation.sampling_params(body, len(ids), state.info, state.config)
    request_id = f"gen-{uuid.uuid4().hex}"
    fields = log_fields(request)
    fields.update(id=request_id, prompt_tokens=len(ids))
    handle = state.client.generate(ids, params, body.stream)
    state.metrics.prompt_tokens_total.inc(len(ids))
    if body.stream:
        return EventSourceResponse(_stream(state, handle, request_id, ids, fields), ping=15)
    done = await result_or_disconnect(request, handle)
    return _generation_response(state, request_id, ids, done, handle, fields)


def _generation_response(
    state: ServerState, request_id: str, ids: list[int], done: GenerationDone, handle: RequestHandle, fields: dict
) -> GenerateResponse:
    text, stopped = state.info.codec.answer_text(done.token_ids, state.info.special.stops)
    total = time.monotonic() - handle.started
    fields.update(answer_tokens=len(done.token_ids), steps=done.steps, queue_s=round(done.queue_s, 4))
    return GenerateResponse(
        id=request_id,
        model=state.info.name,
        text=text,
        token_ids=done.token_ids,
        finish_reason="stop" if stopped else "length",
        approximate=done.approximate,
        usage=Usage(prompt_tokens=len(ids), completion_tokens=len(done.token_ids), nfe=done.steps),
        timing=Timing(queue_s=done.queue_s, total_s=total),
    )


async def _stream(state: ServerState, handle: RequestHandle, request_id: str, ids: list[int], fields: dict):
    token_text = _token_texts(state)
    try:
        async for event in handle.events():
            if isinstance(event, GenerationStep):
                data = StepData(
                    step=event.step,
                    block=event.block,
                    masked=event.masked,
                    unmasked=[
                        UnmaskedToken(
                            index=r.index,
                            token_id=r.token_id,
                            text=token_text(r.token_id),
                            confidence=r.confidence,
                            edit=r.edit,
                        )
                        for r in event.reveals
                    ],
                )
                yield {"event": "step", "data": data.model_dump_json()}
            elif isinstance(event, GenerationDone):
                response = _generation_response(state, request_id, ids, event, handle, fields)
                yield {"event": "done", "data": response.model_dump_json()}
    except ApiError as error:
        count_rejection(state.metrics, error)
        fields.update(error=error.code, error_status=error.status)
        yield {"event": "error", "data": json.dumps(error.body())}
    finally:
        handle.cancel()


def _token_texts(state: ServerState):
    codec = state.info.codec

    @lru_cache(maxsize=4096)
    def text(token_id: int) -> str:
        return codec.decode([token_id], skip_special_tokens=False)

    return text


@router.post("/v1/loglikelihood", response_model=LoglikelihoodResponse, responses=ENGINE)
async def loglikelihood(body: LoglikelihoodRequest, request: Request) -> LoglikelihoodResponse:
    state = state_of(request)
    pairs, params = validation.score_inputs(body, state.info, state.config)
    request_id = f"ll-{uuid.uuid4().hex}"
    prompt_tokens = sum(len(a) + len(b) for a, b in pairs)
    fields = log_fields(request)
    fields.update(id=request_id, prompt_tokens=prompt_tokens)
    handle = state.client.score(pairs, params)
    state.metrics.prompt_tokens_total.inc(prompt_tokens)
    done: ScoringDone = await result_or_disconnect(request, handle)
    total = time.monotonic() - handle.started
    fields.update(rows=done.rows, queue_s=round(done.queue_s, 4))
    return LoglikelihoodResponse(
        id=request_id,
        model=state.info.name,
        results=[
            ScoreResultBody(
                loglikelihood=r.loglikelihood, is_greedy=r.is_greedy, context_tokens=len(a), continuation_tokens=len(b)
            )
            for r, (a, b) in zip(done.results, pairs)
        ],
        usage=ScoreUsage(prompt_tokens=prompt_tokens, forward_rows=done.rows),
        timing=Timing(queue_s=done.queue_s, total_s=total),
    )
