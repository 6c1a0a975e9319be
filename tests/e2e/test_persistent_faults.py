"""A persistent out-of-memory window (every forward from 2 to 400 fails, in the body or in the LM
head) with several generations, streams and scoring calls in flight: every request is answered,
the loop stays alive, /health is 200, the gauges return to 0, and once the window has passed a
fresh request gets the answer of a run without faults."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from server.engine.denoiser import generate_batch
from server.engine.likelihood import score_pairs
from server.engine.loader import load_checkpoint
from server.engine.sampling_params import SamplingParams, ScoreParams
from tests.support import scrape

from . import HTTP_TIMEOUT, assert_envelope, assert_error_response, astream_events, check_answer

GENERATE = {"prompt": "Persistent", "gen_length": 12, "steps": 6, "block_length": 12, "temperature": 0.5, "seed": 4}
SCORE = {"requests": [{"context": "abc", "continuation": " de"}], "mc_num": 8, "batch_size": 4, "seed": 1}
WINDOW_END = 400


async def outcome(client: httpx.AsyncClient, url: str, kind: str, i: int) -> str:
    """'ok' or 'failed' (with the envelope checked); anything else fails the test."""
    if kind == "stream":
        _, event, data = await astream_events(client, url, {**GENERATE, "seed": i})
        if event == "done":
            return "ok"
        assert event == "error", (event, data)
        assert_envelope(data, "server_error", "engine_error")
        return "failed"
    path, body = ("/v1/generate", {**GENERATE, "seed": i}) if kind == "json" else ("/v1/loglikelihood", SCORE)
    response = await client.post(url + path, json=body)
    if response.status_code == 200:
        return "ok"
    assert_error_response(response, 500, "server_error", "engine_error")
    return "failed"


async def in_flight(url: str, kinds: list[str]) -> list[str]:
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as client:
        return await asyncio.wait_for(
            asyncio.gather(*(outcome(client, url, kind, i) for i, kind in enumerate(kinds))), timeout=120
        )


@pytest.mark.parametrize("spec", [f"oom@2-{WINDOW_END}", f"oom@2-{WINDOW_END}:head"])
def test_a_persistent_out_of_memory_window_answers_everyone_and_passes(start_server, tiny_checkpoint, spec):
    server = start_server("--model", str(tiny_checkpoint), "--inject-faults", spec, "--shutdown-grace", "5")
    kinds = ["json", "stream", "score", "json", "stream", "score", "json", "stream"]
    results = asyncio.run(in_flight(server.url, kinds))
    assert "failed" in results, results  # the window is long: the retries as single jobs ran out of memory too
    assert httpx.get(server.url + "/health", timeout=HTTP_TIMEOUT).status_code == 200
    metrics = scrape(server.url)
    assert metrics.value("llada_queue_depth") == 0 and metrics.value("llada_running_jobs") == 0
    assert metrics.value("llada_engine_errors_total") == results.count("failed")
    assert "retrying as two batches" in server.logs()

    # Burn through the window with bursts of cheap requests (each forward counts, failed or not).
    while scrape(server.url).value("llada_batch_rows_count") <= WINDOW_END:
        asyncio.run(in_flight(server.url, ["json"] * 8))

    loaded = load_checkpoint(tiny_checkpoint, device="cpu", dtype="float32")
    response = httpx.post(server.url + "/v1/generate", json=GENERATE, timeout=HTTP_TIMEOUT)
    assert response.status_code == 200, response.text
    check_answer(response.json(), GENERATE)
    params = SamplingParams(gen_length=12, steps=6, block_length=12, temperature=0.5, seed=4)
    prompt = loaded.codec.encode(GENERATE["prompt"])
    assert response.json()["token_ids"] == generate_batch(loaded, [prompt], [params])[0]
    scored = httpx.post(server.url + "/v1/loglikelihood", json=SCORE, timeout=HTTP_TIMEOUT)
    assert scored.status_code == 200, scored.text
    context, continuation = loaded.codec.encode_pair("abc", " de")
    (clean,) = score_pairs(loaded, [(context, continuation)], ScoreParams(mc_num=8, batch_size=4, seed=1))
    assert scored.json()["results"][0]["loglikelihood"] == pytest.approx(clean.loglikelihood, rel=1e-5)
