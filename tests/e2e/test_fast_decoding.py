"""Fast decoding over real HTTP against the real CLI: eight concurrent requests mixing cache modes,
reveal rules, early stop, CFG and exact requests (JSON and streams) each get the answer they get
alone; a stream that disconnects frees its KV cache (the gauge returns to 0)."""

from __future__ import annotations

import asyncio

import httpx

from tests.support import scrape, wait_for

from . import HTTP_TIMEOUT, astream_events, check_answer, stream_events

BASE = {"gen_length": 32, "steps": 16, "block_length": 8}
MIXED = [
    ({"prompt": "The exact one", **BASE}, False),
    ({"prompt": "A prefix cache", **BASE, "cache": "prefix"}, True),
    ({"prompt": "Dual with a threshold", **BASE, "cache": "dual", "threshold": 0.2}, False),
    ({"prompt": "Factor", **BASE, "factor": 2.0, "early_stop": True}, True),
    ({"prompt": "Guided and cached", **BASE, "cache": "dual", "cfg_scale": 1.0}, False),
    (
        {"prompt": "Seeded sampling", **BASE, "cache": "prefix", "temperature": 0.8, "remasking": "random", "seed": 5},
        True,
    ),
    (
        {
            "messages": [{"role": "user", "content": "Long blocks please"}],
            "gen_length": 48,
            "steps": 12,
            "block_length": 16,
            "cache": "dual",
            "threshold": 0.3,
            "constraints": [{"position": 3, "text": "hi"}],
        },
        False,
    ),
    ({"prompt": "Short", "gen_length": 8, "steps": 8, "block_length": 4, "cache": "prefix"}, True),
]


async def answer(client: httpx.AsyncClient, url: str, body: dict, stream: bool) -> dict:
    if stream:
        steps, kind, data = await astream_events(client, url, body)
        assert kind == "done", (kind, data)
        assert len(steps) == data["usage"]["nfe"]
        return data
    response = await client.post(url + "/v1/generate", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_concurrent_requests_of_every_mode_equal_their_solo_answers(start_server, tiny_checkpoint):
    server = start_server("--model", str(tiny_checkpoint))

    async def together():
        async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as client:
            return await asyncio.gather(*(answer(client, server.url, body, stream) for body, stream in MIXED))

    concurrent = asyncio.run(together())
    with httpx.Client(timeout=HTTP_TIMEOUT) as client:
        for (body, _), got in zip(MIXED, concurrent):
            check_answer(got, {**body, "steps": body["gen_length"]})  # a threshold may take more steps
            assert got["approximate"] == any(k in body for k in ("cache", "threshold", "factor")), body
            alone = client.post(server.url + "/v1/generate", json=body).json()
            assert got["token_ids"] == alone["token_ids"], body
            assert got["usage"]["nfe"] == alone["usage"]["nfe"], body
    metrics = scrape(server.url)
    assert metrics.value("llada_kv_cache_bytes") == 0
    assert metrics.value("llada_kv_cache_capacity_bytes") > 0


def test_a_disconnecting_stream_frees_its_cache(start_server, tiny_checkpoint):
    server = start_server("--model", str(tiny_checkpoint), "--shutdown-grace", "5")
    body = {"prompt": "A long cached story", "gen_length": 1024, "steps": 1024, "block_length": 8, "cache": "dual"}
    held = []

    def on_step(n: int) -> bool:
        if n == 2:
            held.append(scrape(server.url).value("llada_kv_cache_bytes"))
            return True
        return False

    with httpx.Client(timeout=HTTP_TIMEOUT) as client:
        _, kind, _ = stream_events(client, server.url, body, on_step)
    assert kind is None and held[0] > 0
    wait_for(lambda: scrape(server.url).value("llada_kv_cache_bytes") == 0, what="the cache to be freed")
    metrics = scrape(server.url)
    assert metrics.value("llada_cancelled_total") == 1 and metrics.value("llada_running_jobs") == 0
