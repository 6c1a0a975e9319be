"""What the routes share: config, the engine client, the model's info and metrics."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from server.api.engine_client import EngineClient
from server.config import ServerConfig
from server.engine.model_info import ModelInfo
from server.metrics import Metrics


@dataclass
class ServerState:
    config: ServerConfig
    client: EngineClient
    metrics: Metrics
    in_flight: int = 0  # HTTP requests not yet fully answered (the drain waits for them)
    started_at: float = field(default_factory=time.time)

    @property
    def info(self) -> ModelInfo:
        return self.client.info
