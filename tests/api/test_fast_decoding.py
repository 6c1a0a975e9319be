"""The fast decoding fields of POST /v1/generate (cache, threshold, factor, early_stop) over HTTP, in
process: bad values are 400s naming the field, `approximate` says when the answer may differ from
the exact sampler's, the server's --default-* settings fill what a request leaves out, early
stop ends the answer with the text of the run without it, and a cached request is bounded by
--max-cache-memory (it waits while the cache is full, a request that can never fit is a 400, and
one whose cache cannot be allocated fails alone)."""

from __future__ import annotations

import threading

import pytest
import torch

from server.api.app import create_app
from server.config import ServerConfig
from server.engine.demo import build_demo, demo_config
from server.engine.errors import PoolTooLarge
from server.engine.events import GenerationDone
from server.engine.sampling_params import SamplingParams
from tests.api import assert_error, parse_sse
from tests.conftest import TINY, app_client
from tests.support import wait_for

BASE = {"prompt": "Once upon a time", "gen_length": 24, "steps": 12, "block_length": 8}


def generate(client, **body) -> dict:
    response = client.post("/v1/generate", json={**BASE, **body})
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"threshold": 0}, "threshold"),
        ({"threshold": 1.5}, "threshold"),
        ({"threshold": -0.2}, "threshold"),
        ({"factor": 0}, "factor"),
        ({"threshold": 0.5, "factor": 1.0}, "factor"),
        ({"cache": "full"}, "cache"),
    ],
)
def test_bad_fast_decoding_values_are_400s_naming_the_field(client, fields, param):
    error = assert_error(client.post("/v1/generate", json={**BASE, **fields}), 400, "invalid_request_error", param)
    assert param in error["message"]


def test_approximate_says_when_a_cache_threshold_or_factor_was_used(client):
    exact = generate(client)
    assert exact["approximate"] is False
    assert generate(client, early_stop=True)["approximate"] is False  # early stop keeps the text exact
    for fields in ({"cache": "prefix"}, {"cache": "dual"}, {"threshold": 0.3}, {"factor": 1.0}):
        answer = generate(client, **fields)
        assert answer["approximate"] is True, fields
        assert 1 <= answer["usage"]["nfe"] <= BASE["gen_length"]
    # the exact sampler's nfe is the schedule's steps; a threshold may need fewer
    assert exact["usage"]["nfe"] == 12


def test_a_threshold_stream_may_reveal_many_positions_in_a_step(client):
    response = client.post("/v1/generate", json={**BASE, "cache": "dual", "threshold": 0.05, "stream": True})
    events = parse_sse(response.text)
    steps = [data for name, data in events if name == "step"]
    assert events[-1][0] == "done" and events[-1][1]["usage"]["nfe"] == len(steps)
    assert max(len(step["unmasked"]) for step in steps) > 1
    assert sum(len(step["unmasked"]) for step in steps) == BASE["gen_length"]


def test_server_defaults_fill_what_a_request_leaves_out(tiny_model):
    fields = {"cache": "dual", "threshold": 0.2, "early_stop": True}
    with app_client(tiny_model) as plain:
        explicit = generate(plain, **fields)
        exact = generate(plain)
    with app_client(tiny_model, default_cache="dual", default_threshold=0.2, default_early_stop=True) as client:
        by_default = generate(client)
        assert by_default["approximate"] is True
        assert by_default["token_ids"] == explicit["token_ids"]
        assert by_default["usage"]["nfe"] == explicit["usage"]["nfe"]
        # a request may opt out of each default: threshold null is the fixed schedule again
        opted_out = generate(client, cache="none", threshold=None, early_stop=False)
        assert opted_out["token_ids"] == exact["token_ids"] and opted_out["approximate"] is False
        # naming factor replaces the default threshold rather than clashing with it
        assert generate(client, factor=1.0)["approximate"] is True


