"""Many clients at once against the real server: batched answers equal solo answers, batching is
visible in /metrics, a client that hangs up (stream or plain JSON) stops costing steps, and a
full queue answers 429 at once while everything it accepted still completes."""

from __future__ import annotations

import asyncio
import contextlib
import time

import httpx

from tests.support import scrape, wait_for

from . import HTTP_TIMEOUT, assert_envelope, astream_events, check_answer, stream_events

LONG_PROMPT = "The quick brown fox jumps over the lazy dog while the diffusion model unmasks tokens. "

# Mixed prompt lengths, answer lengths and settings; (body, stream). Every one is deterministic:
# temperature 0, or sampling with a seed.
MIXED = [
    ({"prompt": "Hi", "gen_length": 8, "steps": 8}, False),
    ({"prompt": LONG_PROMPT, "gen_length": 16, "steps": 16, "block_length": 4}, True),
    ({"prompt": "Classifier-free guidance", "gen_length": 16, "steps": 8, "block_length": 8, "cfg_scale": 1.5}, False),
    (
        {
            "prompt": "Random remasking",
            "gen_length": 16,
            "steps": 16,
            "block_length": 8,
            "remasking": "random",
            "seed": 7,
        },
        True,
    ),
    (
        {"prompt": "Sample warmly", "gen_length": 16, "steps": 8, "block_length": 4, "temperature": 0.8, "seed": 11},
        False,
    ),
    (
        {
            "prompt": "Pinned words",
            "gen_length": 16,
            "steps": 8,
            "constraints": [{"position": 0, "text": "hi"}, {"position": 10, "token_id": 65}],
        },
        True,
    ),
    (
        {
            "messages": [{"role": "user", "content": "Say something."}],
            "gen_length": 12,
            "steps": 6,
            "block_length": 4,
            "logits_eos_inf": True,
        },
        False,
    ),
    (
        {
            "input_ids": list(range(40, 72)),
            "gen_length": 16,
            "steps": 8,
            "block_length": 4,
            "temperature": 0.5,
            "seed": 3,
            "remasking": "random",
            "confidence_eos_eot_inf": True,
            "cfg_scale": 0.5,
        },
        True,
    ),
    ({"prompt": LONG_PROMPT[:40], "gen_length": 12, "steps": 6, "block_length": 6, "seed": 5}, False),
]


