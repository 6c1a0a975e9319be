"""Property-based fuzzing of the OpenAPI schema (schemathesis + hypothesis), bounded in cases
and time: whatever a client sends, no 5xx, no hang, and every response matches the schema."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from server.api.app import create_app
from server.config import ServerConfig
from server.engine.demo import build_demo, demo_config
from tests.conftest import TINY

# Tight limits keep every valid request cheap, so the fuzzer reaches the engine quickly.
CONFIG = ServerConfig(
    max_gen_length=16, max_steps=16, max_mc_num=8, max_prompt_tokens=64, max_score_requests=4, request_timeout=20
)
app = create_app(CONFIG, build_demo(demo_config(**TINY)))
app.state.server.client.engine.start()


async def without_lifespan(scope, receive, send):
    """The fuzzer opens and closes the app's lifespan around every call; the engine worker must
    outlive the calls, so this module runs it and answers lifespan messages itself."""
    if scope["type"] != "lifespan":
        await app(scope, receive, send)
        return
    while True:
        message = await receive()
        await send({"type": message["type"] + ".complete"})
        if message["type"] == "lifespan.shutdown":
            return


schema = schemathesis.openapi.from_asgi("/openapi.json", without_lifespan)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_any_request_gets_a_documented_answer(case):
    case.call_and_validate(checks=CHECKS)
