"""The CLI as an operator meets it: --help, the demo default, LLADA_* variables, bad settings,
an unloadable model, and the startup and request logs (text and JSON)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import httpx
import pytest

from server.config import ServerConfig, env_name
from tests.support import wait_for

from . import HTTP_TIMEOUT, assert_error_response


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "server", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )


def test_help_lists_every_flag_and_its_environment_variable():
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    for f in dataclasses.fields(ServerConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in result.stdout, f"{flag} missing from --help"
        assert env_name(f.name) in result.stdout, f"{env_name(f.name)} missing from --help"


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--port", "notanumber"], "--port"),
        (["--max-queue", "0"], "--max-queue"),
    ],
    ids=["port-not-a-number", "max-queue-zero"],
)
def test_bad_setting_exits_non_zero_with_a_message(args, named):
    result = run_cli(*args)
    assert result.returncode != 0
    assert "error" in result.stderr and named in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def test_unloadable_model_exits_non_zero_with_the_reason(start_server):
    server = start_server("--model", "/nonexistent/llada", ready=False)
    assert server.proc.wait(timeout=60) != 0
    logs = server.logs()
    assert "cannot load the model" in logs and "/nonexistent/llada" in logs, logs
    assert "Traceback" not in logs, logs


def test_a_kv_pool_that_cannot_be_allocated_stops_the_start(start_server):
    server = start_server("--max-cache-memory", "4096T", ready=False)
    assert server.proc.wait(timeout=60) == 1
    logs = server.logs()
    assert "cannot start" in logs and "lower --max-cache-memory" in logs, logs
    assert "Traceback" not in logs, logs


def test_no_model_serves_the_demo_and_logs_what_it_serves(start_server):
    server = start_server()
    models = httpx.get(server.url + "/v1/models", timeout=HTTP_TIMEOUT).json()
    assert [m["id"] for m in models["data"]] == ["llada-demo"], models
    answer = httpx.post(
        server.url + "/v1/generate", json={"prompt": "Hi", "gen_length": 4, "steps": 2}, timeout=HTTP_TIMEOUT
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == "llada-demo"
    health = httpx.get(server.url + "/health", timeout=HTTP_TIMEOUT).json()
    logs = server.logs()
    startup = next(line for line in logs.splitlines() if "llada-demo" in line)
    assert "built-in demo" in startup and health["device"] in startup and health["dtype"] in startup, startup
    assert f"listening on http://127.0.0.1:{server.port}" in logs, logs


def test_environment_configures_limits_and_json_logs_and_flags_win(start_server, tiny_checkpoint):
    """LLADA_* variables take effect (a limit, the log format), a flag beats its variable, and JSON
    logs are one JSON object per line with one line per finished request."""
    server = start_server(
        "--model",
        str(tiny_checkpoint),
        "--max-steps",
        "4",
        "--shutdown-grace",
        "5",
        env={"LLADA_MAX_GEN_LENGTH": "8", "LLADA_MAX_STEPS": "100", "LLADA_LOG_FORMAT": "json"},
    )
    body = {"prompt": "Hello there", "gen_length": 8, "steps": 4, "block_length": 8}
    with httpx.Client(base_url=server.url, timeout=HTTP_TIMEOUT) as client:
        too_long = client.post("/v1/generate", json={**body, "gen_length": 9})
        error = assert_error_response(too_long, 400, "invalid_request_error")
        assert error["param"] == "gen_length" and "8" in error["message"], error
        # --max-steps 4 on the command line beats LLADA_MAX_STEPS=100.
        too_many = client.post("/v1/generate", json={**body, "steps": 5})
        assert assert_error_response(too_many, 400, "invalid_request_error")["param"] == "steps"
        response = client.post("/v1/generate", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert len(answer["token_ids"]) == 8

    def records() -> list[dict]:
        parsed = []
        for line in server.logs().splitlines():
            if line.strip():
                try:
                    parsed.append(json.loads(line))
                except json.JSONDecodeError:
                    pytest.fail(f"a log line is not JSON: {line!r}")
        return parsed

    (line,) = wait_for(lambda: [r for r in records() if r.get("id") == answer["id"]], what="the request's log line")
    assert line["endpoint"] == "/v1/generate" and line["status"] == 200, line
    assert line["prompt_tokens"] == answer["usage"]["prompt_tokens"], line
    assert line["answer_tokens"] == 8 and line["steps"] == answer["usage"]["nfe"], line
    assert 0 <= line["queue_s"] <= line["total_s"], line

    logged = records()
    assert all({"time", "level", "logger", "message"} <= set(r) for r in logged), logged
    health = httpx.get(server.url + "/health", timeout=HTTP_TIMEOUT).json()
    startup = next(r["message"] for r in logged if r["message"].startswith("model "))
    assert str(tiny_checkpoint) in startup and health["model"] in startup, startup
    assert health["device"] in startup and health["dtype"] in startup, startup
    assert any(r["message"] == f"listening on http://127.0.0.1:{server.port}" for r in logged), logged
