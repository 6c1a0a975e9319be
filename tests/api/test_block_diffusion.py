"""The HTTP contract on a block-diffusion checkpoint (a tiny LLaDA2 folder, tests/family.py):
its family's defaults and fields, a 400 naming each field it cannot honour (and each LLaDA2 field
on a LLaDA model), no scoring, streams that mark edits, OpenAI text that waits for settled
blocks."""

from __future__ import annotations

import json

import pytest

from server.engine.loader import load_checkpoint
from tests import family
from tests.api import assert_error
from tests.api.test_endpoints import stream
from tests.conftest import app_client

pytestmark = pytest.mark.usefixtures("one_thread")

EDITING = {"threshold": 0.5, "editing_threshold": 0.0, "max_post_steps": 4}


@pytest.fixture(scope="module")
def llada2(tmp_path_factory):
    return load_checkpoint(family.write_llada2_checkpoint(tmp_path_factory.mktemp("l2") / "llada2"), "cpu", "float32")


@pytest.fixture(scope="module")
def client(llada2):
    with app_client(llada2) as c:
        yield c


def generate(client, **body) -> dict:
    response = client.post("/v1/generate", json={"prompt": "Once upon a time", "gen_length": 48, **body})
    assert response.status_code == 200, response.text
    return response.json()


def test_the_model_list_gives_the_family_and_its_defaults(client, llada2):
    (card,) = client.get("/v1/models").json()["data"]
    assert card["family"] == "LLaDA2MoeModelLM" and card["block_diffusion"] is True
    defaults = card["defaults"]
    assert (defaults["steps"], defaults["block_length"], defaults["threshold"]) == (32, 32, 0.95)
    assert defaults["editing_threshold"] is None and defaults["max_post_steps"] == 16


def test_left_out_settings_take_the_authors_defaults(client):
    left_out = generate(client)
    assert left_out["token_ids"] == generate(client, steps=32, block_length=32, threshold=0.95)["token_ids"]
    one_by_one = generate(client, threshold=1.0)
    assert left_out["usage"]["nfe"] < one_by_one["usage"]["nfe"]  # 0.95 commits several tokens at once


def test_the_server_default_editing_threshold_applies_to_requests_that_do_not_say(llada2):
    with app_client(llada2, default_editing_threshold=0.0) as c:
        (card,) = c.get("/v1/models").json()["data"]
        assert card["defaults"]["editing_threshold"] == 0.0
        by_default = generate(c, threshold=0.5, max_post_steps=4)
        assert by_default["token_ids"] == generate(c, **EDITING)["token_ids"]
        without = generate(c, threshold=0.5, editing_threshold=None)  # null: 2.0's rules, whatever the default
        assert without["usage"]["nfe"] != by_default["usage"]["nfe"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("cache", "dual"),
        ("cache", "none"),
        ("factor", 1.0),
        ("cfg_scale", 1.0),
        ("remasking", "random"),
        ("constraints", [{"position": 0, "text": "a"}]),
        ("logits_eos_inf", True),
        ("confidence_eos_eot_inf", True),
    ],
)
def test_a_field_block_diffusion_cannot_honour_is_a_400_naming_it(client, field, value):
    response = client.post("/v1/generate", json={"prompt": "hi", "gen_length": 8, field: value})
    error = assert_error(response, 400, "invalid_request_error", param=field, code="unsupported_parameter")
    assert field in error["message"] and "LLaDA2MoeModelLM" in error["message"]


@pytest.mark.parametrize(
    ("field", "value"), [("editing_threshold", 0.5), ("max_post_steps", 2), ("top_k", 5), ("top_p", 0.9)]
)
def test_a_block_diffusion_field_on_a_llada_model_is_a_400_naming_it(tiny_model, field, value):
    with app_client(tiny_model) as c:
        response = c.post("/v1/generate", json={"prompt": "hi", "gen_length": 8, field: value})
        error = assert_error(response, 400, "invalid_request_error", param=field, code="unsupported_parameter")
        assert field in error["message"]


