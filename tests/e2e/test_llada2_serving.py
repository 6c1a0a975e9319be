"""The CLI serves a LLaDA2 folder (a tiny checkpoint in the published layout, tests/family.py) with
2.1's editing on by default: /v1/models gives the family and its defaults; the openai SDK's
answers, whole and streamed (text sent once its block is settled), agree and end at EOS; a client
that disconnects cancels its job and its cache pages are freed; the terminal chat and lm-eval's
generate_until get the server's answers."""

from __future__ import annotations

import httpx
import openai
import pytest

from server.api.stop_strings import cut_at_stop
from tests import family
from tests.support import scrape, wait_for

from . import HTTP_TIMEOUT, chat_answer, running_server, stream_events
from .test_lm_eval import run_eval, samples

CHAT = [{"role": "user", "content": "Tell me a story about a fox."}]
SHORT = {"threshold": 0.5, "max_post_steps": 4}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = family.write_llada2_checkpoint(tmp_path_factory.mktemp("llada2") / "llada2")
    args = ["--model", str(folder), "--shutdown-grace", "5", "--default-editing-threshold", "0.5"]
    with running_server(args, tmp_path_factory.mktemp("llada2-logs")) as server:
        yield server, folder.name


def generate(server, **body) -> dict:
    response = httpx.post(server.url + "/v1/generate", json=body, timeout=HTTP_TIMEOUT)
    assert response.status_code == 200, response.text
    return response.json()


def test_the_model_list_gives_the_family_and_the_server_defaults(served):
    server, name = served
    (card,) = httpx.get(server.url + "/v1/models", timeout=HTTP_TIMEOUT).json()["data"]
    assert card["id"] == name and card["family"] == "LLaDA2MoeModelLM" and card["block_diffusion"]
    assert card["defaults"]["editing_threshold"] == 0.5 and card["defaults"]["threshold"] == 0.95


def test_sdk_answers_whole_and_streamed_agree_and_end_at_eos(served):
    server, name = served
    eos = family.llada2_ids()["eos"]
    with openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60) as sdk:
        whole = sdk.chat.completions.create(model=name, messages=CHAT, max_tokens=64, temperature=0, extra_body=SHORT)
        streamed = sdk.chat.completions.create(
            model=name, messages=CHAT, max_tokens=64, temperature=0, extra_body=SHORT, stream=True
        )
        text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)
    assert text == whole.choices[0].message.content
    native = generate(server, messages=CHAT, gen_length=64, **SHORT)
    assert native["text"] == text
    if eos in native["token_ids"]:
        assert native["token_ids"][-1] == eos and whole.choices[0].finish_reason == "stop"
        before = httpx.post(server.url + "/v1/detokenize", json={"tokens": native["token_ids"][:-1]})
        assert before.json()["prompt"] == text
    else:
        assert len(native["token_ids"]) == 64 and whole.choices[0].finish_reason == "length"


def test_a_client_that_disconnects_cancels_its_job_and_frees_its_pages(served):
    server, _ = served
    cancelled = scrape(server.url).value("llada_cancelled_total")
    body = {"prompt": "Once upon a time", "gen_length": 256, "threshold": 1.0}
    with httpx.Client(timeout=HTTP_TIMEOUT) as client:
        steps, kind, _ = stream_events(client, server.url, body, on_step=lambda n: n == 2)
    assert kind is None and len(steps) == 2
    wait_for(lambda: scrape(server.url).value("llada_cancelled_total") > cancelled, what="the job to be cancelled")
    wait_for(lambda: scrape(server.url).value("llada_kv_cache_bytes") == 0, what="its pages to be freed")


def test_the_terminal_chat_gets_the_servers_answer(served):
    server, _ = served
    answer = chat_answer(server.url, CHAT[0]["content"], ["--gen-length", "48", "--threshold", "0.5"])
    assert answer == generate(server, messages=CHAT, gen_length=48, threshold=0.5)["text"]


def test_lm_eval_generate_until_gets_the_servers_answers(served, tmp_path):
    server, _ = served
    out, results = run_eval(server.url, ["llada_gen"], {"num_concurrent": 2, "threshold": 0.5}, tmp_path)
    assert "llada_gen" in results
    for sample in samples(out, "llada_gen"):
        (args,) = sample["arguments"].values()
        gen_kwargs = args["arg_1"]
        direct = generate(
            server, prompt=args["arg_0"], gen_length=gen_kwargs["max_gen_toks"], temperature=0.0, seed=0, threshold=0.5
        )
        text, _ = cut_at_stop(direct["text"], tuple(gen_kwargs["until"]))
        assert sample["resps"] == [[text]], sample
