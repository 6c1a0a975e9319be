"""If the engine thread dies, /health says so and nobody waits forever."""

from __future__ import annotations

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
