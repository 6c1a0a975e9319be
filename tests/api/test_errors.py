"""Every error status of DESIGN.md, each in the one envelope with the right type, code and param."""

from __future__ import annotations

import json
import time

import pytest

from server.engine.events import JobFailed
from server.engine.sampling_params import SamplingParams
from tests.api import assert_error, parse_sse
from tests.conftest import app_client
from tests.support import wait_for

GOOD = {"prompt": "hi", "gen_length": 8, "steps": 8}
LIMITS = {
    "max_steps": 64,
    "max_gen_length": 64,
    "max_prompt_tokens": 32,
    "max_score_requests": 3,
    "max_mc_num": 128,
}
MASK = 126336
VOCAB = 126464
LONG = SamplingParams(gen_length=1024, steps=1024, block_length=32)  # seconds of work on the tiny model


@pytest.fixture(scope="module")
def limited(tiny_model):
    with app_client(tiny_model, **LIMITS) as client:
        yield client


def idle(client) -> bool:
    stats = client.state.client.stats()
    return stats.queue_depth == 0 and stats.running_jobs == 0


# ---------------------------------------------------------------------------- table: /v1/generate

INVALID = "invalid_request_error"

# (id, body: dict merged over GOOD, or a raw JSON text, status, param)
GENERATE_CASES = [
    ("gen_length-string", {"gen_length": "8"}, 422, "gen_length"),
    ("steps-float", {"steps": 8.5}, 422, "steps"),
    ("temperature-string", {"temperature": "hot"}, 422, "temperature"),
    (
        "temperature-nan",
        '{"prompt": "hi", "gen_length": 8, "steps": 8, "temperature": NaN}',
        422,
        "temperature",
    ),
    (
        "temperature-inf",
        '{"prompt": "hi", "gen_length": 8, "steps": 8, "temperature": Infinity}',
        422,
        "temperature",
    ),
    (
        "temperature-neg-inf",
        '{"prompt": "hi", "gen_length": 8, "steps": 8, "temperature": -Infinity}',
        422,
        "temperature",
    ),
    ("cfg-nan", '{"prompt": "hi", "gen_length": 8, "steps": 8, "cfg_scale": NaN}', 422, "cfg_scale"),
    ("temperature-negative", {"temperature": -0.5}, 422, "temperature"),
    ("cfg-negative", {"cfg_scale": -1}, 422, "cfg_scale"),
    ("gen_length-zero", {"gen_length": 0}, 422, "gen_length"),
    ("gen_length-negative", {"gen_length": -4}, 422, "gen_length"),
    ("steps-zero", {"steps": 0}, 422, "steps"),
    ("steps-negative", {"steps": -1}, 422, "steps"),
    ("block_length-zero", {"block_length": 0}, 422, "block_length"),
    ("block_length-negative", {"block_length": -8}, 422, "block_length"),
    ("block_length-over-gen_length", {"block_length": 16}, 400, "block_length"),
    ("steps-over-max", {"steps": 65}, 400, "steps"),
    ("gen_length-over-max", {"gen_length": 65}, 400, "gen_length"),
    ("remasking-unknown", {"remasking": "sideways"}, 422, "remasking"),
    ("stream-string", {"stream": "yes"}, 422, "stream"),
    ("seed-negative", {"seed": -1}, 422, "seed"),
    ("prompt-and-messages", {"messages": [{"role": "user", "content": "hi"}]}, 400, {"prompt", "messages"}),
    ("prompt-and-input_ids", {"input_ids": [104, 105]}, 400, {"prompt", "input_ids"}),
    ("no-prompt", {"prompt": None}, 400, {"prompt", "messages", "input_ids"}),
    ("empty-prompt", {"prompt": ""}, 400, "prompt"),
    ("empty-messages", {"prompt": None, "messages": []}, 422, "messages"),
    ("bad-role", {"prompt": None, "messages": [{"role": "robot", "content": "hi"}]}, 422, "messages.0.role"),
    ("empty-input_ids", {"prompt": None, "input_ids": []}, 400, "input_ids"),
    ("input_ids-over-vocab", {"prompt": None, "input_ids": [104, VOCAB]}, 400, "input_ids"),
    ("input_ids-huge", {"prompt": None, "input_ids": [2**40]}, 400, "input_ids"),
    ("input_ids-negative", {"prompt": None, "input_ids": [104, -1]}, 422, "input_ids.1"),
    ("input_ids-mask", {"prompt": None, "input_ids": [104, MASK, 105]}, 400, "input_ids"),
    ("prompt-over-max", {"prompt": "x" * 33}, 400, "prompt"),
    ("input_ids-over-max", {"prompt": None, "input_ids": [104] * 33}, 400, "input_ids"),
    (
        "constraint-position-off-answer",
        {"constraints": [{"position": 8, "token_id": 65}]},
        400,
        "constraints.0",
    ),
    (
        "constraint-text-runs-off-answer",
        {"constraints": [{"position": 5, "text": "there"}]},
        400,
        "constraints.0",
    ),
    (
        "constraint-negative-position",
        {"constraints": [{"position": -1, "token_id": 65}]},
        422,
        "constraints.0.position",
    ),
    (
        "constraints-overlap",
        {"constraints": [{"position": 0, "text": "ab"}, {"position": 2, "token_id": 65}]},
        400,
        "constraints.1",
    ),
    (
        "constraints-same-position",
        {"constraints": [{"position": 3, "token_id": 65}, {"position": 3, "token_id": 66}]},
        400,
        "constraints.1",
    ),
    (
        "constraint-text-and-token_id",
        {"constraints": [{"position": 0, "text": "a", "token_id": 65}]},
        422,
        "constraints.0",
    ),
    ("constraint-neither", {"constraints": [{"position": 0}]}, 422, "constraints.0"),
    ("constraint-empty-text", {"constraints": [{"position": 0, "text": ""}]}, 422, "constraints.0.text"),
    (
        "constraint-token-over-vocab",
        {"constraints": [{"position": 0, "token_id": VOCAB}]},
        400,
        "constraints.0.token_id",
    ),
    (
        "constraint-mask-token",
        {"constraints": [{"position": 0, "token_id": MASK}]},
        400,
        "constraints.0.token_id",
    ),
    ("unknown-field", {"temprature": 0.5}, 422, "temprature"),
    ("body-not-object", "[1, 2, 3]", 422, ...),
]


