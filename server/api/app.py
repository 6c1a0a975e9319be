"""`create_app(config, loaded)`: the FastAPI application around one engine worker."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from server.api.engine_client import EngineClient
from server.api.errors import install_error_handlers
from server.api.middleware import Gate
from server.api.routes import router
from server.api.state import ServerState
from server.config import ServerConfig
from server.engine.faults import FaultInjector
from server.engine.loader import LoadedModel
from server.engine.worker import EngineWorker
from server.metrics import Metrics
from server.scheduler import Scheduler


def build_state(config: ServerConfig, loaded: LoadedModel) -> ServerState:
    metrics = Metrics()
    scheduler = Scheduler(config.max_batch_rows, config.max_queue, config.max_padding_waste)
    worker = EngineWorker(loaded, scheduler, metrics, FaultInjector(config.inject_faults))
    return ServerState(
        config=config,
        loaded=loaded,
        worker=worker,
        client=EngineClient(worker, metrics, config.request_timeout),
        metrics=metrics,
    )


def create_app(config: ServerConfig, loaded: LoadedModel) -> FastAPI:
    state = build_state(config, loaded)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.worker.start()
        try:
            yield
        finally:
            state.worker.stop()

    app = FastAPI(title="llada-server", version="0.1.0", lifespan=lifespan)
    app.state.server = state
    app.include_router(router)
    install_error_handlers(app)
    app.add_middleware(Gate, state=state)
    if config.cors_origin:  # added last = outermost: preflights and Gate's errors get CORS headers
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.cors_origin),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    return app
