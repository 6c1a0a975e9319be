"""A replica's Ray health check is its engine's: an engine loop that dies, or a device failure that
ends the engine (each injected at its third forward), makes Ray replace the replica, and the new
one serves."""

from __future__ import annotations

import httpx
import pytest

from tests.e2e import HTTP_TIMEOUT, assert_error_response
from tests.ray_serve import RayServer
from tests.support import wait_for


@pytest.fixture(scope="module", params=["die@3", "fatal@3"])
def dying_server(request, tiny_checkpoint, tmp_path_factory):
    server = RayServer(
        1,
        ["--device", "cpu", "--model", str(tiny_checkpoint), "--inject-faults", request.param, "--shutdown-grace", "5"],
        tmp_path_factory.mktemp("ray") / "cli.log",
    )
    try:
        server.wait_ready()
        yield server
    finally:
        assert server.stop() == 0, server.server.logs()
        left = server.kill_leftovers()
        assert not left, f"Ray processes outlived the server: {left}"


def test_a_replica_whose_engine_died_is_replaced(dying_server):
    (first,) = dying_server.replica_labels()
    with httpx.Client(timeout=HTTP_TIMEOUT) as client:
        dead = client.post(dying_server.url + "/v1/generate", json={"prompt": "Die", "gen_length": 4, "steps": 4})
        assert_error_response(dead, 503, "server_error", "engine_dead")
        wait_for(lambda: dying_server.replica_labels() not in ([first], [None]), 60, "a new replica", 0.2)
        wait_for(lambda: client.get(dying_server.url + "/health").status_code == 200, 60, "the new replica's health")
        # The new replica's engine is as fault-injected as the first: two forwards are fine.
        answer = client.post(dying_server.url + "/v1/generate", json={"prompt": "Live", "gen_length": 2, "steps": 2})
        assert answer.status_code == 200, answer.text