def _send(client, path: str, body):
    if isinstance(body, str):
        return client.post(path, content=body, headers={"content-type": "application/json"})
    return client.post(path, json=body)


@pytest.mark.parametrize("case_id, body, status, param", GENERATE_CASES, ids=[c[0] for c in GENERATE_CASES])
def test_generate_bad_input(limited, case_id, body, status, param):
    if isinstance(body, dict):
        body = {k: v for k, v in {**GOOD, **body}.items() if v is not None}
    error = assert_error(_send(limited, "/v1/generate", body), status, INVALID, param)
    if status == 422 and case_id == "unknown-field":
        assert "temprature" in error["message"]


# ---------------------------------------------------------------------------- table: /v1/loglikelihood

PAIR = {"context": "abc", "continuation": " d"}
SCORE_CASES = [
    ("requests-empty", {"requests": []}, 422, "requests"),
    ("requests-missing", {"mc_num": 4}, 422, "requests"),
    ("requests-too-many", {"requests": [PAIR] * 4}, 400, "requests"),
    ("mc_num-over-max", {"requests": [PAIR], "mc_num": 129}, 400, "mc_num"),
    ("mc_num-zero", {"requests": [PAIR], "mc_num": 0}, 422, "mc_num"),
    ("batch_size-zero", {"requests": [PAIR], "batch_size": 0}, 422, "batch_size"),
    ("mixed-text-and-ids", {"requests": [{"context": "abc", "continuation_ids": [100]}]}, 422, "requests.0"),
    (
        "all-four-fields",
        {"requests": [{**PAIR, "context_ids": [97], "continuation_ids": [98]}]},
        422,
        "requests.0",
    ),
    ("context-only", {"requests": [{"context": "abc"}]}, 422, "requests.0"),
    (
        "empty-continuation-text",
        {"requests": [PAIR, {"context": "abc", "continuation": ""}]},
        400,
        "requests.1.continuation",
    ),
    (
        "empty-continuation-ids",
        {"requests": [{"context_ids": [97], "continuation_ids": []}]},
        400,
        "requests.0.continuation",
    ),
    (
        "continuation-over-vocab",
        {"requests": [{"context_ids": [97], "continuation_ids": [VOCAB]}]},
        400,
        "requests.0.continuation",
    ),
    (
        "context-mask",
        {"requests": [{"context_ids": [97, MASK], "continuation_ids": [98]}]},
        400,
        "requests.0.context",
    ),
    ("pair-over-max-tokens", {"requests": [{"context": "x" * 30, "continuation": " yz"}]}, 400, "requests.0"),
    ("cfg-nan", '{"requests": [{"context": "a", "continuation": " b"}], "cfg_scale": NaN}', 422, "cfg_scale"),
    ("unknown-field", {"requests": [PAIR], "samples": 3}, 422, "samples"),
]


