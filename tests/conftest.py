"""Shared fixtures: tiny real models, an in-process app, and the real CLI in a subprocess."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from server.api.app import create_app
from server.config import ServerConfig
from server.engine.demo import build_demo, demo_config, save_checkpoint
from server.engine.loader import LoadedModel
from tests.support import ServerProcess

# Small enough that a step takes milliseconds on a CPU, big enough to be a real transformer.
TINY = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=64)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """For a module of plain references (many matmuls of a few dozen values): one intra-op thread,
    so a busy second core cannot stall every op at an OpenMP barrier (measured: a LLaDA2 reference
    answer 0.23 s on one thread, 31 s on two beside a busy process); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            client.state = app.state.server
            yield client
    finally:
        # The engine's KV pool (2 GiB of address space on CPU by default) goes with the app only
        # when its reference cycles are collected; left for later, a session of these makes the
        # address space so large that fork (subprocess, Ray, pty) fails with ENOMEM.
        del app
        gc.collect()


@pytest.fixture
def client(tiny_model) -> Iterator[TestClient]:
    with app_client(tiny_model) as c:
        yield c


@pytest.fixture
def start_server(tmp_path) -> Iterator:
    """start_server(*cli_args, env={}) -> a ready ServerProcess running the real CLI."""
    started: list[ServerProcess] = []

    def start(*args: str, env: dict[str, str] | None = None, ready: bool = True) -> ServerProcess:
        server = ServerProcess(list(args), tmp_path / f"server-{len(started)}.log", env)
        started.append(server)
        if ready:
            server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop()
