"""Every endpoint of DESIGN.md's HTTP contract answers with the documented shape, in process,
against the real tiny demo model."""

from __future__ import annotations

import math

import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.engine.events import GenerationDone, GenerationStep
from server.engine.sampling_params import SamplingParams
from tests.api import parse_sse
from tests.conftest import app_client
from tests.support import wait_for

SMALL = {"gen_length": 16, "steps": 16, "block_length": 8}
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}]


def generate(client, **body) -> dict:
    response = client.post("/v1/generate", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def check_generation(body: dict, loaded, gen_length: int, prompt_tokens: int | None = None) -> None:
    """The response shape of DESIGN.md and the consistency of text, token_ids and finish_reason."""
    assert set(body) == {"id", "model", "text", "token_ids", "finish_reason", "approximate", "usage", "timing"}
    assert isinstance(body["id"], str) and body["id"]
    assert body["model"] == loaded.name
    ids = body["token_ids"]
    assert len(ids) == gen_length
    assert all(isinstance(t, int) and 0 <= t < loaded.vocab_size for t in ids)
    assert loaded.special.mask not in ids  # every position was revealed
    stops = loaded.special.stops
    first_stop = next((i for i, t in enumerate(ids) if t in stops), None)
    assert body["finish_reason"] == ("length" if first_stop is None else "stop")
    answer = ids if first_stop is None else ids[:first_stop]
    assert body["text"] == loaded.codec.decode(answer, skip_special_tokens=True)
    usage = body["usage"]
    assert set(usage) == {"prompt_tokens", "completion_tokens", "nfe"}
    assert usage["completion_tokens"] == gen_length
    assert 1 <= usage["nfe"]
    if prompt_tokens is not None:
        assert usage["prompt_tokens"] == prompt_tokens
    timing = body["timing"]
    assert set(timing) == {"queue_s", "total_s"}
    assert 0 <= timing["queue_s"] <= timing["total_s"]


def without_id_and_timing(body: dict) -> dict:
    return {k: v for k, v in body.items() if k not in ("id", "timing")}


# ---------------------------------------------------------------------------- small endpoints


def test_health_ready(client):
    response = client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body == {
        "status": "ready",
        "model": client.state.info.name,
        "device": "cpu",
        "dtype": "float32",
        "queue_depth": 0,
        "running_jobs": 0,
    }


def test_models_openai_list_shape(client):
    response = client.get("/v1/models")
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    assert len(body["data"]) == 1
    card = body["data"][0]
    assert card["id"] == client.state.info.name
    assert card["object"] == "model"
    assert isinstance(card["created"], int) and card["created"] > 0
    assert isinstance(card["owned_by"], str) and card["owned_by"]


def test_tokenize_prompt(client):
    codec = client.state.info.codec
    response = client.post("/v1/tokenize", json={"prompt": "Hello, world!"})
    assert response.status_code == 200
    body = response.json()
    assert body == {"tokens": codec.encode("Hello, world!"), "count": len("Hello, world!")}  # byte-level


def test_tokenize_add_special_tokens(client):
    loaded = client.state.info
    plain = client.post("/v1/tokenize", json={"prompt": "hi", "add_special_tokens": False}).json()
    special = client.post("/v1/tokenize", json={"prompt": "hi", "add_special_tokens": True}).json()
    assert special["tokens"] == loaded.codec.encode("hi", add_special_tokens=True)
    assert special["count"] == len(special["tokens"])
    # Special tokens only ever go in front (BOS where the tokenizer adds it), never inside the text.
    assert special["tokens"][len(special["tokens"]) - plain["count"] :] == plain["tokens"]
    assert all(t == loaded.special.bos for t in special["tokens"][: special["count"] - plain["count"]])


def test_tokenize_messages_applies_chat_template(client):
    loaded = client.state.info
    body = client.post("/v1/tokenize", json={"messages": CHAT}).json()
    assert body["tokens"] == loaded.codec.encode_chat(CHAT)
    assert body["count"] == len(body["tokens"])
    assert body["tokens"][0] == loaded.special.bos  # the template writes BOS once
    assert body["tokens"].count(loaded.special.bos) == 1
    assert loaded.special.eot in body["tokens"]


def test_detokenize_round_trip(client):
    loaded = client.state.info
    text = "Round trip: ok?\n"
    tokens = client.post("/v1/tokenize", json={"prompt": text}).json()["tokens"]
    response = client.post("/v1/detokenize", json={"tokens": tokens})
    assert response.status_code == 200
    assert response.json() == {"prompt": text}
    # Special tokens are kept, so a chat prompt comes back as the templated text.
    chat_tokens = client.post("/v1/tokenize", json={"messages": CHAT}).json()["tokens"]
    assert client.post("/v1/detokenize", json={"tokens": chat_tokens}).json() == {
        "prompt": loaded.codec.chat_text(CHAT)
    }
    assert client.post("/v1/detokenize", json={"tokens": []}).json() == {"prompt": ""}


def test_metrics_served_directly_and_parses(client):
    generate(client, prompt="hi", gen_length=8, steps=8)
    response = client.get("/metrics", follow_redirects=False)
    assert response.status_code == 200
    content_type = response.headers["content-type"]
    assert content_type.startswith("text/plain") and "version=" in content_type
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    names = {name for name, _ in samples}
    for name in (
        "llada_requests_total",
        "llada_queue_depth",
        "llada_running_jobs",
        "llada_denoise_steps_total",
        "llada_generated_tokens_total",
        "llada_prompt_tokens_total",
        "llada_request_duration_seconds_count",
        "llada_forward_duration_seconds_count",
        "llada_batch_rows_count",
        "llada_queue_wait_seconds_count",
    ):
        assert name in names, name
    assert samples[("llada_requests_total", (("endpoint", "/v1/generate"), ("status", "200")))] >= 1
    assert samples[("llada_generated_tokens_total", ())] >= 8
    assert samples[("llada_denoise_steps_total", ())] >= 8


# ---------------------------------------------------------------------------- generation


def test_generate_json_shape_and_consistency(client):
    loaded = client.state.info
    body = generate(client, prompt="Once upon a time", **SMALL)
    check_generation(body, loaded, gen_length=16, prompt_tokens=len("Once upon a time"))
    assert body["usage"]["nfe"] == 16


@pytest.mark.parametrize("stop", ["eos", "eot"])
def test_generate_stop_token_ends_text(client, stop):
    """A stop token pinned mid-answer: finish_reason is stop and the text ends right before it."""
    loaded = client.state.info
    stop_id = getattr(loaded.special, stop)
    body = generate(client, prompt="hi", **SMALL, constraints=[{"position": 5, "token_id": stop_id}])
    check_generation(body, loaded, gen_length=16)
    ids = body["token_ids"]
    assert ids[5] == stop_id
    assert body["finish_reason"] == "stop"
    first_stop = min(i for i, t in enumerate(ids) if t in loaded.special.stops)
    assert first_stop <= 5
    assert body["text"] == loaded.codec.decode(ids[:first_stop])
    assert len(body["text"]) <= first_stop  # byte-level: nothing after the stop leaks into text


def test_generate_messages_equals_tokenized_input_ids(client):
    loaded = client.state.info
    tokens = client.post("/v1/tokenize", json={"messages": CHAT}).json()["tokens"]
    by_messages = generate(client, messages=CHAT, **SMALL)
    by_ids = generate(client, input_ids=tokens, **SMALL)
    check_generation(by_messages, loaded, gen_length=16, prompt_tokens=len(tokens))
    check_generation(by_ids, loaded, gen_length=16, prompt_tokens=len(tokens))
    assert by_messages["token_ids"] == by_ids["token_ids"]
    assert by_messages["text"] == by_ids["text"]


def test_generate_input_ids_equals_prompt(client):
    loaded = client.state.info
    ids = client.post("/v1/tokenize", json={"prompt": "The sky"}).json()["tokens"]
    by_prompt = generate(client, prompt="The sky", **SMALL)
    by_ids = generate(client, input_ids=ids, **SMALL)
    check_generation(by_ids, loaded, gen_length=16, prompt_tokens=len(ids))
    assert by_ids["token_ids"] == by_prompt["token_ids"]


def test_generate_constraints_pin_tokens(client):
    loaded = client.state.info
    word = loaded.codec.encode(" there")
    constraints = [{"position": 0, "text": "there"}, {"position": 10, "token_id": ord("Z")}]
    body = generate(client, prompt="Hello", **SMALL, constraints=constraints)
    check_generation(body, loaded, gen_length=16)
    ids = body["token_ids"]
    assert ids[: len(word)] == word
    assert ids[10] == ord("Z")


def test_generate_temperature_zero_is_deterministic(client):
    first = generate(client, prompt="abc", **SMALL, temperature=0)
    second = generate(client, prompt="abc", **SMALL, temperature=0)
    assert first["token_ids"] == second["token_ids"]
    assert first["text"] == second["text"]
    assert first["id"] != second["id"]


def test_generate_seeded_sampling_is_reproducible(client):
    loaded = client.state.info
    request = {"prompt": "abc", "gen_length": 8, "steps": 8, "temperature": 1.0, "remasking": "random"}
    first = generate(client, **request, seed=1234)
    again = generate(client, **request, seed=1234)
    check_generation(first, loaded, gen_length=8)
    assert first["token_ids"] == again["token_ids"]
    others = [tuple(generate(client, **request, seed=seed)["token_ids"]) for seed in (1, 2)]
    assert len({tuple(first["token_ids"]), *others}) > 1, "different seeds always gave the same answer"


def test_generate_defaults_block_length(client):
    """Without block_length (default min(32, gen_length)) and with values that do not divide."""
    loaded = client.state.info
    check_generation(generate(client, prompt="x", gen_length=10, steps=10), loaded, gen_length=10)
    body = generate(client, prompt="x", gen_length=10, steps=7, block_length=3)
    check_generation(body, loaded, gen_length=10)
    assert body["usage"]["nfe"] <= 10


# ---------------------------------------------------------------------------- streaming


def stream(client, **body) -> list[tuple[str, dict]]:
    response = client.post("/v1/generate", json={**body, "stream": True})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    return parse_sse(response.text)


def check_stream(
    events: list[tuple[str, dict]], loaded, gen_length: int, block_length: int, pinned: dict[int, int]
) -> dict:
    """The step events of DESIGN.md, consistent with each other and with the done event."""
    names = [name for name, _ in events]
    assert names[-1] == "done" and names.count("done") == 1
    assert set(names[:-1]) == {"step"}, names
    steps = [data for _, data in events[:-1]]
    done = events[-1][1]
    check_generation(done, loaded, gen_length=gen_length)
    assert len(steps) == done["usage"]["nfe"]

    revealed: dict[int, int] = {}
    masked_before = gen_length - len(pinned)
    last_block = 0
    for number, data in enumerate(steps, start=1):
        assert set(data) == {"step", "block", "unmasked", "masked"}
        assert data["step"] == number
        assert last_block <= data["block"] < math.ceil(gen_length / block_length)
        last_block = data["block"]
        assert data["unmasked"], f"step {number} revealed nothing"
        for reveal in data["unmasked"]:
            assert set(reveal) == {"index", "token_id", "text", "confidence", "edit"}
            assert reveal["edit"] is False  # LLaDA never rewrites a revealed token
            index = reveal["index"]
            assert 0 <= index < gen_length
            assert data["block"] * block_length <= index < (data["block"] + 1) * block_length
            assert index not in pinned, f"pinned position {index} was revealed"
            assert index not in revealed, f"position {index} revealed twice"
            revealed[index] = reveal["token_id"]
            assert reveal["text"] == loaded.codec.decode([reveal["token_id"]], skip_special_tokens=False)
            assert 0.0 <= reveal["confidence"] <= 1.0
        assert data["masked"] == masked_before - len(data["unmasked"])  # strictly decreasing
        masked_before = data["masked"]
    assert masked_before == 0
    assert set(revealed) == set(range(gen_length)) - set(pinned)
    canvas = [revealed.get(i, pinned.get(i)) for i in range(gen_length)]
    assert canvas == done["token_ids"]
    return done


def test_stream_steps_and_done_match_json(client):
    loaded = client.state.info
    request = {"prompt": "Once upon a time", "gen_length": 16, "steps": 8, "block_length": 8}
    events = stream(client, **request)
    done = check_stream(events, loaded, gen_length=16, block_length=8, pinned={})
    assert len(events) - 1 == 8
    assert without_id_and_timing(done) == without_id_and_timing(generate(client, **request))


def test_only_streamed_jobs_report_each_step(client):
    # A JSON request needs only its final event; sparing the event loop a wake-up per step is
    # what keeps the server's cost at batch 1 small on a GPU (docs/BENCHMARKS.md).
    engine, loaded = client.state.client.engine, client.state.info
    params = SamplingParams(gen_length=8, steps=4, block_length=8)
    for report_steps, expected in ((False, [GenerationDone]), (True, [GenerationStep] * 4 + [GenerationDone])):
        received: list = []
        engine.submit_generate(loaded.codec.encode("hi"), params, received.append, report_steps)
        wait_for(lambda r=received: r and isinstance(r[-1], GenerationDone), what="the job to finish")
        assert [type(event) for event in received] == expected


def test_stream_with_constraints(client):
    loaded = client.state.info
    word = loaded.codec.encode(" hi")
    pinned = {2 + i: t for i, t in enumerate(word)} | {12: ord("Q")}
    request = {
        "prompt": "abc",
        "gen_length": 16,
        "steps": 16,
        "block_length": 8,
        "constraints": [{"position": 2, "text": "hi"}, {"position": 12, "token_id": ord("Q")}],
    }
    done = check_stream(stream(client, **request), loaded, gen_length=16, block_length=8, pinned=pinned)
    assert all(done["token_ids"][i] == t for i, t in pinned.items())
    assert without_id_and_timing(done) == without_id_and_timing(generate(client, **request))


def test_stream_seeded_sampling_matches_json(client):
    loaded = client.state.info
    request = {
        "prompt": "abc",
        "gen_length": 12,
        "steps": 12,
        "block_length": 4,
        "temperature": 1.0,
        "remasking": "random",
        "seed": 99,
    }
    done = check_stream(stream(client, **request), loaded, gen_length=12, block_length=4, pinned={})
    assert without_id_and_timing(done) == without_id_and_timing(generate(client, **request))


# ---------------------------------------------------------------------------- loglikelihood


def score(client, **body) -> dict:
    response = client.post("/v1/loglikelihood", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def check_scores(body: dict, loaded, count: int) -> None:
    assert {"results", "usage"} <= set(body)
    assert body.get("model", loaded.name) == loaded.name
    assert len(body["results"]) == count
    for result in body["results"]:
        assert set(result) == {"loglikelihood", "is_greedy", "context_tokens", "continuation_tokens"}
        assert math.isfinite(result["loglikelihood"]) and result["loglikelihood"] <= 0
    assert body["usage"]["prompt_tokens"] == sum(
        r["context_tokens"] + r["continuation_tokens"] for r in body["results"]
    )


def test_loglikelihood_text_pairs(client):
    loaded = client.state.info
    pairs = [("The sky is", " blue"), ("The sky is ", "green"), ("1 2 3", " 4 5")]
    body = score(client, requests=[{"context": c, "continuation": x} for c, x in pairs], mc_num=8, batch_size=4, seed=0)
    check_scores(body, loaded, 3)
    for result, (context, continuation) in zip(body["results"], pairs):
        context_ids, continuation_ids = loaded.codec.encode_pair(context, continuation)
        assert result["context_tokens"] == len(context_ids)
        assert result["continuation_tokens"] == len(continuation_ids)
        assert result["is_greedy"] is None  # only computed when asked
    # lm-eval's split: a trailing space of the context moves to the continuation.
    assert body["results"][1]["context_tokens"] == len("The sky is")
    assert body["results"][1]["continuation_tokens"] == len(" green")


def test_loglikelihood_id_pairs_match_text_pairs(client):
    loaded = client.state.info
    context_ids, continuation_ids = loaded.codec.encode_pair("Paris is in", " France")
    by_text = score(client, requests=[{"context": "Paris is in", "continuation": " France"}], mc_num=8, seed=3)
    by_ids = score(
        client,
        requests=[{"context_ids": context_ids, "continuation_ids": continuation_ids}],
        mc_num=8,
        seed=3,
    )
    check_scores(by_ids, loaded, 1)
    assert by_ids["results"] == by_text["results"]
    assert by_ids["results"][0]["context_tokens"] == len(context_ids)
    assert by_ids["results"][0]["continuation_tokens"] == len(continuation_ids)


def test_loglikelihood_seeded_is_reproducible(client):
    request = {
        "requests": [{"context": "abc", "continuation": " def"}],
        "mc_num": 6,
        "batch_size": 4,
        "seed": 11,
    }
    assert score(client, **request)["results"] == score(client, **request)["results"]


def test_loglikelihood_greedy_flag(client):
    loaded = client.state.info
    body = score(
        client,
        requests=[
            {"context": "abc", "continuation": " d"},
            {"context_ids": [97, 98], "continuation_ids": [99]},
        ],
        mc_num=4,
        greedy=True,
        seed=0,
    )
    check_scores(body, loaded, 2)
    assert all(isinstance(r["is_greedy"], bool) for r in body["results"])


def test_loglikelihood_cfg_scale(client):
    loaded = client.state.info
    body = score(client, requests=[{"context": "abc", "continuation": " def"}], mc_num=4, cfg_scale=1.5, seed=0)
    check_scores(body, loaded, 1)


def test_loglikelihood_one_token_continuation_is_deterministic(client):
    loaded = client.state.info
    request = [{"context": "The answer is", "continuation": "!"}]
    first = score(client, requests=request, mc_num=16, batch_size=4, seed=1)
    second = score(client, requests=request, mc_num=16, batch_size=4, seed=2)
    check_scores(first, loaded, 1)
    assert first["results"][0]["continuation_tokens"] == 1
    assert first["results"][0]["loglikelihood"] == second["results"][0]["loglikelihood"]
    unseeded = score(client, requests=request, mc_num=3)
    assert unseeded["results"][0]["loglikelihood"] == first["results"][0]["loglikelihood"]


def test_left_out_counts_default_to_the_server_limits_when_lower(tiny_model):
    with app_client(tiny_model, max_gen_length=16, max_steps=8, max_mc_num=4) as client:
        answer = client.post("/v1/generate", json={"prompt": "hi"}).json()
        assert len(answer["token_ids"]) == 16 and answer["usage"]["nfe"] <= 8
        scored = client.post("/v1/loglikelihood", json={"requests": [{"context": "a", "continuation": "bc"}]})
        assert scored.status_code == 200
        # An explicit value over the limit is still the client's mistake.
        assert client.post("/v1/generate", json={"prompt": "hi", "gen_length": 17}).status_code == 400
