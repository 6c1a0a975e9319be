"""The CLI serves the newer family members from their published folders (tiny iLLaDA and
LLaDA-MoE checkpoints, tests/family.py): /v1/models names the family, /v1/generate and its stream
work, the openai SDK's chat answer, in the checkpoint's own chat template, stops at the
checkpoint's end-of-turn token, and the other clients (the terminal chat, lm-eval's scoring and
generate_until) get the server's own answers."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from server.api.stop_strings import cut_at_stop
from tests import family

from . import HTTP_TIMEOUT, astream_events, chat_answer, running_server
from .test_lm_eval import run_eval, samples

MEMBERS = {
    "illada": (family.write_illada_checkpoint, "LLaDAModelLM", family.ILLADA_EOT_ID),
    "llada_moe": (family.write_llada_moe_checkpoint, "LLaDAMoEModelLM", family.LLADA_MOE_EOT_ID),
}


@pytest.fixture(scope="module", params=list(MEMBERS))
def served(request, tmp_path_factory):
    write, architecture, eot = MEMBERS[request.param]
    folder = write(tmp_path_factory.mktemp(request.param) / request.param, seed=1)
    args = ["--model", str(folder), "--shutdown-grace", "5", "--default-cache", "dual"]
    with running_server(args, tmp_path_factory.mktemp(request.param + "-logs")) as server:
        yield server, folder.name, architecture, eot


def test_the_model_list_names_the_family(served):
    server, name, architecture, _ = served
    (card,) = httpx.get(server.url + "/v1/models", timeout=HTTP_TIMEOUT).json()["data"]
    assert card["id"] == name and card["family"] == architecture


def test_generate_and_its_stream(served):
    server, *_ = served
    body = {"prompt": "Hello", "gen_length": 16, "steps": 8, "block_length": 8, "threshold": 0.3}
    response = httpx.post(server.url + "/v1/generate", json=body, timeout=HTTP_TIMEOUT)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert len(answer["token_ids"]) == 16 and answer["approximate"] is True  # the server's default dual cache

    async def stream():
        async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as client:
            return await astream_events(client, server.url, {**body, "stream": True})

    steps, kind, data = asyncio.run(stream())
    assert kind == "done" and data["token_ids"] == answer["token_ids"]
    assert sum(len(step["unmasked"]) for step in steps) == 16


def test_an_sdk_chat_answer_stops_at_the_end_of_turn_token(served):
    server, name, _, eot = served
    with openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60) as sdk:
        # the end-of-turn token pinned at the answer's fourth position: the answer is what comes before
        pinned = {"steps": 8, "block_length": 8, "constraints": [{"position": 3, "token_id": eot}]}
        chat = sdk.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=16, temperature=0, extra_body=pinned
        )
        free = sdk.chat.completions.create(
            model=name,
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=16,
            temperature=0,
            extra_body={"steps": 8, "block_length": 8},
        )
    choice = chat.choices[0]
    assert choice.finish_reason == "stop"
    # the same answer's first three tokens, decoded, are the whole reply
    ids = httpx.post(
        server.url + "/v1/generate",
        json={
            "messages": [{"role": "user", "content": "Hi"}],
            "gen_length": 16,
            "steps": 8,
            "block_length": 8,
            "constraints": [{"position": 3, "token_id": eot}],
        },
        timeout=HTTP_TIMEOUT,
    ).json()
    assert ids["token_ids"][3] == eot
    before = httpx.post(server.url + "/v1/detokenize", json={"tokens": ids["token_ids"][:3]}, timeout=HTTP_TIMEOUT)
    assert choice.message.content == ids["text"] == before.json()["prompt"]
    assert free.choices[0].message.content is not None


def test_the_terminal_chat_gets_the_servers_answer(served):
    server, *_ = served
    answer = chat_answer(server.url, "Hi", ["--gen-length", "16", "--steps", "8", "--block-length", "8"])
    body = {"messages": [{"role": "user", "content": "Hi"}], "gen_length": 16, "steps": 8, "block_length": 8}
    response = httpx.post(server.url + "/v1/generate", json=body, timeout=HTTP_TIMEOUT)
    assert answer == response.json()["text"]


def test_lm_eval_scores_and_generates_with_the_servers_numbers(served, tmp_path):
    server, *_ = served
    model_args = {"mc_num": 4, "steps": 8, "block_length": 8, "num_concurrent": 2}
    out, results = run_eval(server.url, ["llada_mc", "llada_gen"], model_args, tmp_path)
    assert {"llada_mc", "llada_gen"} <= set(results)
    scoring = {"mc_num": 4, "batch_size": 32, "cfg_scale": 0.0, "greedy": True, "seed": 0}
    for sample in samples(out, "llada_mc")[:2]:
        for args, resp in zip(sample["arguments"].values(), sample["resps"]):
            pair = {"context": args["arg_0"], "continuation": args["arg_1"]}
            direct = httpx.post(
                server.url + "/v1/loglikelihood", json={"requests": [pair], **scoring}, timeout=HTTP_TIMEOUT
            )
            (expected,) = direct.json()["results"]
            assert float(resp[0][0]) == pytest.approx(expected["loglikelihood"], rel=1e-5)
    for sample in samples(out, "llada_gen"):
        (args,) = sample["arguments"].values()
        body = {"prompt": args["arg_0"], "gen_length": args["arg_1"]["max_gen_toks"], "temperature": 0.0, "seed": 0}
        direct = httpx.post(
            server.url + "/v1/generate", json={**body, "steps": 8, "block_length": 8}, timeout=HTTP_TIMEOUT
        )
        text, _ = cut_at_stop(direct.json()["text"], tuple(args["arg_1"]["until"]))
        assert sample["resps"] == [[text]], sample
