"""Two CPU replicas of a tiny model behind Ray Serve's proxy (`llada-server ray --replicas 2`), one
Ray for the whole module: requests spread over both (per-replica metrics say so), answers and
streams equal a single server's, the OpenAI routes (through the real SDK) and the page pass
through the proxy as they are, overload is a 429 envelope, a killed replica fails only its own
requests (with an envelope or an `error` event) and comes back, and SIGTERM drains, exits 0 and
leaves no Ray process behind; a client that hangs up cancels its job. The module's last test
stops the server; keep it last."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from importlib.resources import files

import httpx
import openai
import pytest

from server.api.ui import PAGE_FILES
from tests.e2e import HTTP_TIMEOUT, assert_envelope, astream_events, check_answer, stream_events
from tests.e2e.test_concurrency import MIXED
from tests.e2e.test_concurrency import _send as send
from tests.ray_serve import RayServer, replica_label
from tests.support import scrape, wait_for

MAX_BATCH_ROWS = 4
# Above the 10 requests sent at once below: Ray counts a request as queued while it picks its
# replica, so a burst larger than the queue can be refused even with room on the replicas.
MAX_QUEUE = 12
# Long enough to still be running when a burst of others arrives, short enough for 2 CPU cores.
SLOW = {"prompt": "A long story", "gen_length": 64, "steps": 64, "block_length": 8}


@pytest.fixture(scope="module")
def ray_server(tiny_checkpoint, tmp_path_factory):
    server = RayServer(
        2,
        [
            *("--device", "cpu", "--model", str(tiny_checkpoint), "--dtype", "float32"),
            *("--max-batch-rows", str(MAX_BATCH_ROWS), "--max-queue", str(MAX_QUEUE), "--shutdown-grace", "20"),
        ],
        tmp_path_factory.mktemp("ray") / "cli.log",
    )
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
        left = server.kill_leftovers()
        assert not left, f"Ray processes outlived the server: {left}\n{server.server.logs()}"


async def _generate(client: httpx.AsyncClient, url: str, body: dict) -> tuple[int, dict, httpx.Headers]:
    response = await client.post(url + "/v1/generate", json=body)
    return response.status_code, response.json(), response.headers


def test_requests_spread_over_both_replicas(ray_server):
    before = [scrape(ray_server.metrics_url(rank)) for rank in range(2)]

    async def six():
        async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as client:
            return await asyncio.gather(*(_generate(client, ray_server.url, SLOW) for _ in range(6)))

    assert [status for status, _, _ in asyncio.run(six())] == [200] * 6
    served = []
    for rank in range(2):
        after = scrape(ray_server.metrics_url(rank))
        label = replica_label(after.samples)
        assert label == replica_label(before[rank].samples)
        series = {"endpoint": "/v1/generate", "status": "200", "replica": label}
        served.append(after.moved(before[rank], "llada_requests_total", **series))
    # A replica takes at most --max-batch-rows requests at once, so 6 at once need both.
    assert sum(served) == 6 and min(served) >= 6 - MAX_BATCH_ROWS, served


def test_answers_and_streams_equal_a_single_servers(ray_server, start_server, tiny_checkpoint):
    single = start_server("--model", str(tiny_checkpoint), "--dtype", "float32", "--shutdown-grace", "5")

    async def answers(url: str, as_streams: bool) -> list[dict]:
        async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as client:
            return await asyncio.gather(*(send(client, url, body, as_streams and stream) for body, stream in MIXED))

    alone = asyncio.run(answers(single.url, as_streams=False))
    replicated = asyncio.run(answers(ray_server.url, as_streams=True))
    assert any(stream for _, stream in MIXED), "no request streamed through the proxy"
    for (body, _), expected, got in zip(MIXED, alone, replicated):
        check_answer(got, body)
        assert (got["token_ids"], got["text"]) == (expected["token_ids"], expected["text"]), body


def test_the_openai_routes_and_the_page_work_through_the_proxy_as_they_are(ray_server, tiny_checkpoint):
    settings = {"gen_length": 16, "steps": 8, "block_length": 8, "logits_eos_inf": True}
    openai_settings = {k: v for k, v in settings.items() if k != "gen_length"}
    chat = [{"role": "user", "content": "Hello"}]
    with httpx.Client(base_url=ray_server.url, timeout=HTTP_TIMEOUT) as client:
        native = client.post("/v1/generate", json={"prompt": "Once upon", **settings}).json()
        native_chat = client.post("/v1/generate", json={"messages": chat, **settings}).json()
        check_answer(native, settings)

        # The real SDK, plain and streamed (temperature 0: whichever replica answers, the same text).
        model = tiny_checkpoint.name
        with openai.OpenAI(base_url=ray_server.url + "/v1", api_key="unused", max_retries=0, timeout=60) as sdk:
            plain = sdk.completions.create(
                model=model, prompt="Once upon", max_tokens=16, temperature=0, extra_body=openai_settings
            )
            stream = sdk.completions.create(
                model=model, prompt="Once upon", max_tokens=16, temperature=0, stream=True, extra_body=openai_settings
            )
            streamed = "".join(chunk.choices[0].text for chunk in stream)
        assert plain.choices[0].text == streamed == native["text"]

        # A chat stream read as the bytes the proxy sends: `data:` chunks, then `data: [DONE]`.
        body = {"model": model, "messages": chat, "max_tokens": 16, "temperature": 0, "stream": True}
        with client.stream("POST", "/v1/chat/completions", json={**body, **openai_settings}) as response:
            assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
            data = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
        assert data[-1] == "[DONE]", data[-3:]
        choices = [choice for chunk in data[:-1] for choice in json.loads(chunk)["choices"]]
        assert "".join(c["delta"].get("content") or "" for c in choices) == native_chat["text"]
        assert choices[-1]["finish_reason"] == native_chat["finish_reason"]

        # The page and its files, byte for byte as the package ships them.
        static = files("server.api") / "static"
        for path, (name, media_type) in PAGE_FILES.items():
            response = client.get(path)
            assert response.status_code == 200, (path, response.status_code)
            assert response.headers["content-type"] == media_type, path
            assert response.content == (static / name).read_bytes(), path
        assert "<title>llada-server</title>" in client.get("/").text


def test_a_client_that_hangs_up_on_the_proxy_cancels_its_job(ray_server):
    def totals() -> tuple[float, float]:
        scrapes = [scrape(ray_server.metrics_url(rank)) for rank in range(2)]
        cancelled = running = 0.0
        for metrics in scrapes:
            label = replica_label(metrics.samples)
            cancelled += metrics.value("llada_cancelled_total", replica=label)
            running += metrics.value("llada_running_jobs", replica=label)
        return cancelled, running

    cancelled_before, _ = totals()
    body = {"prompt": "A long story", "gen_length": 512, "steps": 512, "block_length": 8}
    with httpx.Client(timeout=HTTP_TIMEOUT) as client:
        _, kind, _ = stream_events(client, ray_server.url, body, on_step=lambda n: n >= 2)
    assert kind is None  # we hung up after two step events
    wait_for(lambda: totals() == (cancelled_before + 1, 0), 30, "the job to be cancelled through the proxy")


def test_overload_past_the_queues_answers_429_with_the_envelope_at_once(ray_server):
    # Each replica runs --max-batch-rows requests and the proxy queues --max-queue more.
    flood = 3 * (2 * MAX_BATCH_ROWS + MAX_QUEUE)

    async def timed(client: httpx.AsyncClient) -> tuple[float, int, dict, httpx.Headers]:
        start = time.monotonic()
        status, body, headers = await _generate(client, ray_server.url, SLOW)
        return time.monotonic() - start, status, body, headers

    async def send_flood():
        async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as client:
            return await asyncio.gather(*(timed(client) for _ in range(flood)))

    results = asyncio.run(send_flood())
    assert {status for _, status, _, _ in results} == {200, 429}, [status for _, status, _, _ in results]
    for seconds, status, body, headers in results:
        if status == 200:
            check_answer(body, SLOW)
        else:
            assert_envelope(body, "overloaded", "queue_full")
            assert int(headers["retry-after"]) >= 1
            assert seconds < 5, f"a refusal took {seconds:.1f}s: it waited instead of being answered at once"


def test_a_killed_replica_fails_only_its_requests_and_ray_brings_it_back(ray_server):
    labels = ray_server.replica_labels()
    streamed = [{**SLOW, "prompt": f"Stream {i}"} for i in range(4)]
    plain = [{**SLOW, "prompt": f"Plain {i}"} for i in range(4)]

    def running(rank: int) -> float:
        return scrape(ray_server.metrics_url(rank)).value("llada_running_jobs", replica=labels[rank])

    async def kill_one_midway():
        async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as client:
            streams = [asyncio.create_task(astream_events(client, ray_server.url, body)) for body in streamed]
            posts = [asyncio.create_task(_generate(client, ray_server.url, body)) for body in plain]
            await asyncio.to_thread(wait_for, lambda: running(0) and running(1), 30, "work on both replicas", 0.02)
            victim = ray_server.replica_pids()[0]
            os.kill(victim, signal.SIGKILL)
            return await asyncio.wait_for(asyncio.gather(*streams), 60), await asyncio.wait_for(
                asyncio.gather(*posts), 60
            )

    stream_ends, post_ends = asyncio.run(kill_one_midway())
    failed = 0
    for body, (_, kind, data) in zip(streamed, stream_ends):
        assert kind in ("done", "error"), (kind, data)
        if kind == "done":
            check_answer(data, body)
        else:
            assert_envelope(data, "server_error", "replica_failed")
            failed += 1
    for body, (status, data, _) in zip(plain, post_ends):
        if status == 200:
            check_answer(data, body)
        else:
            assert status == 500, (status, data)
            assert_envelope(data, "server_error", "replica_failed")
            failed += 1
    assert 1 <= failed <= MAX_BATCH_ROWS, "only the killed replica's requests may fail"

    with httpx.Client(timeout=HTTP_TIMEOUT) as client:  # the other replica serves at once
        for _ in range(4):
            response = client.post(ray_server.url + "/v1/generate", json={"prompt": "Still there?", "gen_length": 8})
            assert response.status_code == 200, response.text

    def back() -> bool:
        now = ray_server.replica_labels()
        return None not in now and len(set(now)) == 2 and set(now) != set(labels)

    wait_for(back, 120, "Ray to bring the replica back", 0.5)
    assert len(set(ray_server.replica_labels()) - set(labels)) == 1


def test_sigterm_drains_the_streams_exits_0_and_leaves_no_ray_process(ray_server):
    body = {**SLOW, "prompt": "Finish me"}

    def refused() -> httpx.Response | None:
        response = httpx.post(ray_server.url + "/v1/generate", json={"prompt": "Too late", "gen_length": 2})
        return response if response.status_code != 200 else None

    async def streams_then_sigterm():
        started = asyncio.Event()

        async def on_step(n: int) -> None:
            started.set()

        async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as client:
            streams = [asyncio.create_task(astream_events(client, ray_server.url, body, on_step)) for _ in range(2)]
            await asyncio.wait_for(started.wait(), 30)
            ray_server.server.proc.send_signal(signal.SIGTERM)
            # The application's route goes first, then its replicas finish what they hold.
            late = await asyncio.to_thread(wait_for, refused, 20, "new requests to be refused", 0.05)
            return await asyncio.wait_for(asyncio.gather(*streams), 40), late

    ends, late = asyncio.run(streams_then_sigterm())
    for _, kind, data in ends:
        assert kind == "done", (kind, data)
        check_answer(data, body)
    assert late.status_code == 503, late.text
    assert_envelope(late.json(), "overloaded", "unavailable")
    assert ray_server.server.proc.wait(timeout=60) == 0, ray_server.server.logs()
    wait_for(lambda: not ray_server.processes(), 15, "every Ray process to exit")
