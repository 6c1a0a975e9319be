"""Each replica's own /metrics, on a port of its own, every sample labelled with the replica.

Through Ray's proxy, GET /metrics reaches whichever replica Ray picks, so Prometheus scrapes each
replica directly: replica i on a node listens on --metrics-port + i (its local rank, which a
replacement replica takes over), and every sample carries replica="<Ray's replica id>", the same
label Ray puts on its own ray_serve_* series. The server's own gate stands in front, so the API
key applies as on the server's /metrics and scrapes count in llada_requests_total as they do there.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import socket
from collections.abc import Iterator

import uvicorn
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server.api.middleware import OPEN_PATHS, Gate
from server.api.state import ServerState

log = logging.getLogger("llada.ray")


class ReplicaLabelled:
    """A prometheus collector: the registry's families with replica=<id> added to every sample."""

    def __init__(self, registry: CollectorRegistry, replica: str):
        self.registry = registry
        self.replica = replica

    def collect(self) -> Iterator[Metric]:
        for family in self.registry.collect():
            labelled = copy.copy(family)
            labelled.samples = [s._replace(labels={**s.labels, "replica": self.replica}) for s in family.samples]
            yield labelled


def metrics_app(state: ServerState, replica: str) -> Gate:
    collector = ReplicaLabelled(state.metrics.registry, replica)

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(collector), media_type=CONTENT_TYPE_PLAIN_0_0_4)

    return Gate(Starlette(routes=[Route("/metrics", metrics)]), state=state, open_paths=OPEN_PATHS)


class _ReplicaServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # a replica's signals are Ray's to handle


class ReplicaMetrics:
    def __init__(self, server: uvicorn.Server, task: asyncio.Task):
        self.server = server
        self.task = task

    @classmethod
    async def start(cls, state: ServerState, replica: str, port: int) -> ReplicaMetrics:
        host = state.config.host
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise RuntimeError(
                f"cannot serve this replica's metrics on {host}:{port} ({exc.strerror}): "
                "free that port or choose another --metrics-port"
            ) from None
        app = metrics_app(state, replica)
        config = uvicorn.Config(app, log_config=None, log_level="warning", lifespan="off", access_log=False)
        server = _ReplicaServer(config)
        task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
        log.info("replica %s: metrics on http://%s:%d/metrics", replica, host, port)
        return cls(server, task)

    async def stop(self) -> None:
        self.server.should_exit = True
        await self.task