async def _send(client: httpx.AsyncClient, url: str, body: dict, stream: bool) -> dict:
    if stream:
        steps, kind, data = await astream_events(client, url, body)
        assert kind == "done", (kind, data)
        assert len(steps) == data["usage"]["nfe"], (len(steps), data["usage"])
        revealed = {u["index"]: u["token_id"] for step in steps for u in step["unmasked"]}
        assert all(data["token_ids"][i] == t for i, t in revealed.items()), "a streamed reveal differs from the answer"
        return data
    response = await client.post(url + "/v1/generate", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_concurrent_mixed_requests_batch_and_equal_their_solo_answers(start_server, tiny_checkpoint):
    # float32 pins the exactness DESIGN.md promises ("for every batch composition") on any device.
    server = start_server("--model", str(tiny_checkpoint), "--dtype", "float32", "--shutdown-grace", "5")

    async def together() -> list[dict]:
        async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as client:
            return await asyncio.gather(*(_send(client, server.url, body, stream) for body, stream in MIXED))

    batched = asyncio.run(together())
    for (body, _), answer in zip(MIXED, batched):
        check_answer(answer, body)
    hi = httpx.post(server.url + "/v1/tokenize", json={"prompt": " hi"}, timeout=HTTP_TIMEOUT).json()["tokens"]
    pinned = batched[5]["token_ids"]
    assert pinned[: len(hi)] == hi and pinned[10] == 65, pinned

    # Batching happened: fewer forwards than the jobs' steps, and some forward carried more rows
    # than any single request here (a CFG request alone has 2).
    metrics = scrape(server.url)
    forwards = metrics.value("llada_batch_rows_count")
    job_steps = sum(answer["usage"]["nfe"] for answer in batched)
    assert forwards < job_steps, (forwards, job_steps)
    assert metrics.batches_over(2) > 0, "no forward carried more than 2 rows"

    with httpx.Client(timeout=HTTP_TIMEOUT) as client:
        for (body, _), answer in zip(MIXED, batched):
            solo = client.post(server.url + "/v1/generate", json=body)
            assert solo.status_code == 200, solo.text
            assert solo.json()["token_ids"] == answer["token_ids"], f"batched answer differs from solo for {body}"
            assert solo.json()["text"] == answer["text"]


def test_a_disconnecting_stream_stops_consuming_steps(start_server, tiny_checkpoint):
    server = start_server("--model", str(tiny_checkpoint), "--shutdown-grace", "5")
    before = scrape(server.url)
    # Long enough that it cannot finish before the server notices the hang-up, even on a fast CPU.
    body = {"prompt": "A long story", "gen_length": 512, "steps": 512, "block_length": 8}
    with httpx.Client(timeout=HTTP_TIMEOUT) as client:
        steps, kind, _ = stream_events(client, server.url, body, on_step=lambda n: n >= 2)
    assert kind is None and len(steps) == 2  # we hung up after two step events

    def cancelled():
        now = scrape(server.url)
        done = (
            now.value("llada_running_jobs") == 0
            and now.value("llada_cancelled_total") == before.value("llada_cancelled_total") + 1
        )
        return now if done else None

    after = wait_for(cancelled, timeout=15, what="the disconnected job to be cancelled")
    taken = after.value("llada_denoise_steps_total") - before.value("llada_denoise_steps_total")
    assert 2 <= taken <= 16, f"{taken} steps ran for a job whose client left after 2 (it would take 512)"
    time.sleep(0.3)  # the one fixed gap: a counter that is still moving would move in this time
    assert scrape(server.url).value("llada_denoise_steps_total") == after.value("llada_denoise_steps_total")
    assert after.value("llada_queue_depth") == 0


def test_a_disconnecting_json_request_stops_consuming_steps(start_server, tiny_checkpoint):
    """DESIGN.md's reliability promise "cancellation on disconnect" covers a plain JSON request too:
    a client that gives up (a timeout, a killed process) must not leave its job running."""
    server = start_server("--model", str(tiny_checkpoint), "--shutdown-grace", "5")
    before = scrape(server.url)
    body = {"prompt": "A long story", "gen_length": 512, "steps": 512, "block_length": 8}

    async def hang_up() -> None:
        async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as client:
            request = asyncio.create_task(client.post(server.url + "/v1/generate", json=body))
            await asyncio.to_thread(
                wait_for, lambda: scrape(server.url).value("llada_running_jobs") == 1, 15, "the job to start", 0.01
            )
            request.cancel()  # drops the connection mid-request
            with contextlib.suppress(asyncio.CancelledError):
                await request

    asyncio.run(hang_up())
    after = wait_for(
        lambda: (lambda m: m if m.value("llada_running_jobs") == 0 else None)(scrape(server.url)),
        timeout=60,
        what="the job to leave the running batch",
    )
    taken = after.value("llada_denoise_steps_total") - before.value("llada_denoise_steps_total")
    assert after.value("llada_cancelled_total") == before.value("llada_cancelled_total") + 1, (
        f"the client hung up but its job was not cancelled: it ran {taken:.0f} of 512 steps"
    )
    assert taken < 64, taken


def test_a_full_queue_answers_429_at_once_and_accepted_requests_complete(start_server, tiny_checkpoint):
    server = start_server(
        "--model", str(tiny_checkpoint), "--max-queue", "2", "--max-batch-rows", "2", "--shutdown-grace", "5"
    )
    # Long enough that the first accepted pair is still running when the last request arrives.
    body = {"prompt": "Busy server", "gen_length": 64, "steps": 64, "block_length": 4}

    async def one(client: httpx.AsyncClient, i: int) -> tuple[float, int, dict, httpx.Headers | dict]:
        start = time.monotonic()
        if i % 2:
            steps, kind, data = await astream_events(client, server.url, body)
            if kind == "http":
                return time.monotonic() - start, data["status"], data["body"], data["headers"]
            assert kind == "done", (kind, data)
            return time.monotonic() - start, 200, data, {}
        response = await client.post(server.url + "/v1/generate", json=body)
        return time.monotonic() - start, response.status_code, response.json(), response.headers

    async def burst():
        async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as client:
            return await asyncio.gather(*(one(client, i) for i in range(8)))

    results = asyncio.run(burst())
    statuses = sorted(status for _, status, _, _ in results)
    assert set(statuses) <= {200, 429}, statuses
    rejected = [r for r in results if r[1] == 429]
    accepted = [r for r in results if r[1] == 200]
    assert rejected and len(accepted) >= 2, statuses
    for _, _, data, headers in rejected:
        assert_envelope(data, "overloaded", "queue_full")
        assert int(headers["retry-after"]) >= 1, headers
    for _, _, data, _ in accepted:
        check_answer(data, body)
    # "At once": every refusal came back before any accepted request finished.
    assert max(r[0] for r in rejected) < min(r[0] for r in accepted), results
    metrics = scrape(server.url)
    assert metrics.value("llada_rejected_total", reason="queue_full") == len(rejected)
    assert metrics.value("llada_running_jobs") == 0 and metrics.value("llada_queue_depth") == 0
    # The queue has room again.
    small = {**body, "gen_length": 4, "steps": 2, "block_length": 4}
    again = httpx.post(server.url + "/v1/generate", json=small, timeout=HTTP_TIMEOUT)
    assert again.status_code == 200, again.text
