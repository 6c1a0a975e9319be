"""Checks that depend on the configured limits and the checkpoint's tokenizer (400s), and the
translation of valid requests into the engine's inputs."""

from __future__ import annotations

from pydantic import BaseModel

from server.api.errors import ApiError
from server.api.schemas import Constraint, GenerateRequest, LoglikelihoodRequest, PromptFields
from server.config import CACHE_MODES, ServerConfig
from server.engine.model_info import ModelInfo
from server.engine.sampling_params import SamplingParams, ScoreParams


def bad(message: str, param: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def with_default(request: BaseModel, name: str, limit: int) -> int:
    """A count the client left out takes its documented default, or the server's limit if lower."""
    value = getattr(request, name)
    return value if name in request.model_fields_set else min(value, limit)


def check_ids(ids: list[int], info: ModelInfo, param: str) -> None:
    vocab = info.vocab_size
    for i, token in enumerate(ids):
        if token >= vocab:
            raise bad(f"{param}[{i}] = {token} is outside the vocabulary (0..{vocab - 1})", param, "token_out_of_range")
        if token == info.special.mask:
            raise bad(
                f"{param}[{i}] is the mask token {token}, which may not appear in a prompt", param, "mask_in_prompt"
            )


def prompt_ids(request: PromptFields, info: ModelInfo, config: ServerConfig) -> list[int]:
    given = [name for name in ("prompt", "messages", "input_ids") if getattr(request, name, None) is not None]
    if len(given) != 1:
        names = "prompt, messages or input_ids" if hasattr(request, "input_ids") else "prompt or messages"
        raise bad(
            f"give exactly one of {names} (got {', '.join(given) or 'none'})",
            given[-1] if given else "prompt",
            "prompt_required",
        )
    source = given[0]
    codec = info.codec
    if source == "prompt":
        if not request.prompt:
            raise bad("prompt is empty", "prompt", "empty_prompt")
        ids = codec.encode(request.prompt, add_special_tokens=getattr(request, "add_special_tokens", False))
    elif source == "messages":
        if not codec.has_chat_template:
            raise bad(
                "this model's tokenizer has no chat template; send prompt or input_ids", "messages", "no_chat_template"
            )
        ids = codec.encode_chat([m.model_dump() for m in request.messages])
    else:
        ids = list(request.input_ids)
        if not ids:
            raise bad("input_ids is empty", "input_ids", "empty_prompt")
    check_ids(ids, info, source)
    if len(ids) > config.max_prompt_tokens:
        raise bad(
            f"the prompt has {len(ids)} tokens; the limit is {config.max_prompt_tokens} (--max-prompt-tokens)",
            source,
            "prompt_too_long",
        )
    return ids


def constraint_tokens(constraints: list[Constraint], gen_length: int, info: ModelInfo) -> tuple[tuple[int, int], ...]:
    """[(answer position, token id)]; a text constraint is the word's tokens with a leading space,
    written from its position on (as the authors' demo does)."""
    pinned: dict[int, int] = {}
    for i, constraint in enumerate(constraints):
        param = f"constraints.{i}"
        if constraint.text is not None:
            tokens = info.codec.encode(" " + constraint.text)
            check_ids(tokens, info, param + ".text")
        else:
            tokens = [constraint.token_id]
            check_ids(tokens, info, param + ".token_id")
        end = constraint.position + len(tokens)
        if end > gen_length:
            raise bad(
                f"{param} covers answer positions {constraint.position}..{end - 1} but gen_length is {gen_length}",
                param,
                "constraint_out_of_range",
            )
        for offset, token in enumerate(tokens):
            position = constraint.position + offset
            if position in pinned:
                raise bad(
                    f"{param} overlaps an earlier constraint at answer position {position}", param, "constraint_overlap"
                )
            pinned[position] = token
    return tuple(sorted(pinned.items()))


def sampling_params(request: GenerateRequest, prompt_len: int, info: ModelInfo, config: ServerConfig) -> SamplingParams:
    gen_length = with_default(request, "gen_length", config.max_gen_length)
    steps = with_default(request, "steps", config.max_steps)
    if gen_length > config.max_gen_length:
        raise bad(
            f"gen_length {gen_length} is over the limit {config.max_gen_length} (--max-gen-length)",
            "gen_length",
            "over_limit",
        )
    if steps > config.max_steps:
        raise bad(f"steps {steps} is over the limit {config.max_steps} (--max-steps)", "steps", "over_limit")
    block_length = request.block_length if request.block_length is not None else min(32, gen_length)
    if block_length > gen_length:
        raise bad(f"block_length {block_length} is larger than gen_length {gen_length}", "block_length")
    total = prompt_len + gen_length
    if total > info.max_sequence_length:
        raise bad(
            f"prompt ({prompt_len} tokens) plus gen_length ({gen_length}) exceeds the model's "
            f"max_sequence_length {info.max_sequence_length}",
            "gen_length",
            "too_long",
        )
    return SamplingParams(
        gen_length=gen_length,
        steps=steps,
        block_length=block_length,
        temperature=request.temperature,
        cfg_scale=request.cfg_scale,
        remasking=request.remasking,
        logits_eos_inf=request.logits_eos_inf,
        confidence_eos_eot_inf=request.confidence_eos_eot_inf,
        seed=request.seed,
        constraints=constraint_tokens(request.constraints, gen_length, info),
        **fast_decoding(request, config),
    )


def fast_decoding(request: GenerateRequest, config: ServerConfig) -> dict:
    """cache, threshold, factor and early_stop: the request's, or the server's defaults for what it
    leaves out (a request that names threshold or factor, even as null, takes neither default)."""
    cache = request.cache if request.cache is not None else config.default_cache
    if cache not in CACHE_MODES:
        raise bad(f"cache {cache!r} is not one of {', '.join(CACHE_MODES)}", "cache")
    if request.threshold is not None and request.factor is not None:
        raise bad("give threshold or factor, not both", "factor")
    if {"threshold", "factor"} & request.model_fields_set:
        threshold, factor = request.threshold, request.factor
    else:
        threshold, factor = config.default_threshold, config.default_factor
    if threshold is not None and not 0 < threshold <= 1:
        raise bad(f"threshold {threshold:g} is not in (0, 1]", "threshold")
    if factor is not None and factor <= 0:
        raise bad(f"factor {factor:g} must be positive", "factor")
    early_stop = request.early_stop if request.early_stop is not None else config.default_early_stop
    return dict(cache=cache, threshold=threshold, factor=factor, early_stop=early_stop)


def score_inputs(
    request: LoglikelihoodRequest, info: ModelInfo, config: ServerConfig
) -> tuple[list[tuple[list[int], list[int]]], ScoreParams]:
    if len(request.requests) > config.max_score_requests:
        raise bad(
            f"{len(request.requests)} requests in one call; the limit is {config.max_score_requests} "
            "(--max-score-requests)",
            "requests",
            "over_limit",
        )
    mc_num = with_default(request, "mc_num", config.max_mc_num)
    if mc_num > config.max_mc_num:
        raise bad(f"mc_num {mc_num} is over the limit {config.max_mc_num} (--max-mc-num)", "mc_num", "over_limit")
    pairs = []
    for i, item in enumerate(request.requests):
        param = f"requests.{i}"
        if item.context is not None:
            context, continuation = info.codec.encode_pair(item.context, item.continuation)
        else:
            context, continuation = list(item.context_ids), list(item.continuation_ids)
        check_ids(context, info, param + ".context")
        check_ids(continuation, info, param + ".continuation")
        if not continuation:
            raise bad(
                f"{param}: the continuation is empty (no tokens to score)",
                param + ".continuation",
                "empty_continuation",
            )
        if len(context) + len(continuation) > min(config.max_prompt_tokens, info.max_sequence_length):
            raise bad(
                f"{param}: context plus continuation has {len(context) + len(continuation)} tokens; the limit is "
                f"{min(config.max_prompt_tokens, info.max_sequence_length)}",
                param,
                "prompt_too_long",
            )
        pairs.append((context, continuation))
    params = ScoreParams(
        mc_num=mc_num,
        batch_size=min(request.batch_size, mc_num),
        cfg_scale=request.cfg_scale,
        greedy=request.greedy,
        seed=request.seed,
    )
    if params.rows_per_unit > config.max_batch_rows:
        raise bad("cfg_scale > 0 needs two rows per sample but --max-batch-rows is 1", "cfg_scale")
    return pairs, params
