"""From an OpenAI-shaped request to the engine's jobs, through the same checks as /v1/generate.

Each prompt becomes a GenerateRequest holding only the fields the client set, so defaults, server
limits and error messages are those of /v1/generate (errors name the OpenAI field instead)."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from server.api import validation
from server.api.errors import ApiError
from server.api.openai_schemas import (
    UNSUPPORTED,
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIRequest,
)
from server.api.schemas import GenerateRequest, SamplingSettings
from server.config import ServerConfig
from server.engine.model_info import ModelInfo
from server.engine.sampling_params import SamplingParams

MAX_STOP_STRINGS = 4
SEED_SPACE = 2**63  # seeds are 0 .. 2**63 - 1 (schemas.Seed)


@dataclass(frozen=True)
class ChoiceJob:
    """One answer: choices are numbered prompt by prompt, n per prompt."""

    index: int
    prompt_ids: list[int]
    params: SamplingParams


@dataclass(frozen=True)
class Plan:
    jobs: list[ChoiceJob]
    stop: tuple[str, ...]
    prompt_tokens: int  # each prompt once, however many choices it has


def check_model(body: OpenAIRequest, info: ModelInfo) -> None:
    if body.model != info.name:
        raise ApiError(
            404,
            f"the model {body.model!r} is not served here; this server serves {info.name!r} (GET /v1/models)",
            param="model",
            code="model_not_found",
        )


def check_supported(body: OpenAIRequest) -> None:
    for name, (harmless, why) in UNSUPPORTED.items():
        if name in body.model_fields_set and not harmless(getattr(body, name)):
            raise validation.bad(
                f"{name} = {getattr(body, name)!r} is not supported here: {why}",
                name,
                "unsupported_parameter",
            )


def stop_strings(body: OpenAIRequest) -> tuple[str, ...]:
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or ())
    if len(stops) > MAX_STOP_STRINGS:
        raise validation.bad(f"stop has {len(stops)} strings; give at most {MAX_STOP_STRINGS}", "stop")
    if "" in stops:
        raise validation.bad("stop holds an empty string, which would end every answer before it starts", "stop")
    return tuple(stops)


def completion_prompts(body: CompletionRequest) -> list[dict]:
    """The prompt as GenerateRequest fields, one dict per prompt: text, or token ids used as given."""
    prompt = body.prompt
    if isinstance(prompt, str):
        return [{"prompt": prompt}]
    if not prompt:
        raise validation.bad("prompt is an empty list", "prompt", "empty_prompt")
    if isinstance(prompt[0], str):
        return [{"prompt": text} for text in prompt]
    if isinstance(prompt[0], int):
        return [{"input_ids": prompt}]
    return [{"input_ids": ids} for ids in prompt]


def chat_prompt(body: ChatCompletionRequest) -> list[dict]:
    """The messages as GenerateRequest's messages: text parts joined by newlines, developer as system."""
    messages = []
    for i, message in enumerate(body.messages):
        content = message.content
        if not isinstance(content, str):
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise validation.bad(
                        f"messages.{i}.content.{j} is a {part.type!r} part; this model reads text parts only",
                        f"messages.{i}.content.{j}",
                        "unsupported_content",
                    )
            content = "\n".join(part.text for part in content)
        messages.append({"role": "system" if message.role == "developer" else message.role, "content": content})
    return [{"messages": messages}]


def answer_length(body: OpenAIRequest) -> tuple[str | None, int | None]:
    """(the field the client used for the answer length, its value)."""
    given = [name for name in ("max_tokens", "max_completion_tokens") if getattr(body, name, None) is not None]
    if len(given) > 1:
        raise validation.bad("give one of max_tokens or max_completion_tokens, not both", given[-1])
    return (given[0], getattr(body, given[0])) if given else (None, None)


@contextmanager
def openai_names(names: dict[str, str]) -> Iterator[None]:
    """Errors of the shared checks name the field the OpenAI client sent."""
    try:
        yield
    except ApiError as error:
        for native, ours in names.items():
            if error.param is not None and error.param.split(".")[0] == native:
                error.param = ours + error.param[len(native) :]
            error.message = error.message.replace(native, ours)
        raise


def plan(body: OpenAIRequest, prompts: list[dict], info: ModelInfo, config: ServerConfig) -> Plan:
    check_model(body, info)
    check_supported(body)
    stop = stop_strings(body)
    length_field, length = answer_length(body)
    settings = {name: getattr(body, name) for name in SamplingSettings.model_fields if name in body.model_fields_set}
    if length is not None:
        settings["gen_length"] = length
    if body.n > 1 and body.seed is None:
        # Consecutive seeds from one drawn at random: the n answers differ, as n asks.
        settings["seed"] = random.randrange(SEED_SPACE)
    names = {"input_ids": "prompt", "gen_length": length_field or "max_tokens"}
    jobs, prompt_tokens = [], 0
    with openai_names(names):
        for fields in prompts:
            request = GenerateRequest.model_validate({**settings, **fields})
            ids = validation.prompt_ids(request, info, config)
            params = validation.sampling_params(request, len(ids), info, config)
            prompt_tokens += len(ids)
            for k in range(body.n):
                seed = None if params.seed is None else (params.seed + k) % SEED_SPACE
                jobs.append(ChoiceJob(len(jobs), ids, dataclasses.replace(params, seed=seed)))
    return Plan(jobs=jobs, stop=stop, prompt_tokens=prompt_tokens)
