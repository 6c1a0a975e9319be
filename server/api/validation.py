"""Checks that depend on the configured limits and the checkpoint's tokenizer (400s), and the
translation of valid requests into the engine's inputs."""

from __future__ import annotations

from pydantic import BaseModel

from server.api.errors import ApiError
from server.api.schemas import Constraint, GenerateRequest, LoglikelihoodRequest, PromptFields
from server.config import CACHE_MODES, ServerConfig
from server.engine.model_info import ModelInfo
from server.engine.sampling_params import BLOCK_DIFFUSION_DEFAULTS, SamplingParams, ScoreParams

# Fields a family cannot honour, at the values that change nothing: name -> (harmless, why not).
NOT_FOR_BLOCK_DIFFUSION = {
    "cache": (lambda v: v is None, "a block-diffusion model always keeps its exact block cache"),
    "factor": (lambda v: v is None, "block diffusion commits by threshold; use threshold"),
    "cfg_scale": (lambda v: v == 0, "block diffusion has no classifier-free guidance"),
    "remasking": (lambda v: v == "low_confidence", "block diffusion commits the most confident tokens"),
    "constraints": (lambda v: not v, "block diffusion does not pin answer tokens"),
    "logits_eos_inf": (lambda v: not v, "LLaDA's EOS rules do not apply to block diffusion"),
    "confidence_eos_eot_inf": (lambda v: not v, "LLaDA's EOS rules do not apply to block diffusion"),
}
NOT_FOR_FULL_CANVAS = {
    "editing_threshold": (lambda v: v is None, "token editing is LLaDA2.1's (block diffusion)"),
    "max_post_steps": (lambda v: v is None, "editing iterations are LLaDA2.1's (block diffusion)"),
    "top_k": (lambda v: v is None, "LLaDA's sampler draws from the whole distribution; use temperature"),
    "top_p": (lambda v: v is None or v == 1, "LLaDA's sampler draws from the whole distribution; use temperature"),
}


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


def refuse_unhonoured(request: GenerateRequest, info: ModelInfo) -> None:
    """A field the served model's family cannot honour, at a value that would change something, is a
    400 naming it."""
    refused = NOT_FOR_BLOCK_DIFFUSION if info.block_diffusion else NOT_FOR_FULL_CANVAS
    for name, (harmless, why) in refused.items():
        value = getattr(request, name)
        if not harmless(value):
            raise bad(
                f"{name} = {value!r} is not supported by {info.family} models: {why}", name, "unsupported_parameter"
            )


def family_defaults(info: ModelInfo, config: ServerConfig) -> dict:
    """The settings a request that leaves them out gets (GET /v1/models lists them): counts are
    the family's defaults or the server's limits, whichever is lower."""
    base = SamplingParams()
    gen_length = min(base.gen_length, config.max_gen_length)
    if info.block_diffusion:
        return {
            "gen_length": gen_length,
            **BLOCK_DIFFUSION_DEFAULTS,
            "steps": min(BLOCK_DIFFUSION_DEFAULTS["steps"], config.max_steps),
            "threshold": config.default_threshold or BLOCK_DIFFUSION_DEFAULTS["threshold"],
            "editing_threshold": config.default_editing_threshold,
            "early_stop": config.default_early_stop,
            "temperature": base.temperature,
        }
    return {
        "gen_length": gen_length,
        "steps": min(base.steps, config.max_steps),
        "block_length": base.block_length,
        "temperature": base.temperature,
        "cache": config.default_cache,
        "threshold": config.default_threshold,
        "factor": config.default_factor,
        "early_stop": config.default_early_stop,
    }


def counts(request: GenerateRequest, steps: int, config: ServerConfig) -> tuple[int, int]:
    """gen_length (the request's, else its default within the limit) and steps, each within the
    server's limit."""
    gen_length = with_default(request, "gen_length", config.max_gen_length)
    if gen_length > config.max_gen_length:
        raise bad(
            f"gen_length {gen_length} is over the limit {config.max_gen_length} (--max-gen-length)",
            "gen_length",
            "over_limit",
        )
    if steps > config.max_steps:
        raise bad(f"steps {steps} is over the limit {config.max_steps} (--max-steps)", "steps", "over_limit")
    return gen_length, steps


def sampling_params(request: GenerateRequest, prompt_len: int, info: ModelInfo, config: ServerConfig) -> SamplingParams:
    refuse_unhonoured(request, info)
    if info.block_diffusion:
        return block_params(request, prompt_len, info, config)
    gen_length, steps = counts(request, with_default(request, "steps", config.max_steps), config)
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


def block_params(request: GenerateRequest, prompt_len: int, info: ModelInfo, config: ServerConfig) -> SamplingParams:
    """A block-diffusion request: the family's defaults for what it leaves out (threshold: the
    request's, even null, else --default-threshold, else the authors' 0.95; editing likewise)."""
    defaults = family_defaults(info, config)
    steps = request.steps if "steps" in request.model_fields_set else defaults["steps"]
    gen_length, steps = counts(request, steps, config)
    block_length = request.block_length or defaults["block_length"]
    canvas = -(-(prompt_len + gen_length) // block_length) * block_length
    if canvas > info.max_sequence_length:
        raise bad(
            f"prompt ({prompt_len} tokens) plus gen_length ({gen_length}), rounded up to whole blocks of "
            f"{block_length}, is {canvas} positions, over the model's max_sequence_length {info.max_sequence_length}",
            "gen_length",
            "too_long",
        )
    threshold = request.threshold if "threshold" in request.model_fields_set else defaults["threshold"]
    if threshold is not None and not 0 < threshold <= 1:
        raise bad(f"threshold {threshold:g} is not in (0, 1]", "threshold")
    fields = request.model_fields_set
    editing = request.editing_threshold if "editing_threshold" in fields else defaults["editing_threshold"]
    post_steps = request.max_post_steps if request.max_post_steps is not None else defaults["max_post_steps"]
    early_stop = request.early_stop if request.early_stop is not None else defaults["early_stop"]
    return SamplingParams(
        gen_length=gen_length,
        steps=steps,
        block_length=block_length,
        temperature=request.temperature,
        seed=request.seed,
        threshold=threshold,
        early_stop=early_stop,
        editing_threshold=editing,
        max_post_steps=post_steps,
        top_k=request.top_k,
        top_p=request.top_p,
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
    if info.block_diffusion:
        raise bad(
            f"{info.family} is a block-diffusion model: this server has no log-likelihood estimator for it "
            "(LLaDA's estimator assumes full bidirectional attention); score with a LLaDA-8B-family model",
            "requests",
            "unsupported_model",
        )
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
