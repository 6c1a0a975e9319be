"""If the engine thread dies, /health says so and nobody waits forever."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from tests.api import assert_error
from tests.conftest import app_client
from tests.support import wait_for


def test_dead_engine_answers_everyone_and_health_turns_503(tiny_model):
    with app_client(tiny_model, inject_faults="die@1") as client:
        response = client.post("/v1/generate", json={"prompt": "hello", "gen_length": 8, "steps": 4})
        assert_error(response, 503, "server_error", code="engine_dead")
        wait_for(lambda: client.get("/health").status_code == 503)
        assert client.get("/health").json()["status"] == "dead"
        # New work is refused at once instead of queueing behind a dead loop.
        assert_error(
            client.post("/v1/generate", json={"prompt": "x", "gen_length": 8, "steps": 4}),
            503,
            "server_error",
            code="engine_dead",
        )
        gauges = client.get("/metrics").text
        assert "llada_queue_depth 0.0" in gauges and "llada_running_jobs 0.0" in gauges


def test_a_device_failure_ends_the_engine_and_answers_every_request(tiny_model):
    # fatal@3: the third forward loses the device context, as an illegal address does on CUDA; every
    # later forward would fail too. Requests run (two rows at a time) and wait in the queue when it
    # strikes: each is answered with an error, none hangs, and /health turns 503 for good.
    with app_client(tiny_model, inject_faults="fatal@3", max_batch_rows=2) as client:
        bodies = [{"prompt": f"request {i}", "gen_length": 8, "steps": 8, "seed": i} for i in range(6)]
        with ThreadPoolExecutor(len(bodies)) as pool:
            responses = list(pool.map(lambda body: client.post("/v1/generate", json=body), bodies))
        for response in responses:
            assert_error(response, 503, "server_error", code="engine_dead")
            assert "device failure" in response.json()["error"]["message"]
        assert client.get("/health").status_code == 503
        gauges = client.get("/metrics").text
        assert "llada_queue_depth 0.0" in gauges and "llada_running_jobs 0.0" in gauges
        assert "llada_kv_cache_bytes 0.0" in gauges
