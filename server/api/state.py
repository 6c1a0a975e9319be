"""What the routes share: config, model, engine worker and its client, metrics, drain flag."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from server.api.engine_client import EngineClient
from server.config import ServerConfig
from server.engine.loader import LoadedModel
from server.engine.worker import EngineWorker
from server.metrics import Metrics


@dataclass
class ServerState:
    config: ServerConfig
    loaded: LoadedModel
    worker: EngineWorker
    client: EngineClient
    metrics: Metrics
    draining: bool = False
    in_flight: int = 0  # HTTP requests not yet fully answered (the drain waits for them)
    started_at: float = field(default_factory=time.time)
