"""Redeploying with fewer replicas drains: two CPU replicas of a tiny model behind Ray Serve's
proxy each run one long stream (--max-batch-rows 1 makes Ray put them on different replicas), then
the application is deployed again with one replica. Ray stops the old replicas while their streams
run (a replica stopped by scale-down, by a new version or by shutdown goes through the same
graceful stop, up to --shutdown-grace); both streams still end with their whole answer, the one the
request gets alone, and the new replica serves. Ray runs in this test's process, so the second
deployment is Ray's own API call."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time

import httpx
import pytest
import ray
from ray import serve

from server.config import ServerConfig
from server.ray_serve.cli import LOCAL_RAY
from server.ray_serve.deployment import APP_NAME, DEPLOYMENT_NAME, llada_app
from server.ray_serve.plan import ReplicaPlan
from server.ray_serve.proxy_errors import CALLBACK, CALLBACK_ENV
from tests.e2e import HTTP_TIMEOUT, astream_events, check_answer
from tests.ray_serve import free_ports
from tests.support import free_port, wait_for

# Long enough on 2 CPU cores to still be running when the replica is told to stop.
LONG = {"gen_length": 512, "steps": 512, "block_length": 32}


def deploy(config: ServerConfig, replicas: int, metrics_port: int) -> None:
    app = llada_app(config, ReplicaPlan(replicas=replicas, metrics_port=metrics_port), gpus=False)
    serve.run(app, name=APP_NAME, route_prefix="/")


def replica_states() -> dict[str, int]:
    return dict(serve.status().applications[APP_NAME].deployments[DEPLOYMENT_NAME].replica_states)


@pytest.fixture
def two_replicas(tiny_checkpoint, monkeypatch):
    ray_dir = tempfile.mkdtemp(prefix="llr", dir="/tmp")  # short: Ray's socket names must fit
    config = ServerConfig(
        model=str(tiny_checkpoint), device="cpu", dtype="float32", max_batch_rows=1, max_queue=4, shutdown_grace=60.0
    )
    port, metrics_port = free_port(), free_ports(2)
    monkeypatch.setenv(CALLBACK_ENV, CALLBACK)  # as `llada-server ray` does: the proxy's error envelopes
    ray.init(**LOCAL_RAY, num_cpus=2, _temp_dir=ray_dir)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        deploy(config, 2, metrics_port)
        yield f"http://127.0.0.1:{port}", lambda replicas: deploy(config, replicas, metrics_port)
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(ray_dir, ignore_errors=True)


def test_replicas_stopped_by_a_redeploy_finish_their_streams(two_replicas):
    url, scale_to = two_replicas
    bodies = [{**LONG, "prompt": f"A long story {i}"} for i in range(2)]

    async def redeploy_midway():
        steps = [0, 0]
        last_step_at = [0.0, 0.0]
        both_running = asyncio.Event()

        def counter(i: int):
            async def on_step(n: int) -> None:
                steps[i], last_step_at[i] = n, time.monotonic()
                if min(steps) >= 2:
                    both_running.set()

            return on_step

        async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as client:
            streams = [
                asyncio.create_task(astream_events(client, url, body, counter(i))) for i, body in enumerate(bodies)
            ]
            await asyncio.wait_for(both_running.wait(), 60)
            redeployed_at = time.monotonic()
            await asyncio.to_thread(scale_to, 1)
            ends = await asyncio.wait_for(asyncio.gather(*streams), 120)
        assert min(last_step_at) > redeployed_at, "a stream ended before its replica was told to stop"
        return ends

    ends = asyncio.run(redeploy_midway())
    wait_for(lambda: replica_states() == {"RUNNING": 1}, 60, "one replica to remain", 0.5)

    with httpx.Client(base_url=url, timeout=HTTP_TIMEOUT) as client:
        for body, (_, kind, answer) in zip(bodies, ends):
            assert kind == "done", (kind, answer)
            check_answer(answer, body)
            alone = client.post("/v1/generate", json=body)
            assert alone.status_code == 200, alone.text
            assert answer["token_ids"] == alone.json()["token_ids"], "a drained stream's answer differs"
