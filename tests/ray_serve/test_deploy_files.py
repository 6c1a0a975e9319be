"""The Ray deployment files (deploy/ray/) and the limits the Serve application takes from the
server's flags; none of it needs a running Ray."""

from __future__ import annotations

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from server.config import ServerConfig
from server.ray_serve.cli import build_cli_parser
from server.ray_serve.deployment import APP_NAME, build_app, deployment_options
from server.ray_serve.plan import ReplicaPlan, parse_app_args
from server.ray_serve.proxy_errors import CALLBACK, CALLBACK_ENV
from tests.support import REPO_ROOT

RAY_DEPLOY = REPO_ROOT / "deploy" / "ray"
README = (REPO_ROOT / "README.md").read_text()


def _yaml(name: str):
    return yaml.safe_load((RAY_DEPLOY / name).read_text())


def _application(config: dict) -> dict:
    (app,) = config["applications"]
    return app


def test_the_serve_config_validates_against_ray_serves_schema_and_its_args_parse():
    config = _yaml("serve.yaml")
    schema = ServeDeploySchema.model_validate(config)
    (app,) = schema.applications
    assert (app.name, app.route_prefix, app.import_path) == (APP_NAME, "/", "server.ray_serve.deployment:build_app")
    plan, server = parse_app_args(app.args)
    assert server.device == "cuda" and server.model and plan.autoscaling
    assert server.host == "0.0.0.0", "Prometheus in another pod must reach each replica's /metrics"
    build_app(app.args)  # what `serve run` imports and calls


def test_the_rayservice_manifest_embeds_the_serve_config_and_sets_the_proxy_callback():
    manifest = _yaml("rayservice.yaml")
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayService")
    assert yaml.safe_load(manifest["spec"]["serveConfigV2"]) == _yaml("serve.yaml")
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == "2.60.0"
    args = _application(_yaml("serve.yaml"))["args"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        (container,) = group["template"]["spec"]["containers"]
        env = {item["name"]: item["value"] for item in container["env"]}
        assert env[CALLBACK_ENV] == CALLBACK, "every node's proxy must load the envelope middleware"
    (workers,) = cluster["workerGroupSpecs"]
    (worker,) = workers["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1, "one GPU, one replica per pod"
    assert workers["maxReplicas"] == args["max_replicas"]
    ports = {port["name"]: port["containerPort"] for port in worker["ports"]}
    assert ports["llada-metrics"] == args["metrics_port"]
    assert workers["template"]["spec"]["terminationGracePeriodSeconds"] > args["shutdown_grace"]
    monitor = _yaml("podmonitor.yaml")
    assert "llada-metrics" in [endpoint["port"] for endpoint in monitor["spec"]["podMetricsEndpoints"]]
    assert monitor["spec"]["selector"]["matchLabels"]["ray.io/group"] == workers["groupName"]


def test_rays_limits_are_the_engines():
    config = ServerConfig(max_batch_rows=6, max_queue=9, shutdown_grace=12.0)
    fixed = deployment_options(config, ReplicaPlan(replicas=3, cpus_per_replica=2), gpus=True)
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert (fixed["max_ongoing_requests"], fixed["max_queued_requests"]) == (6, 9)
    assert fixed["backpressure_config"].status_code == 429 and fixed["backpressure_config"].retry_after_s >= 1
    assert fixed["graceful_shutdown_timeout_s"] == 12.0
    assert fixed["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 1}
    scaled = deployment_options(config, ReplicaPlan(min_replicas=1, max_replicas=4), gpus=False)
    assert scaled["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 6}
    assert "num_replicas" not in scaled and scaled["ray_actor_options"]["num_gpus"] == 0


def test_every_ray_flag_is_in_the_readme():
    for action in build_cli_parser()._actions:
        for flag in action.option_strings:
            if flag not in ("-h", "--help"):
                assert f"`{flag}`" in README, flag


def test_a_bad_arg_in_a_serve_config_says_which_and_why():
    with pytest.raises(ValueError, match="--replicas must be at least 1"):
        parse_app_args({"replicas": 0})
    with pytest.raises(ValueError, match="unrecognized arguments: --gpus"):
        parse_app_args({"gpus": 2})
    with pytest.raises(ValueError, match="--device cuda:1: each replica is given a GPU of its own"):
        parse_app_args({"device": "cuda:1"})
