"""The Serve application: one deployment whose replicas each build the server's own app
(`create_app`, engine and model included) on a device of their own, behind Ray Serve's HTTP proxy.

Ray's limits are the engine's: a replica takes at most --max-batch-rows requests (one batch), the
rest wait in the proxy's queue for the first replica with room, and past --max-queue waiting there
the proxy answers 429 with Retry-After. A replica's health check is its engine's; a replica that
Ray stops (scale-down, shutdown, a new version) first finishes its requests for up to
--shutdown-grace. `build_app` is the import path of Serve config files (deploy/ray/serve.yaml).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

import ray
from ray import serve
from ray.serve import Application
from ray.serve.config import BackpressureConfig

from server.api.state import ServerState
from server.config import ServerConfig
from server.logging_setup import configure_logging
from server.ray_serve.plan import ReplicaPlan, parse_app_args
from server.ray_serve.replica_metrics import ReplicaMetrics

APP_NAME = "llada"
DEPLOYMENT_NAME = "llada"
RETRY_AFTER_S = 1  # what Retry-After says when the proxy's queue is full
# After the app's shutdown answered what was left, how long those answers get to leave.
LAST_ANSWERS_S = 5.0


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class LladaReplica:
    def __init__(self, config: ServerConfig, metrics_port: int):
        self.config = config
        self.metrics_port = metrics_port
        self.state: ServerState | None = None  # set once the app is built
        self.metrics: ReplicaMetrics | None = None

    async def __serve_build_asgi_app__(self):
        # Imported here: the driver and the proxy never load torch or a model.
        from server.api.app import create_app
        from server.engine.devices import resolve_device
        from server.engine.startup import prepare_process

        configure_logging(self.config.log_format, self.config.log_level)
        # Loading the model takes minutes for 8B; the replica's event loop stays free meanwhile.
        app = await asyncio.to_thread(create_app, self.config)  # Ray runs its lifespan: the engine starts
        prepare_process(resolve_device(self.config.device))
        self.state = app.state.server
        context = serve.get_replica_context()
        self.metrics = await ReplicaMetrics.start(
            self.state, replica=context.replica_tag, port=self.metrics_port + context.rank.local_rank
        )
        return app

    def check_health(self) -> None:
        """Ray calls this every few seconds; raising makes it replace the replica."""
        if not self.state.client.stats().alive:
            raise RuntimeError("the engine loop is not running (its error is in this replica's log)")

    async def __del__(self):
        # Ray has drained this replica (up to graceful_shutdown_timeout_s) and run the app's
        # shutdown, which answered any request still held with an error: let those answers out.
        deadline = time.monotonic() + LAST_ANSWERS_S
        while self.state is not None and self.state.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self.metrics is not None:
            await self.metrics.stop()


def uses_gpus(config: ServerConfig) -> bool:
    """cuda: a GPU per replica; cpu: none; auto: GPUs when the cluster has any now."""
    if config.device == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return config.device == "cuda"


def deployment_options(config: ServerConfig, plan: ReplicaPlan, gpus: bool) -> dict:
    if plan.autoscaling:
        # At the target a replica's batch is full; requests waiting in the proxy push past it.
        scale = {
            "autoscaling_config": {
                "min_replicas": plan.min_replicas,
                "max_replicas": plan.max_replicas,
                "target_ongoing_requests": config.max_batch_rows,
            }
        }
    else:
        scale = {"num_replicas": plan.replicas}
    return {
        **scale,
        "max_ongoing_requests": config.max_batch_rows,
        "max_queued_requests": config.max_queue,
        "backpressure_config": BackpressureConfig(status_code=429, retry_after_s=RETRY_AFTER_S),
        "graceful_shutdown_timeout_s": config.shutdown_grace,
        "graceful_shutdown_wait_loop_s": 0.5,
        "health_check_period_s": 2.0,
        # A replica that cannot load its model fails the same way each time: say so after a few tries.
        "max_constructor_retry_count": 3,
        "ray_actor_options": {"num_cpus": plan.cpus_per_replica, "num_gpus": 1 if gpus else 0},
        # Each request already gets its one log line from the server; Ray's access line would repeat it.
        "logging_config": {"enable_access_log": False},
    }


def llada_app(config: ServerConfig, plan: ReplicaPlan, gpus: bool) -> Application:
    replica_config = dataclasses.replace(config, device="cuda" if gpus else "cpu")
    return LladaReplica.options(**deployment_options(config, plan, gpus)).bind(replica_config, plan.metrics_port)


def build_app(args: dict) -> Application:
    """`import_path: server.ray_serve.deployment:build_app`; `args` are the flags of `llada-server
    ray` (and the server's) with underscores: {model: /models/x, device: cuda, replicas: 2}."""
    plan, config = parse_app_args(args)
    return llada_app(config, plan, uses_gpus(config))
