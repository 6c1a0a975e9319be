"""Shared fixtures: tiny real models, an in-process app, and the real CLI in a subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from server.api import create_app
from server.config import ServerConfig
from server.engine.demo import build_demo, demo_config, save_checkpoint
from server.engine.loader import LoadedModel

# Small enough that a step takes milliseconds on a CPU, big enough to be a real transformer.
TINY = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=64)


@pytest.fixture(scope="session")
def tiny_model() -> LoadedModel:
    return build_demo(demo_config(**TINY), seed=0)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_model) -> Path:
    return save_checkpoint(tiny_model, tmp_path_factory.mktemp("ckpt") / "tiny-llada")


@contextmanager
def app_client(loaded: LoadedModel, **settings) -> Iterator[TestClient]:
    """The in-process app (worker thread included) with the given ServerConfig fields."""
    app = create_app(ServerConfig(**settings), loaded)
    with TestClient(app, raise_server_exceptions=False) as client:
        client.state = app.state.server
        yield client


@pytest.fixture
def client(tiny_model) -> Iterator[TestClient]:
    with app_client(tiny_model) as c:
        yield c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, args: list[str], env: dict[str, str], log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server", "--port", str(self.port), *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **env},
        )

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"server not ready after {timeout}s:\n{self.logs()}")

    def logs(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture
def start_server(tmp_path) -> Iterator:
    """start_server(*cli_args, env={}) -> a ready ServerProcess running the real CLI."""
    started: list[ServerProcess] = []

    def start(*args: str, env: dict[str, str] | None = None, ready: bool = True) -> ServerProcess:
        server = ServerProcess(list(args), env or {}, tmp_path / f"server-{len(started)}.log")
        started.append(server)
        if ready:
            server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop()
