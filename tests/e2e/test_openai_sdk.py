"""The real `openai` package against the real CLI server (with an API key): completions and chat,
sync and async, streams whose deltas add up to the unstreamed answer, n answers, stop strings that
straddle chunks, the model list, and errors raised as the SDK's own exception classes."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from server.api.stop_strings import cut_at_stop
from server.config import ServerConfig
from tests.support import scrape, wait_for

from . import HTTP_TIMEOUT, running_server

KEY = "sdk-test-key"
# Long answers in blocks of 8, so a stream commits its text over several chunks; no EOS, so the
# text is the whole canvas and stop strings have something to cut.
SETTINGS = {"steps": 8, "block_length": 8, "logits_eos_inf": True}
LENGTH = 32
CHAT = [{"role": "user", "content": "Tell me about diffusion."}]


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    args = ["--model", str(tiny_checkpoint), "--api-key", KEY, "--shutdown-grace", "5"]
    with running_server(args, tmp_path_factory.mktemp("openai-sdk")) as process:
        yield process


@pytest.fixture(scope="module")
def model(tiny_checkpoint) -> str:
    return tiny_checkpoint.name


@pytest.fixture
def sdk(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60) as client:
        yield client


def generate(server, **body) -> dict:
    response = httpx.post(
        server.url + "/v1/generate", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=HTTP_TIMEOUT
    )
    assert response.status_code == 200, response.text
    return response.json()


def chat_stream(sdk, model: str, **kwargs) -> list:
    stream = sdk.chat.completions.create(
        model=model, messages=CHAT, max_tokens=LENGTH, temperature=0, stream=True, extra_body=SETTINGS, **kwargs
    )
    return list(stream)


def test_the_model_list_names_the_served_model(sdk, model):
    assert [m.id for m in sdk.models.list()] == [model]


def test_completion_and_chat_answers_are_the_generate_answers(sdk, server, model):
    completion = sdk.completions.create(
        model=model, prompt="Once upon a time", max_tokens=LENGTH, temperature=0, extra_body=SETTINGS
    )
    native = generate(server, prompt="Once upon a time", gen_length=LENGTH, **SETTINGS)
    assert completion.choices[0].text == native["text"] and completion.choices[0].finish_reason == "length"
    assert completion.usage.prompt_tokens == native["usage"]["prompt_tokens"]
    assert completion.usage.completion_tokens == LENGTH
    chat = sdk.chat.completions.create(
        model=model, messages=CHAT, max_completion_tokens=LENGTH, temperature=0, extra_body=SETTINGS
    )
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == generate(server, messages=CHAT, gen_length=LENGTH, **SETTINGS)["text"]


def test_streamed_deltas_add_up_to_the_unstreamed_text(sdk, model):
    chunks = chat_stream(sdk, model, stream_options={"include_usage": True})
    answer = sdk.chat.completions.create(
        model=model, messages=CHAT, max_tokens=LENGTH, temperature=0, extra_body=SETTINGS
    )
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(deltas) == answer.choices[0].message.content
    assert len(deltas) >= 2, "the text came in one piece: it was not streamed as it committed"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == LENGTH

    stream = sdk.completions.create(
        model=model, prompt="Once", max_tokens=LENGTH, temperature=0, stream=True, extra_body=SETTINGS
    )
    streamed = "".join(c.choices[0].text for c in stream)
    plain = sdk.completions.create(model=model, prompt="Once", max_tokens=LENGTH, temperature=0, extra_body=SETTINGS)
    assert streamed == plain.choices[0].text


def test_a_stop_string_that_straddles_two_chunks_ends_the_stream_before_it(sdk, model):
    pieces = [c.choices[0].delta.content for c in chat_stream(sdk, model) if c.choices and c.choices[0].delta.content]
    full = "".join(pieces)
    boundary = len(pieces[0])
    stop = full[boundary - 1 : boundary + 1]  # the last character of one chunk and the first of the next
    assert all(stop not in piece for piece in pieces)
    expected, found = cut_at_stop(full, (stop,))
    assert found

    chunks = chat_stream(sdk, model, stop=[stop])
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == expected
    assert chunks[-1].choices[0].finish_reason == "stop"
    plain = sdk.chat.completions.create(
        model=model, messages=CHAT, max_tokens=LENGTH, temperature=0, stop=stop, extra_body=SETTINGS
    )
    assert plain.choices[0].message.content == expected and plain.choices[0].finish_reason == "stop"


def test_n_answers_are_those_of_consecutive_seeds(sdk, server, model):
    answer = sdk.completions.create(
        model=model, prompt="Sample", n=3, seed=21, temperature=1.0, max_tokens=16, extra_body={"steps": 4}
    )
    assert [c.index for c in answer.choices] == [0, 1, 2]
    for k, choice in enumerate(answer.choices):
        native = generate(server, prompt="Sample", seed=21 + k, temperature=1.0, gen_length=16, steps=4)
        assert choice.text == native["text"]


def test_the_async_client_streams_and_answers_concurrently(server, model, sdk):
    prompts = ["First", "The second one"]
    expected = [
        sdk.completions.create(model=model, prompt=p, max_tokens=LENGTH, temperature=0, extra_body=SETTINGS)
        .choices[0]
        .text
        for p in prompts
    ]

    async def run() -> tuple[list[str], list[str]]:
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0) as client:

            async def streamed(prompt: str) -> str:
                stream = await client.completions.create(
                    model=model, prompt=prompt, max_tokens=LENGTH, temperature=0, stream=True, extra_body=SETTINGS
                )
                return "".join([chunk.choices[0].text async for chunk in stream])

            async def plain(prompt: str) -> str:
                chat = await client.chat.completions.create(
                    model=model,
                    messages=[{"role": "user", "content": prompt}],
                    max_tokens=LENGTH,
                    temperature=0,
                    extra_body=SETTINGS,
                )
                return chat.choices[0].message.content

            return await asyncio.gather(*map(streamed, prompts)), await asyncio.gather(*map(plain, prompts))

    streamed, chats = asyncio.run(run())
    assert streamed == expected
    for prompt, text in zip(prompts, chats):
        assert (
            text
            == generate(server, messages=[{"role": "user", "content": prompt}], gen_length=LENGTH, **SETTINGS)["text"]
        )


def test_fields_that_cannot_be_honoured_raise_bad_request_naming_them(sdk, model):
    with pytest.raises(openai.BadRequestError) as raised:
        sdk.chat.completions.create(model=model, messages=CHAT, logprobs=True)
    assert raised.value.param == "logprobs" and raised.value.code == "unsupported_parameter"
    with pytest.raises(openai.BadRequestError) as raised:
        sdk.completions.create(model=model, prompt="hi", top_p=0.3)
    assert raised.value.param == "top_p"
    with pytest.raises(openai.BadRequestError) as raised:
        sdk.completions.create(model=model, prompt="hi", max_tokens=10**6)
    assert raised.value.param == "max_tokens"
    with pytest.raises(openai.NotFoundError) as raised:
        sdk.chat.completions.create(model="gpt-4o", messages=CHAT)
    assert raised.value.code == "model_not_found"


def test_a_wrong_or_missing_key_raises_authentication_error(server, model):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError) as raised:
            client.models.list()
        assert raised.value.status_code == 401 and raised.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(model=model, messages=CHAT, stream=True)

        # No key at all: the SDK refuses an empty api_key, so the header is omitted its own way.
        no_key = {"Authorization": openai.omit}
        with pytest.raises(openai.AuthenticationError) as raised:
            client.completions.create(model=model, prompt="hi", max_tokens=8, extra_headers=no_key)
        assert raised.value.status_code == 401 and raised.value.code == "invalid_api_key"
        assert "authorization" not in raised.value.response.request.headers, "a key was sent after all"
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(model=model, messages=CHAT, stream=True, extra_headers=no_key)


def test_a_full_queue_raises_rate_limit_error_and_the_server_recovers(sdk, server, model):
    # One request whose n answers are more jobs than the server runs plus queues, all submitted at
    # once: the first past the queue is refused before any of them can finish, so there is no race.
    defaults = ServerConfig()
    n = defaults.max_batch_rows + defaults.max_queue + 1
    with pytest.raises(openai.RateLimitError) as raised:
        sdk.completions.create(model=model, prompt="Busy", n=n, max_tokens=LENGTH, temperature=0, extra_body=SETTINGS)
    assert raised.value.status_code == 429 and raised.value.code == "queue_full"
    assert int(raised.value.response.headers["retry-after"]) >= 1

    # The choices already queued were cancelled with it: the server empties and answers again.
    def idle() -> bool:
        now = scrape(server.url)
        return now.value("llada_running_jobs") == 0 and now.value("llada_queue_depth") == 0

    wait_for(idle, timeout=30, what="the refused request's jobs to be cancelled")
    answer = sdk.completions.create(model=model, prompt="Busy", max_tokens=8, extra_body={"steps": 2})
    assert answer.choices[0].finish_reason in ("stop", "length")


def test_closing_a_stream_cancels_its_job(sdk, server, model):
    before = scrape(server.url)
    stream = sdk.chat.completions.create(
        model=model,
        messages=CHAT,
        max_tokens=512,
        stream=True,
        extra_body={"steps": 512, "block_length": 8, "logits_eos_inf": True},
    )
    next(iter(stream))  # the role chunk: the job is queued or running
    stream.close()

    def cancelled():
        now = scrape(server.url)
        done = now.value("llada_running_jobs") == 0 and now.moved(before, "llada_cancelled_total") == 1
        return now if done else None

    after = wait_for(cancelled, timeout=30, what="the closed stream's job to be cancelled")
    assert after.moved(before, "llada_denoise_steps_total") < 512
