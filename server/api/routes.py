"""The HTTP endpoints of DESIGN.md. Handlers validate, tokenize, hand the job to the engine and
shape its events into JSON or SSE; they never touch tensors."""

from __future__ import annotations

import json
import logging
import time
import uuid
from functools import lru_cache

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse

from server.api import validation
from server.api.errors import ApiError
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

router = APIRouter()
log = logging.getLogger("llada.requests")


def state_of(request: Request) -> ServerState:
    return request.app.state.server


def log_request(request_id: str, endpoint: str, status: int, **fields) -> None:
    log.info("request finished", extra={"fields": {"id": request_id, "endpoint": endpoint, "status": status, **fields}})


@router.get("/health", response_model=Health, responses={503: {"model": Health, "description": "not ready"}})
async def health(request: Request) -> JSONResponse:
    state = state_of(request)
    status = "dead" if not state.worker.alive else "draining" if state.draining else "ready"
    body = Health(
        status=status,
        model=state.loaded.name,
        device=str(state.loaded.device),
        dtype=str(state.loaded.dtype).removeprefix("torch."),
        queue_depth=state.worker.scheduler.queue_depth,
        running_jobs=state.worker.scheduler.running,
    )
    return JSONResponse(body.model_dump(), status_code=200 if status == "ready" else 503)


@router.get("/v1/models", response_model=ModelList, responses=COMMON)
async def models(request: Request) -> ModelList:
    state = state_of(request)
    return ModelList(data=[ModelCard(id=state.loaded.name, created=int(state.started_at))])


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
    ids = validation.prompt_ids(body, state.loaded, state.config)
    return TokenizeResponse(tokens=ids, count=len(ids))


@router.post("/v1/detokenize", response_model=DetokenizeResponse, responses=BODY)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    state = state_of(request)
    vocab = state.loaded.config.vocab_size
    for i, token in enumerate(body.tokens):
        if token >= vocab:
            raise validation.bad(
                f"tokens[{i}] = {token} is outside the vocabulary (0..{vocab - 1})", "tokens", "token_out_of_range"
            )
    return DetokenizeResponse(prompt=state.loaded.codec.decode(body.tokens, skip_special_tokens=False))


@router.post(
    "/v1/generate",
    response_model=GenerateResponse,
    responses={
        **ENGINE,
        200: {
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
            "description": "JSON, or with stream=true an SSE stream of step events then done (or error)",
        },
    },
)
async def generate(body: GenerateRequest, request: Request):
    state = state_of(request)
    ids = validation.prompt_ids(body, state.loaded, state.config)
    params = validation.sampling_params(body, len(ids), state.loaded, state.config)
    handle = state.client.generate(ids, params)
    state.metrics.prompt_tokens_total.inc(len(ids))
    request_id = f"gen-{uuid.uuid4().hex}"
    if body.stream:
        return EventSourceResponse(_stream(state, handle, request_id, ids), ping=15)
    try:
        done = await handle.result()
    except ApiError as error:
        log_request(request_id, "/v1/generate", error.status, prompt_tokens=len(ids), error=error.code)
        raise
    finally:
        handle.cancel()
    return _generation_response(state, request_id, ids, done, handle)


def _generation_response(
    state: ServerState, request_id: str, ids: list[int], done: GenerationDone, handle
) -> GenerateResponse:
    text, stopped = state.loaded.codec.answer_text(done.token_ids, state.loaded.special.stops)
    total = time.monotonic() - handle.started
    log_request(
        request_id,
        "/v1/generate",
        200,
        prompt_tokens=len(ids),
        answer_tokens=len(done.token_ids),
        steps=done.steps,
        queue_s=round(done.queue_s, 4),
        total_s=round(total, 4),
    )
    return GenerateResponse(
        id=request_id,
        model=state.loaded.name,
        text=text,
        token_ids=done.token_ids,
        finish_reason="stop" if stopped else "length",
        usage=Usage(prompt_tokens=len(ids), completion_tokens=len(done.token_ids), nfe=done.steps),
        timing=Timing(queue_s=done.queue_s, total_s=total),
    )


async def _stream(state: ServerState, handle, request_id: str, ids: list[int]):
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
                            index=r.index, token_id=r.token_id, text=token_text(r.token_id), confidence=r.confidence
                        )
                        for r in event.reveals
                    ],
                )
                yield {"event": "step", "data": data.model_dump_json()}
            elif isinstance(event, GenerationDone):
                response = _generation_response(state, request_id, ids, event, handle)
                yield {"event": "done", "data": response.model_dump_json()}
    except ApiError as error:
        log_request(request_id, "/v1/generate", error.status, prompt_tokens=len(ids), error=error.code)
        yield {"event": "error", "data": json.dumps(error.body())}
    finally:
        handle.cancel()


def _token_texts(state: ServerState):
    codec = state.loaded.codec

    @lru_cache(maxsize=4096)
    def text(token_id: int) -> str:
        return codec.decode([token_id], skip_special_tokens=False)

    return text


@router.post("/v1/loglikelihood", response_model=LoglikelihoodResponse, responses=ENGINE)
async def loglikelihood(body: LoglikelihoodRequest, request: Request) -> LoglikelihoodResponse:
    state = state_of(request)
    pairs, params = validation.score_inputs(body, state.loaded, state.config)
    handle = state.client.score(pairs, params)
    request_id = f"ll-{uuid.uuid4().hex}"
    prompt_tokens = sum(len(a) + len(b) for a, b in pairs)
    state.metrics.prompt_tokens_total.inc(prompt_tokens)
    try:
        done: ScoringDone = await handle.result()
    except ApiError as error:
        log_request(request_id, "/v1/loglikelihood", error.status, prompt_tokens=prompt_tokens, error=error.code)
        raise
    finally:
        handle.cancel()
    total = time.monotonic() - handle.started
    log_request(
        request_id,
        "/v1/loglikelihood",
        200,
        prompt_tokens=prompt_tokens,
        rows=done.rows,
        queue_s=round(done.queue_s, 4),
        total_s=round(total, 4),
    )
    return LoglikelihoodResponse(
        id=request_id,
        model=state.loaded.name,
        results=[
            ScoreResultBody(
                loglikelihood=r.loglikelihood, is_greedy=r.is_greedy, context_tokens=len(a), continuation_tokens=len(b)
            )
            for r, (a, b) in zip(done.results, pairs)
        ],
        usage=ScoreUsage(prompt_tokens=prompt_tokens, forward_rows=done.rows),
        timing=Timing(queue_s=done.queue_s, total_s=total),
    )
