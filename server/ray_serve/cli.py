"""`llada-server ray`: the server on N replicas behind Ray Serve's HTTP proxy, until SIGTERM/SIGINT.

It starts a Ray of its own on this machine (small: no dashboard, a small object store) or joins
one (--address); every other flag is the server's and configures each replica, --host/--port
being the proxy's address. SIGTERM/SIGINT removes the application, which lets each replica finish
its requests for up to --shutdown-grace; a Ray started here is then shut down with it.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import signal
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from server.config import ServerConfig
from server.logging_setup import configure_logging
from server.ray_serve.plan import ReplicaPlan, add_plan_args, parse_replica_args

if TYPE_CHECKING:  # Ray is imported only once the flags are good
    from ray.serve.schema import ServeStatus

log = logging.getLogger("llada.ray")

# Requests and answers are small and each replica loads its model itself, never through Ray's
# object store; the rest of Ray's defaults are sized for clusters, not a laptop or CI.
LOCAL_RAY = {"include_dashboard": False, "object_store_memory": 100 * 2**20}


def build_cli_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llada-server ray",
        description="Serve on several replicas (one engine per device) behind Ray Serve's HTTP proxy.",
        epilog="Every other flag is the server's own (see llada-server --help) and applies to each replica; "
        "--host and --port are the proxy's address.",
        allow_abbrev=False,
    )
    parser.add_argument(
        "--address", default=None, help="Ray cluster to join (auto, or HOST:PORT of its head); unset: start Ray here"
    )
    add_plan_args(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 after a clean shutdown, 1 when Ray or the deployment fails, 2 on a bad flag."""
    args, plan, config = parse_replica_args(build_cli_parser(), argv)
    configure_logging(config.log_format, config.log_level)
    if importlib.util.find_spec("ray") is None:
        log.error("llada-server ray needs Ray Serve: pip install 'llada-server[ray]' (or -e '.[ray]' in a checkout)")
        return 1
    return run(config, plan, args.address)


def resource_problem(plan: ReplicaPlan, gpus: bool, resources: dict[str, float]) -> str | None:
    first = plan.min_replicas if plan.autoscaling else plan.replicas
    cpus = first * plan.cpus_per_replica
    if resources.get("CPU", 0) < cpus:
        return (
            f"{first} replicas of {plan.cpus_per_replica:g} CPUs need {cpus:g} CPUs and Ray has "
            f"{resources.get('CPU', 0):g}: lower --replicas or --cpus-per-replica"
        )
    if gpus and resources.get("GPU", 0) < first:
        return f"{first} GPU replicas need {first} GPUs and Ray has {resources.get('GPU', 0):g}: lower --replicas"
    return None


def run(config: ServerConfig, plan: ReplicaPlan, address: str | None) -> int:
    import ray
    from ray import serve

    from server.ray_serve.deployment import APP_NAME, llada_app, uses_gpus
    from server.ray_serve.proxy_errors import CALLBACK, CALLBACK_ENV

    local = address is None
    if local:
        # Ray's proxies inherit this from the Ray started here; a cluster's own nodes need it set.
        os.environ.setdefault(CALLBACK_ENV, CALLBACK)
        ray.init(**LOCAL_RAY, logging_level=logging.WARNING)
    else:
        ray.init(address=address, logging_level=logging.WARNING)
    stop = _stop_on_signals()
    try:
        gpus = uses_gpus(config)
        problem = resource_problem(plan, gpus, ray.cluster_resources())
        if problem and local:
            log.error("%s", problem)
            return 1
        if problem:
            log.warning("%s (waiting for the cluster to grow)", problem)
        serve.start(http_options={"host": config.host, "port": config.port})
        try:
            serve.run(llada_app(config, plan, gpus), name=APP_NAME, route_prefix="/")
        except RuntimeError as exc:
            log.error("the replicas did not start: %s%s", exc, _last_error_line(serve.status(), APP_NAME))
            return 1
        kind = "GPU" if gpus else "CPU"
        count = f"{plan.min_replicas} to {plan.max_replicas}" if plan.autoscaling else str(plan.replicas)
        log.info("listening on http://%s:%d: %s %s replicas", config.host, config.port, count, kind)
        log.info("each replica's /metrics: port %d + the replica's rank on its node", plan.metrics_port)
        while not stop.wait(0.5):
            pass
        log.info("stopping: each replica finishes its requests for up to %.0fs", config.shutdown_grace)
        serve.delete(APP_NAME)
        return 0
    finally:
        if local:
            serve.shutdown()
        ray.shutdown()


def _last_error_line(status: ServeStatus, app_name: str) -> str:
    """The line of a failed deployment's message that says why (Ray's ends with the exception)."""
    app = status.applications.get(app_name)
    lines = [line for d in (app.deployments.values() if app else ()) for line in d.message.splitlines() if line]
    return f" ({lines[-1].strip()})" if lines else ""


def _stop_on_signals() -> threading.Event:
    """The first SIGTERM/SIGINT sets the event; a second one stops waiting for the drain."""
    stop = threading.Event()

    def on_signal(sig: int, frame) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stop
