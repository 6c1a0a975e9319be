"""DESIGN.md's boundaries: what crosses from the HTTP layer to the engine is torch-free, and the
routes never reach the model itself."""

from __future__ import annotations

import subprocess
import sys

from tests.support import REPO_ROOT

# Everything of server/api but the composition root (app.py, which builds the engine).
API_MODULES = (
    "routes",
    "openai_routes",
    "openai_requests",
    "openai_schemas",
    "committed_text",
    "stop_strings",
    "validation",
    "schemas",
    "engine_client",
    "middleware",
    "errors",
    "state",
    "ui",
)


def test_the_api_and_the_engine_boundary_types_import_without_torch():
    modules = [f"server.api.{name}" for name in API_MODULES] + [
        "server.engine.sampling_params",
        "server.engine.events",
        "server.engine.model_info",
        "server.engine.stats",
        # The clients run on machines without a model: they start without torch.
        "server.clients.chat",
        "server.clients.server_api",
    ]
    code = "import importlib, sys\n"
    code += "".join(f"importlib.import_module({name!r})\n" for name in modules)
    code += "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
    code += "assert not loaded, loaded[:5]\n"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