@pytest.mark.parametrize("case_id, body, status, param", SCORE_CASES, ids=[c[0] for c in SCORE_CASES])
def test_loglikelihood_bad_input(limited, case_id, body, status, param):
    assert_error(_send(limited, "/v1/loglikelihood", body), status, INVALID, param)


OTHER_CASES = [
    ("/v1/tokenize", {}, 400, {"prompt", "messages"}),
    (
        "/v1/tokenize",
        {"prompt": "a", "messages": [{"role": "user", "content": "b"}]},
        400,
        {"prompt", "messages"},
    ),
    ("/v1/tokenize", {"input_ids": [1]}, 422, "input_ids"),
    ("/v1/tokenize", {"prompt": 5}, 422, "prompt"),
    ("/v1/tokenize", {"prompt": "x" * 33}, 400, "prompt"),
    ("/v1/detokenize", {"tokens": [97, VOCAB]}, 400, "tokens"),
    ("/v1/detokenize", {"tokens": [-1]}, 422, "tokens.0"),
    ("/v1/detokenize", {"tokens": "abc"}, 422, "tokens"),
]


@pytest.mark.parametrize("path, body, status, param", OTHER_CASES)
def test_tokenizer_endpoints_bad_input(limited, path, body, status, param):
    assert_error(_send(limited, path, body), status, INVALID, param)


def test_server_still_answers_after_bad_inputs(limited):
    """Runs after the tables (same module-scoped server): nothing was broken by them."""
    for case_id, body, _, _ in GENERATE_CASES:
        if isinstance(body, dict):
            body = {k: v for k, v in {**GOOD, **body}.items() if v is not None}
        assert _send(limited, "/v1/generate", body).status_code < 500, case_id
    response = limited.post("/v1/generate", json=GOOD)
    assert response.status_code == 200, response.text
    assert len(response.json()["token_ids"]) == 8
    assert limited.post("/v1/loglikelihood", json={"requests": [PAIR], "mc_num": 2}).status_code == 200
    assert limited.get("/health").status_code == 200
    assert idle(limited)


# ---------------------------------------------------------------------------- protocol-level errors


def test_404_unknown_route(client):
    error = assert_error(client.get("/v1/nothing"), 404, INVALID, None)
    assert error["code"] == "not_found"
    assert_error(client.post("/v2/generate", json=GOOD), 404, INVALID, None)


def test_405_wrong_method(client):
    error = assert_error(client.get("/v1/generate"), 405, INVALID, None)
    assert error["code"] == "method_not_allowed"
    assert_error(client.post("/health", json={}), 405, INVALID, None)
    assert_error(client.delete("/v1/models"), 405, INVALID, None)