@pytest.mark.parametrize(
    ("field", "value", "status"),
    [("editing_threshold", 1.5, 422), ("top_k", 0, 422), ("top_p", 0, 422), ("max_post_steps", -1, 422)],
)
def test_out_of_range_block_fields_are_refused(client, field, value, status):
    response = client.post("/v1/generate", json={"prompt": "hi", "gen_length": 8, field: value})
    assert response.status_code == status, response.text


def test_a_canvas_past_the_model_length_is_a_400(llada2):
    limit = llada2.info.max_sequence_length
    with app_client(llada2, max_prompt_tokens=limit) as c:
        # prompt + gen_length fit, but not once rounded up to whole blocks of 48
        body = {"input_ids": [65] * (limit - 40), "gen_length": 39, "block_length": 48}
        response = c.post("/v1/generate", json=body)
        error = assert_error(response, 400, "invalid_request_error", param="gen_length", code="too_long")
        assert "whole blocks" in error["message"]


def test_loglikelihood_is_a_400_naming_the_family(client):
    body = {"requests": [{"context": "a", "continuation": "b"}], "mc_num": 1}
    error = assert_error(client.post("/v1/loglikelihood", json=body), 400, "invalid_request_error")
    assert "LLaDA2MoeModelLM" in error["message"] and error["code"] == "unsupported_model"


def test_the_stream_marks_edits_and_ends_with_the_answer(client, llada2):
    body = {"prompt": "Once upon a time", "gen_length": 48, **EDITING}
    events = stream(client, **body)
    steps = [data for kind, data in events if kind == "step"]
    kind, done = events[-1]
    assert kind == "done" and done["token_ids"] == generate(client, **EDITING)["token_ids"]
    edits = [reveal for step in steps for reveal in step["unmasked"] if reveal["edit"]]
    assert edits, "the tiny checkpoint edits at editing_threshold 0"
    canvas: dict[int, int] = {}
    for step in steps:
        for reveal in step["unmasked"]:
            assert reveal["edit"] == (reveal["index"] in canvas), reveal  # an edit rewrites a written position
            canvas[reveal["index"]] = reveal["token_id"]
    assert [canvas[i] for i in range(len(done["token_ids"]))] == done["token_ids"]
    assert done["approximate"] is False and done["usage"]["nfe"] == len(steps)


def test_openai_stream_text_adds_up_to_the_answer_with_editing(client, llada2):
    name = llada2.info.name
    body = {"model": name, "prompt": "Once upon a time", "max_tokens": 48, "temperature": 0, **EDITING}
    whole = client.post("/v1/completions", json=body).json()
    response = client.post("/v1/completions", json={**body, "stream": True})
    chunks = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]


def test_openai_top_p_and_top_k_apply_to_block_diffusion(client, llada2):
    body = {"model": llada2.info.name, "prompt": "Hi", "max_tokens": 16, "temperature": 1.0, "seed": 4}
    first = client.post("/v1/completions", json={**body, "top_p": 0.9, "top_k": 3})
    assert first.status_code == 200, first.text
    again = client.post("/v1/completions", json={**body, "top_p": 0.9, "top_k": 3})
    assert first.json()["choices"][0]["text"] == again.json()["choices"][0]["text"]


def test_a_request_whose_cache_could_never_fit_is_a_400_naming_gen_length(llada2):
    with app_client(llada2, max_cache_memory="64K") as c:  # 5 pages of 16 tokens
        response = c.post("/v1/generate", json={"prompt": "hi", "gen_length": 200})
        error = assert_error(response, 400, "invalid_request_error", param="gen_length")
        assert "--max-cache-memory" in error["message"] and "cache none" not in error["message"]
        assert generate(c, gen_length=8)["token_ids"]  # a short one still runs


def test_left_out_counts_stay_within_the_server_limits(llada2):
    with app_client(llada2, max_steps=16, max_gen_length=40) as c:
        (card,) = c.get("/v1/models").json()["data"]
        assert (card["defaults"]["steps"], card["defaults"]["gen_length"]) == (16, 40)
        answer = c.post("/v1/generate", json={"prompt": "Once upon a time", "threshold": None})
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["nfe"] <= 16 * 2  # two blocks of 16 iterations at most
