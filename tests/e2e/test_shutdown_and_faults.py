"""SIGTERM drains running streams and exits 0; a grace period that runs out answers with an error
instead of hanging; injected forward failures fail exactly their batch, and an injected
out-of-memory is retried as smaller batches without changing any answer."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx

from tests.support import scrape, wait_for

from . import HTTP_TIMEOUT, assert_envelope, assert_error_response, astream_events, check_answer


def _draining(url: str) -> bool:
    response = httpx.get(url + "/health", timeout=HTTP_TIMEOUT)
    return response.status_code == 503 and response.json()["status"] == "draining"


async def _streams_then_sigterm(server, bodies: list[dict], while_draining=None) -> tuple[list[tuple], float]:
    """Open one stream per body; once every stream has had a step event, SIGTERM the server and
    (if given) run `while_draining(client)`. Returns each stream's (steps, terminal, data) and
    the time.monotonic() of the signal."""
    running = [asyncio.Event() for _ in bodies]

    async def open_stream(client, i):
        async def on_step(n):
            running[i].set()

        return await astream_events(client, server.url, bodies[i], on_step)

    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as client:
        tasks = [asyncio.create_task(open_stream(client, i)) for i in range(len(bodies))]
        await asyncio.wait_for(asyncio.gather(*(event.wait() for event in running)), timeout=30)
        server.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        if while_draining is not None:
            await while_draining(client)
        return await asyncio.wait_for(asyncio.gather(*tasks), timeout=30), signalled


def test_sigterm_finishes_running_streams_refuses_new_work_and_exits_0(start_server, tiny_checkpoint):
    server = start_server("--model", str(tiny_checkpoint), "--shutdown-grace", "20")
    # Long enough to outlast the 503 check on a fast CPU, short enough for the grace on a slow one.
    bodies = [
        {"prompt": "First stream", "gen_length": 128, "steps": 128, "block_length": 4},
        {"prompt": "Second stream", "gen_length": 128, "steps": 128, "block_length": 4},
    ]
    refused = {}

    async def while_draining(client: httpx.AsyncClient) -> None:
        # /health flips to draining in the signal handler; from then on new work is refused.
        await asyncio.to_thread(wait_for, lambda: _draining(server.url), 10, "/health to report draining", 0.01)
        response = await client.post(
            server.url + "/v1/generate", json={"prompt": "Too late", "gen_length": 4, "steps": 2, "block_length": 4}
        )
        refused["response"] = response

    results, signalled = asyncio.run(_streams_then_sigterm(server, bodies, while_draining))
    assert_error_response(refused["response"], 503, "overloaded", "draining")
    for body, (steps, kind, data) in zip(bodies, results):
        assert kind == "done", (kind, data)
        check_answer(data, body)
        assert len(steps) == data["usage"]["nfe"]
    assert server.proc.wait(timeout=25) == 0, server.logs()
    assert time.monotonic() - signalled < 20, "the process outlived its grace period"
    assert "draining" in server.logs()


def test_a_grace_period_that_runs_out_ends_the_stream_with_an_error_and_exits_0(start_server, tiny_checkpoint):
    server = start_server("--model", str(tiny_checkpoint), "--shutdown-grace", "1")
    body = {"prompt": "A very long story", "gen_length": 1024, "steps": 1024, "block_length": 4}
    ((steps, kind, data),), signalled = asyncio.run(_streams_then_sigterm(server, [body]))
    assert kind == "error", (kind, data)
    assert_envelope(data, "overloaded", "shutting_down")
    assert 1 <= len(steps) < 1024
    assert server.proc.wait(timeout=15) == 0, server.logs()
    assert time.monotonic() - signalled < 15
    assert "grace period over" in server.logs()


# Two prompt lengths (18 and 38 tokens with the answer): a step's rows share one packed forward
# whatever their lengths (server/engine/runner.py), so forward 3 fails every job in that step, and
# only those; jobs that join later are answered.
SHORT, LONG = "a" * 10, "b" * 30


async def _outcome(client: httpx.AsyncClient, url: str, body: dict, stream: bool) -> dict:
    """{ok, data, steps_seen (streams; None for JSON), error (the envelope's inner error)}."""
    if stream:
        steps, kind, data = await astream_events(client, url, body)
        if kind == "done":
            return {"ok": True, "data": data, "steps_seen": len(steps)}
        assert kind == "error", (kind, data)
        error = assert_envelope(data, "server_error", "engine_error")
        return {"ok": False, "error": error, "steps_seen": len(steps)}
    response = await client.post(url + "/v1/generate", json=body)
    if response.status_code == 200:
        return {"ok": True, "data": response.json(), "steps_seen": None}
    return {
        "ok": False,
        "error": assert_error_response(response, 500, "server_error", "engine_error"),
        "steps_seen": None,
    }


def test_an_injected_forward_error_fails_exactly_that_steps_jobs(start_server, tiny_checkpoint):
    server = start_server(
        "--model",
        str(tiny_checkpoint),
        "--inject-faults",
        "error@3",
        "--shutdown-grace",
        "5",
    )
    requests = [
        ({"prompt": prompt, "gen_length": 8, "steps": 8, "block_length": 8, "seed": i}, stream)
        for i, (prompt, stream) in enumerate(
            [(SHORT, True), (LONG, True), (SHORT, False), (LONG, False), (SHORT, True), (LONG, True)]
        )
    ]

    async def together():
        async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as client:
            return await asyncio.gather(*(_outcome(client, server.url, body, stream) for body, stream in requests))

    outcomes = asyncio.run(together())
    failed = [(body, o) for (body, _), o in zip(requests, outcomes) if not o["ok"]]
    succeeded = [(body, o) for (body, _), o in zip(requests, outcomes) if o["ok"]]
    assert failed, outcomes
    for _, outcome in failed:
        assert "forward 3" in outcome["error"]["message"], outcome
        assert outcome["steps_seen"] is None or outcome["steps_seen"] <= 2, outcome
    for body, outcome in succeeded:
        check_answer(outcome["data"], body)
        assert outcome["steps_seen"] in (None, outcome["data"]["usage"]["nfe"]), outcome

    # Rows per forward add up: each survivor was in its nfe forwards; each failed job in the
    # forwards it streamed plus the failing one (a JSON failure: 1 to 3, it could be in 1..3).
    metrics = scrape(server.url)
    rows = metrics.value("llada_batch_rows_sum")
    known = sum(o["data"]["usage"]["nfe"] for _, o in succeeded) + sum(
        o["steps_seen"] + 1 for _, o in failed if o["steps_seen"] is not None
    )
    json_failed = sum(1 for _, o in failed if o["steps_seen"] is None)
    assert known + json_failed <= rows <= known + 3 * json_failed, (rows, known, json_failed)
    assert metrics.value("llada_engine_errors_total") == 1

    fresh = httpx.post(server.url + "/v1/generate", json=requests[0][0], timeout=HTTP_TIMEOUT)
    assert fresh.status_code == 200, fresh.text
    assert httpx.get(server.url + "/health", timeout=HTTP_TIMEOUT).status_code == 200
    after = scrape(server.url)
    assert after.value("llada_queue_depth") == 0 and after.value("llada_running_jobs") == 0
    assert after.value("llada_engine_errors_total") == 1


def test_an_injected_out_of_memory_is_retried_as_smaller_batches(start_server, tiny_checkpoint):
    server = start_server(
        "--model", str(tiny_checkpoint), "--inject-faults", "oom@2", "--dtype", "float32", "--shutdown-grace", "5"
    )
    # Seeded sampling over a whole 32-token block makes the first forward slow enough that all
    # four requests have arrived by the second one (the one that runs out of memory).
    bodies = [
        {
            "prompt": f"Request {i}",
            "gen_length": 32,
            "steps": 4,
            "block_length": 32,
            "temperature": 0.7,
            "seed": 100 + i,
        }
        for i in range(4)
    ]

    async def together():
        async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as client:
            return await asyncio.gather(*(client.post(server.url + "/v1/generate", json=b) for b in bodies))

    responses = asyncio.run(together())
    assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
    assert "retrying as two batches" in server.logs(), server.logs()
    with httpx.Client(timeout=HTTP_TIMEOUT) as client:
        for body, response in zip(bodies, responses):
            check_answer(response.json(), body)
            solo = client.post(server.url + "/v1/generate", json=body)
            assert solo.status_code == 200, solo.text
            assert solo.json()["token_ids"] == response.json()["token_ids"], body
    metrics = scrape(server.url)
    assert metrics.value("llada_engine_errors_total") == 0
    assert metrics.value("llada_running_jobs") == 0 and metrics.value("llada_queue_depth") == 0
