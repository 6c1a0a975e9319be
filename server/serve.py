"""Loading the configured model and serving it with uvicorn until SIGTERM or SIGINT."""

from __future__ import annotations

import logging
import threading
import time

import uvicorn

from server.api.app import create_app
from server.api.state import ServerState
from server.config import ServerConfig
from server.engine.errors import CheckpointError, DeviceError
from server.engine.startup import load_model, prepare_process

log = logging.getLogger("llada.server")


class DrainingServer(uvicorn.Server):
    """The first SIGTERM/SIGINT stops admissions (503), lets accepted work finish within
    --shutdown-grace, answers what is left with an error, then exits; a second one exits at once."""

    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self.state = state
        self.signalled = False

    def handle_exit(self, sig: int, frame) -> None:
        if self.signalled:
            super().handle_exit(sig, frame)
            return
        self.signalled = True
        self.state.client.engine.close()  # from here on /health says draining and new work gets 503
        log.info("signal %d: draining for up to %.0fs", sig, self.state.config.shutdown_grace)
        threading.Thread(target=self._drain, name="llada-drain", daemon=True).start()

    def _drain(self) -> None:
        deadline = time.monotonic() + self.state.config.shutdown_grace
        engine = self.state.client.engine
        if not engine.drain(self.state.config.shutdown_grace):
            log.warning("grace period over: answering unfinished requests with an error")
        engine.stop()
        # Let the last answers reach their clients before uvicorn closes the connections.
        while self.state.in_flight and time.monotonic() < deadline + 5:
            time.sleep(0.02)
        self.should_exit = True


def serve(config: ServerConfig) -> int:
    """Exit status: 0 after a clean shutdown, 1 when the model or the port fails, 2 on a bad setting."""
    try:
        loaded = load_model(config.model, config.device, config.dtype, config.batch_invariant)
    except (CheckpointError, DeviceError, ValueError) as exc:
        log.error("cannot load the model: %s", exc)
        return 1
    prepare_process(loaded.device)
    info = loaded.info
    log.info("model %s (%s) on %s, dtype %s", info.name, config.model or "built-in demo", info.device, info.dtype)
    try:
        app = create_app(config, loaded)
    except ValueError as exc:  # e.g. a malformed --inject-faults
        log.error("bad setting: %s", exc)
        return 2
    except DeviceError as exc:  # the KV-cache pool does not fit
        log.error("cannot start: %s", exc)
        return 1
    server = DrainingServer(
        uvicorn.Config(app, host=config.host, port=config.port, log_config=None, lifespan="on"),
        app.state.server,
    )
    log.info("listening on http://%s:%d", config.host, config.port)
    server.run()
    if not server.started:
        log.error("the server could not start on %s:%d (is the port in use?)", config.host, config.port)
        return 1
    return 0
