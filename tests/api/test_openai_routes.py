"""/v1/completions and /v1/chat/completions in process: each answer is the /v1/generate answer of
the same settings (cut at stop strings), diffusion settings ride along, n answers use consecutive
seeds, and every field that cannot be honoured is a 400 naming it. The real openai SDK against
the real CLI is tests/e2e/test_openai_sdk.py."""

from __future__ import annotations

import pytest

from server.api.schemas import DiffusionSettings
from tests.api import assert_error, parse_sse
from tests.conftest import app_client
from tests.support import Scrape, wait_for

SMALL = {"max_tokens": 16, "steps": 16, "block_length": 8}
NATIVE = {"gen_length": 16, "steps": 16, "block_length": 8}
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}]


@pytest.fixture
def limited(tiny_model):
    with app_client(tiny_model, max_gen_length=32, max_steps=32) as c:
        yield c


def generate(client, **body) -> dict:
    response = client.post("/v1/generate", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def complete(client, path: str = "/v1/completions", **body) -> dict:
    response = client.post(path, json={"model": client.state.info.name, **body})
    assert response.status_code == 200, response.text
    return response.json()


def test_a_completion_is_the_generate_answer_in_openai_shape(client):
    body = complete(client, prompt="Once upon a time", **SMALL)
    native = generate(client, prompt="Once upon a time", **NATIVE)
    assert set(body) == {"id", "object", "created", "model", "choices", "usage"}
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["model"] == client.state.info.name and isinstance(body["created"], int)
    assert body["choices"] == [
        {"index": 0, "text": native["text"], "finish_reason": native["finish_reason"], "logprobs": None}
    ]
    prompt_tokens = native["usage"]["prompt_tokens"]
    assert body["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 16,
        "total_tokens": prompt_tokens + 16,
    }


def test_a_chat_completion_is_the_generate_answer_of_the_messages(client):
    body = complete(client, "/v1/chat/completions", messages=CHAT, **SMALL)
    native = generate(client, messages=CHAT, **NATIVE)
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": native["text"]}
    assert choice["finish_reason"] == native["finish_reason"]
    assert body["usage"]["prompt_tokens"] == native["usage"]["prompt_tokens"]


def test_text_parts_and_the_developer_role_read_as_text_and_system(client):
    parts = [
        {"role": "developer", "content": [{"type": "text", "text": "Be"}, {"type": "text", "text": "brief."}]},
        {"role": "user", "content": "Say hi."},
    ]
    body = complete(client, "/v1/chat/completions", messages=parts, **SMALL)
    native = generate(client, messages=[{"role": "system", "content": "Be\nbrief."}, CHAT[1]], **NATIVE)
    assert body["choices"][0]["message"]["content"] == native["text"]


def test_max_completion_tokens_is_the_answer_length(client):
    body = complete(client, "/v1/chat/completions", messages=CHAT, max_completion_tokens=8, steps=8)
    assert body["usage"]["completion_tokens"] == 8
    assert body["choices"][0]["message"]["content"] == generate(client, messages=CHAT, gen_length=8, steps=8)["text"]


def test_diffusion_settings_ride_along_as_extra_fields(client):
    """Every DiffusionSettings field is taken under its own name and changes the answer as it
    changes /v1/generate's."""
    extra = {
        "steps": 8,
        "block_length": 4,
        "cfg_scale": 1.5,
        "remasking": "random",
        "logits_eos_inf": True,
        "confidence_eos_eot_inf": True,
        "constraints": [{"position": 2, "text": "hi"}],
    }
    assert set(extra) <= set(DiffusionSettings.model_fields)
    body = complete(client, prompt="Pinned", max_tokens=16, seed=3, temperature=0.5, **extra)
    native = generate(client, prompt="Pinned", gen_length=16, seed=3, temperature=0.5, **extra)
    assert body["choices"][0]["text"] == native["text"]
    assert " hi" in native["text"]


def test_n_answers_use_consecutive_seeds(client):
    body = complete(client, prompt="Sample", n=3, seed=40, temperature=1.0, **SMALL)
    texts = [choice["text"] for choice in body["choices"]]
    assert [choice["index"] for choice in body["choices"]] == [0, 1, 2]
    assert texts == [
        generate(client, prompt="Sample", seed=40 + k, temperature=1.0, **NATIVE)["text"] for k in range(3)
    ]
    assert body["usage"]["completion_tokens"] == 3 * 16


def test_n_answers_without_a_seed_differ(client):
    # Random remasking draws its order from the seed, so the seeds show even at temperature 0.
    body = complete(client, prompt="Sample", n=4, remasking="random", logits_eos_inf=True, **SMALL)
    assert len({choice["text"] for choice in body["choices"]}) > 1


def test_several_prompts_number_their_choices_prompt_by_prompt(client):
    ids = client.post("/v1/tokenize", json={"prompt": "Two"}).json()["tokens"]
    body = complete(client, prompt=["One", "Two"], n=2, seed=5, temperature=1.0, **SMALL)
    expected = [
        generate(client, prompt=prompt, seed=5 + k, temperature=1.0, **NATIVE)["text"]
        for prompt in ("One", "Two")
        for k in range(2)
    ]
    assert [choice["text"] for choice in body["choices"]] == expected
    assert body["usage"]["prompt_tokens"] == len("One") + len("Two")
    by_ids = complete(client, prompt=[ids], **SMALL)
    assert by_ids["choices"][0]["text"] == generate(client, input_ids=ids, **NATIVE)["text"]


def test_stop_strings_end_the_text_before_the_first(client):
    full = generate(client, prompt="Stop here", logits_eos_inf=True, **NATIVE)["text"]
    stop = full[5:7]
    body = complete(client, prompt="Stop here", logits_eos_inf=True, stop=[stop, "never"], **SMALL)
    (choice,) = body["choices"]
    assert choice == {"index": 0, "text": full[: full.index(stop)], "finish_reason": "stop", "logprobs": None}
    single = complete(client, prompt="Stop here", logits_eos_inf=True, stop=stop, **SMALL)
    assert single["choices"] == body["choices"]


def stream(client, path: str, **body) -> list[dict]:
    response = client.post(path, json={"model": client.state.info.name, "stream": True, **body})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    text = response.text.replace("\r\n", "\n")
    assert text.rstrip().endswith("data: [DONE]"), text[-200:]
    return [data for _, data in parse_sse(text.rsplit("data: [DONE]", 1)[0])]


def test_a_chat_stream_sends_the_role_then_text_then_the_finish_then_usage(client):
    chunks = stream(
        client, "/v1/chat/completions", messages=CHAT, stream_options={"include_usage": True}, n=2, seed=1, **SMALL
    )
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert all("usage" in c for c in chunks)
    *choice_chunks, usage = chunks
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 2 * 16
    answers = complete(client, "/v1/chat/completions", messages=CHAT, n=2, seed=1, **SMALL)["choices"]
    for index, answer in enumerate(answers):
        mine = [c["choices"][0] for c in choice_chunks if c["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert all(c["finish_reason"] is None for c in mine[:-1])
        assert mine[-1]["delta"] == {} and mine[-1]["finish_reason"] == answer["finish_reason"]
        assert "".join(c["delta"].get("content", "") for c in mine) == answer["message"]["content"]


def test_a_completion_stream_adds_up_to_the_completion_and_has_no_usage_unless_asked(client):
    chunks = stream(client, "/v1/completions", prompt="Once", logits_eos_inf=True, stop="e", **SMALL)
    answer = complete(client, prompt="Once", logits_eos_inf=True, stop="e", **SMALL)["choices"][0]
    assert all("usage" not in c and c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == answer["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == answer["finish_reason"]


UNSUPPORTED = [
    ("/v1/chat/completions", "logprobs", True),
    ("/v1/chat/completions", "top_logprobs", 2),
    ("/v1/chat/completions", "tools", [{"type": "function", "function": {"name": "f"}}]),
    ("/v1/chat/completions", "tool_choice", "auto"),
    ("/v1/chat/completions", "response_format", {"type": "json_object"}),
    ("/v1/chat/completions", "top_p", 0.5),
    ("/v1/chat/completions", "presence_penalty", 0.5),
    ("/v1/chat/completions", "frequency_penalty", -1),
    ("/v1/chat/completions", "logit_bias", {"42": 5}),
    ("/v1/completions", "logprobs", 0),
    ("/v1/completions", "echo", True),
    ("/v1/completions", "best_of", 2),
    ("/v1/completions", "suffix", " the end"),
]
# Values of those fields that change nothing, as clients send by default.
HARMLESS = {
    "/v1/chat/completions": {
        "logprobs": False,
        "top_logprobs": 0,
        "tools": [],
        "tool_choice": "none",
        "response_format": {"type": "text"},
        "top_p": 1,
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "logit_bias": {},
        "user": "someone",
    },
    "/v1/completions": {"logprobs": None, "echo": False, "best_of": 1, "suffix": None, "top_p": 1.0},
}


def prompt_of(path: str) -> dict:
    return {"messages": CHAT} if path == "/v1/chat/completions" else {"prompt": "hi"}


@pytest.mark.parametrize(("path", "field", "value"), UNSUPPORTED, ids=[f"{p[4:]}-{f}" for p, f, _ in UNSUPPORTED])
def test_a_field_that_cannot_be_honoured_is_a_400_naming_it(client, path, field, value):
    response = client.post(path, json={"model": client.state.info.name, **prompt_of(path), field: value})
    error = assert_error(response, 400, "invalid_request_error", param=field, code="unsupported_parameter")
    assert field in error["message"]


@pytest.mark.parametrize("path", sorted(HARMLESS))
def test_default_values_of_those_fields_are_accepted(client, path):
    body = complete(client, path, **prompt_of(path), **HARMLESS[path], **SMALL)
    assert len(body["choices"]) == 1


@pytest.mark.parametrize("path", sorted(HARMLESS))
def test_an_unknown_model_is_a_404_model_not_found(client, path):
    response = client.post(path, json={"model": "gpt-4o", **prompt_of(path)})
    error = assert_error(response, 404, "invalid_request_error", param="model", code="model_not_found")
    assert client.state.info.name in error["message"]


BAD = [
    ("/v1/completions", {"prompt": "hi", "max_tokens": 33}, "max_tokens", "over_limit"),
    ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": 33}, "max_completion_tokens", "over_limit"),
    (
        "/v1/chat/completions",
        {"messages": CHAT, "max_tokens": 8, "max_completion_tokens": 8},
        "max_completion_tokens",
        None,
    ),
    ("/v1/completions", {"prompt": "hi", "steps": 33}, "steps", "over_limit"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 8, "block_length": 16}, "block_length", None),
    ("/v1/completions", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop", None),
    ("/v1/completions", {"prompt": "hi", "stop": ""}, "stop", None),
    ("/v1/completions", {"prompt": ""}, "prompt", "empty_prompt"),
    ("/v1/completions", {"prompt": []}, "prompt", "empty_prompt"),
    ("/v1/completions", {"prompt": [1, 2, 10**7]}, "prompt", "token_out_of_range"),
    ("/v1/completions", {"prompt": [[1], [126336]]}, "prompt", "mask_in_prompt"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "messages.0.content.0",
        "unsupported_content",
    ),
    ("/v1/completions", {"prompt": "hi", "constraints": [{"position": 40, "text": "x"}]}, "constraints.0", None),
]


@pytest.mark.parametrize(("path", "body", "param", "code"), BAD, ids=[b[2] for b in BAD])
def test_bad_values_are_a_400_naming_the_openai_field(limited, path, body, param, code):
    response = limited.post(path, json={"model": limited.state.info.name, **body})
    error = assert_error(response, 400, "invalid_request_error", param=param, code=code)
    assert "gen_length" not in error["message"] and "input_ids" not in error["message"], error


def test_a_full_queue_refuses_all_n_answers_with_429_and_cancels_those_queued(tiny_model):
    with app_client(tiny_model, max_queue=1, max_batch_rows=2) as c:
        response = c.post("/v1/completions", json={"model": c.state.info.name, "prompt": "hi", "n": 8, **SMALL})
        error = assert_error(response, 429, "overloaded", code="queue_full")
        assert int(response.headers["retry-after"]) >= 1, error

        def idle():
            stats = c.state.client.stats()
            return stats.queue_depth == 0 and stats.running_jobs == 0

        wait_for(idle, what="the accepted answers to be cancelled")
        assert Scrape(c.get("/metrics").text).value("llada_cancelled_total") >= 1