def test_413_body_too_large(tiny_model):
    with app_client(tiny_model, max_body_bytes=200) as client:
        big = {"prompt": "x" * 300, "gen_length": 8, "steps": 8}
        error = assert_error(client.post("/v1/generate", json=big), 413, INVALID, None)
        assert error["code"] == "body_too_large"
        # A body just under the limit still works.
        assert client.post("/v1/generate", json=GOOD).status_code == 200


def test_413_body_too_large_without_content_length(tiny_model):
    """A chunked body (no Content-Length) over the limit is 413 too, not a parse error."""
    with app_client(tiny_model, max_body_bytes=200) as client:
        payload = json.dumps({"prompt": "x" * 300, "gen_length": 8, "steps": 8}).encode()

        def chunks():
            yield payload[:100]
            yield payload[100:]

        response = client.post("/v1/generate", content=chunks(), headers={"content-type": "application/json"})
        assert "content-length" not in response.request.headers
        error = assert_error(response, 413, INVALID, None)
        assert error["code"] == "body_too_large"


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_415_wrong_content_type(client, content_type):
    headers = {"content-type": content_type} if content_type else {}
    response = client.post("/v1/generate", content=json.dumps(GOOD).encode(), headers=headers)
    error = assert_error(response, 415, INVALID, None)
    assert error["code"] == "unsupported_media_type"


def test_json_with_charset_is_accepted(client):
    response = client.post(
        "/v1/tokenize",
        content=json.dumps({"prompt": "a"}).encode(),
        headers={"content-type": "application/json; charset=utf-8"},
    )
    assert response.status_code == 200


@pytest.mark.parametrize("text", ['{"prompt": "hi", ', "{prompt: hi}", '{"prompt": "hi"} x', "nul"])
def test_400_malformed_json(client, text):
    response = client.post("/v1/generate", content=text.encode(), headers={"content-type": "application/json"})
    error = assert_error(response, 400, INVALID, None)
    assert error["code"] == "invalid_json"


def test_400_body_not_utf8(client):
    response = client.post("/v1/generate", content=b'{"prompt": "\xff"}', headers={"content-type": "application/json"})
    assert_error(response, 400, INVALID, None)


def test_empty_body_is_a_schema_error(client):
    response = client.post("/v1/generate", content=b"", headers={"content-type": "application/json"})
    assert_error(response, 422, INVALID, None, code="missing")


# ---------------------------------------------------------------------------- load, drain, time, faults


def test_every_400_415_and_422_counts_once_as_invalid(tiny_model):
    with app_client(tiny_model, max_gen_length=16) as client:
        assert client.post("/v1/generate", json={"prompt": "x", "gen_length": 32}).status_code == 400
        json_type = {"content-type": "application/json"}
        assert client.post("/v1/generate", content=b"{", headers=json_type).status_code == 400
        assert client.post("/v1/generate", json={"prompt": "x", "gen_length": 0}).status_code == 422
        assert client.post("/v1/tokenize", content=b"x", headers={"content-type": "text/plain"}).status_code == 415
        assert client.post("/v1/generate", json=GOOD).status_code == 200
        assert 'llada_rejected_total{reason="invalid"} 4.0' in client.get("/metrics").text


def test_429_queue_full_with_retry_after(tiny_model):
    with app_client(tiny_model, max_queue=1, max_batch_rows=2) as client:
        engine = client.state.client.engine
        prompt = tiny_model.codec.encode("busy")
        events: dict[str, list] = {}

        def submit(params: SamplingParams) -> str:
            received: list = []
            job_id = engine.submit_generate(prompt, params, received.append, report_steps=True)
            events[job_id] = received
            return job_id

        try:
            submit(LONG)
            wait_for(lambda: engine.stats().running_jobs == 1, what="the first job to run")
            submit(LONG)
            wait_for(lambda: engine.stats().running_jobs == 2, what="the second job to run")
            submit(LONG)  # no rows left: it waits, and fills the queue of one
            assert engine.stats().queue_depth == 1

            start = time.monotonic()
            response = client.post("/v1/generate", json=GOOD)
            assert time.monotonic() - start < 2.0, "429 must be answered at once"
            error = assert_error(response, 429, "overloaded", None)
            assert error["code"] == "queue_full"
            retry_after = response.headers["retry-after"]
            assert retry_after.isdigit() and int(retry_after) >= 1
            stats = engine.stats()
            assert stats.queue_depth == 1 and stats.running_jobs == 2  # the rejected request left no trace
        finally:
            for job_id in events:
                engine.cancel(job_id)
        wait_for(lambda: idle(client), what="the cancelled jobs to leave")
        wait_for(
            lambda: all(e and isinstance(e[-1], JobFailed) for e in events.values()),
            what="every cancelled job to be answered",
        )
        assert all(e[-1].code == "cancelled" for e in events.values())
        assert client.post("/v1/generate", json=GOOD).status_code == 200


