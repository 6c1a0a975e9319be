"""`create_app(config)`: the FastAPI application around one engine (which owns the model)."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from server.api.engine_client import EngineClient
from server.api.errors import install_error_handlers
from server.api.middleware import OPEN_PATHS, Gate
from server.api.openai_routes import router as openai_router
from server.api.routes import router
from server.api.state import ServerState
from server.api.ui import PAGE_FILES, page_router
from server.config import ServerConfig, parse_size
from server.engine.engine import Engine, EngineSettings
from server.engine.loader import LoadedModel
from server.engine.startup import load_model
from server.metrics import Metrics


def engine_settings(config: ServerConfig) -> EngineSettings:
    return EngineSettings(
        max_batch_rows=config.max_batch_rows,
        max_queue=config.max_queue,
        max_cache_bytes=parse_size(config.max_cache_memory),
        inject_faults=config.inject_faults,
    )


def create_app(config: ServerConfig, loaded: LoadedModel | None = None) -> FastAPI:
    """The app and its engine; the model is loaded from config unless one is given (tests share one)."""
    metrics = Metrics()
    engine = Engine(
        loaded or load_model(config.model, config.device, config.dtype, config.batch_invariant),
        engine_settings(config),
        metrics,
    )
    state = ServerState(config=config, client=EngineClient(engine, config.request_timeout), metrics=metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="llada-server", version="0.1.0", lifespan=lifespan)
    app.state.server = state
    app.include_router(router)
    app.include_router(openai_router)
    open_paths = OPEN_PATHS
    if not config.no_ui:
        # The page itself is public static text; the API calls it makes carry the key.
        app.include_router(page_router())
        open_paths += tuple(PAGE_FILES)
    install_error_handlers(app)
    app.add_middleware(Gate, state=state, open_paths=open_paths)
    if config.cors_origin:  # added last = outermost: preflights and Gate's errors get CORS headers
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.cors_origin),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    return app