@pytest.fixture(scope="module")
def eos_heavy():
    """The tiny model with an LM head that makes EOS win where the model's favourite token would."""
    loaded = build_demo(demo_config(**TINY), seed=0)
    prompt = loaded.codec.encode(BASE["prompt"])
    with torch.inference_mode():
        favourite = loaded.model.full_logits(torch.tensor([prompt + [loaded.special.mask] * 24]))[0].argmax(-1)
        head = loaded.model.model.transformer.ff_out.weight
        head[loaded.special.eos] = 1.3 * head[torch.bincount(favourite).argmax()]
    return loaded


@pytest.mark.parametrize("fields", [{}, {"cache": "dual", "threshold": 0.3}], ids=["exact", "dual_threshold"])
def test_early_stop_ends_the_answer_with_the_same_text(eos_heavy, fields):
    with app_client(eos_heavy) as client:
        plain = generate(client, **fields)
        stopped = generate(client, **fields, early_stop=True)
    assert eos_heavy.special.eos in plain["token_ids"][:16], "the test needs an EOS before the last block"
    assert stopped["text"] == plain["text"]
    assert stopped["usage"]["nfe"] < plain["usage"]["nfe"]  # only what ran is counted
    first_eos = stopped["token_ids"].index(eos_heavy.special.eos)
    stop_end = (first_eos // 8 + 1) * 8  # the end of the block that holds it
    # The blocks up to the stop are decoded as without early stop; every later position is EOS,
    # where the plain run went on decoding. (Both say finish_reason "stop": early stop needs an
    # EOS or EOT in the answer, and that same token cuts the plain run's text.)
    assert stopped["token_ids"][:stop_end] == plain["token_ids"][:stop_end]
    eos_after = [eos_heavy.special.eos] * (24 - stop_end)
    assert stopped["token_ids"][stop_end:] == eos_after != plain["token_ids"][stop_end:]


def test_a_cache_that_can_never_fit_is_a_400_naming_cache(tiny_model):
    with app_client(tiny_model, max_cache_memory="4K") as client:
        error = assert_error(
            client.post("/v1/generate", json={**BASE, "cache": "prefix"}), 400, "invalid_request_error", "cache"
        )
        assert "--max-cache-memory" in error["message"]
        assert generate(client)["approximate"] is False  # exact requests need no cache


def test_a_cache_that_cannot_be_allocated_stops_the_app(tiny_model):
    # A budget beyond the address space, as one above a GPU's free memory: the KV pool is
    # allocated at start-up, so the app is not made, and the message says what to change.
    with pytest.raises(PoolTooLarge, match="lower --max-cache-memory"):
        create_app(ServerConfig(max_cache_memory="4096T"), tiny_model)


def test_cached_requests_wait_while_the_cache_is_full_and_the_gauge_returns_to_zero(tiny_model):
    # Room for one cached job of this size: a second waits in the queue (no 429) until it frees.
    prompt = tiny_model.codec.encode("busy")
    long = SamplingParams(gen_length=256, steps=256, block_length=8, cache="dual")  # 17 pages of 4 KiB
    with app_client(tiny_model, max_cache_memory="100K") as client:
        engine = client.state.client.engine
        done: list[list] = [[], []]
        events = [threading.Event(), threading.Event()]

        def sink(i):
            def receive(event):
                done[i].append(event)
                if isinstance(event, GenerationDone):
                    events[i].set()

            return receive

        engine.submit_generate(prompt, long, sink(0), report_steps=False)
        wait_for(lambda: engine.stats().running_jobs == 1, what="the first cached job to run")
        assert "llada_kv_cache_bytes 0.0" not in client.get("/metrics").text
        engine.submit_generate(prompt, long, sink(1), report_steps=False)
        assert engine.stats().queue_depth == 1  # waiting for cache memory, not refused
        assert events[0].wait(120) and events[1].wait(120)
        assert done[0][-1].token_ids == done[1][-1].token_ids
        wait_for(lambda: "llada_kv_cache_bytes 0.0" in client.get("/metrics").text, what="the cache to be freed")