def test_503_while_draining(tiny_model):
    # Draining is the engine's state (its scheduler stops admitting), set once by SIGTERM.
    with app_client(tiny_model) as client:
        assert client.post("/v1/generate", json=GOOD).status_code == 200
        client.state.client.engine.close()
        error = assert_error(client.post("/v1/generate", json=GOOD), 503, "overloaded", None)
        assert error["code"] == "draining"
        assert_error(client.post("/v1/loglikelihood", json={"requests": [PAIR]}), 503, "overloaded")
        health = client.get("/health")
        assert health.status_code == 503
        assert health.json()["status"] == "draining"
        metrics = client.get("/metrics")
        assert metrics.status_code == 200
        assert 'llada_rejected_total{reason="draining"} 2.0' in metrics.text  # each refusal counted once


def test_504_timeout_cancels_the_job(tiny_model):
    with app_client(tiny_model, request_timeout=0.2) as client:
        start = time.monotonic()
        response = client.post("/v1/generate", json={"prompt": "slow", "gen_length": 1024, "steps": 1024})
        assert time.monotonic() - start < 5.0
        error = assert_error(response, 504, "timeout", None)
        assert error["code"] == "timeout"
        wait_for(lambda: idle(client), timeout=5.0, what="the timed-out job to be cancelled")
        # The worker counts the cancellation when it answers the job, just after it leaves the scheduler.
        wait_for(
            lambda: "llada_cancelled_total 1.0" in client.get("/metrics").text,
            timeout=5.0,
            what="the cancellation to be counted",
        )
        assert 'llada_rejected_total{reason="timeout"} 1.0' in client.get("/metrics").text
        assert client.post("/v1/generate", json=GOOD).status_code == 200


def test_504_timeout_while_streaming_is_an_error_event(tiny_model):
    with app_client(tiny_model, request_timeout=0.2) as client:
        response = client.post(
            "/v1/generate", json={"prompt": "slow", "gen_length": 1024, "steps": 1024, "stream": True}
        )
        assert response.status_code == 200
        events = parse_sse(response.text)
        assert {name for name, _ in events[:-1]} <= {"step"}
        name, data = events[-1]
        assert name == "error"
        assert data["error"]["type"] == "timeout"
        assert data["error"]["code"] == "timeout"
        wait_for(lambda: idle(client), timeout=5.0, what="the timed-out stream's job to be cancelled")


def test_500_injected_forward_error_then_recovery(tiny_model):
    with app_client(tiny_model, inject_faults="error@1") as client:
        error = assert_error(client.post("/v1/generate", json=GOOD), 500, "server_error", None)
        assert error["code"] == "engine_error"
        assert idle(client)
        assert client.get("/health").status_code == 200
        response = client.post("/v1/generate", json=GOOD)
        assert response.status_code == 200, response.text
        assert len(response.json()["token_ids"]) == 8
        assert "llada_engine_errors_total 1.0" in client.get("/metrics").text


def test_500_injected_error_while_streaming(tiny_model):
    with app_client(tiny_model, inject_faults="error@2") as client:
        response = client.post("/v1/generate", json={**GOOD, "stream": True})
        events = parse_sse(response.text)
        assert [name for name, _ in events] == ["step", "error"]
        assert events[-1][1]["error"]["type"] == "server_error"
        assert client.post("/v1/generate", json=GOOD).status_code == 200
