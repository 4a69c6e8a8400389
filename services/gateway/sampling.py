"""Client sampling options -> the fully-set SamplingParams proto the workers run with."""

from __future__ import annotations

from splitserve.engine.request import SAMPLING_EPS
from splitserve.v1 import common_pb2 as pb

from .errors import invalid
from .schema import ChatPrompt, GenerationRequest, SamplingOptions


def resolve_max_tokens(request: GenerationRequest, num_prompt_tokens: int, max_model_len: int) -> int:
    """The request's max_tokens within the context (vLLM's rules); ApiError when it cannot fit.

    Without max_tokens a request gets its Api's default, clipped to the room left in the context
    (chat: all of it)."""
    param = "messages" if isinstance(request.prompt, ChatPrompt) else "prompt"
    room = max_model_len - num_prompt_tokens
    if room < 1:
        raise invalid(f"This model's maximum context length is {max_model_len} tokens. However, your "
                      f"prompt has {num_prompt_tokens} tokens, which leaves no room for a completion. "
                      f"Please reduce the length of the prompt.", param, "context_length_exceeded")
    requested = request.sampling.max_tokens
    if requested is None:
        default = request.api.default_max_tokens
        max_tokens = room if default is None else min(default, room)
    elif requested > room:
        raise invalid(f"This model's maximum context length is {max_model_len} tokens. However, you "
                      f"requested {num_prompt_tokens + requested} tokens ({num_prompt_tokens} in the "
                      f"{param}, {requested} in the completion). Please reduce the length of the "
                      f"{param} or completion.", "max_tokens", "context_length_exceeded")
    else:
        max_tokens = requested
    if request.sampling.min_tokens > max_tokens:
        raise invalid(f"min_tokens ({request.sampling.min_tokens}) must be <= max_tokens ({max_tokens})",
                      "min_tokens")
    return max_tokens


def sampling_proto(options: SamplingOptions, max_tokens: int, random_seed: int,
                   prompt_logprobs: int | None = None) -> pb.SamplingParams:
    """Every field set; random_seed stands in when the client gave none, so a request replayed after
    a worker failure samples the same tokens again. prompt_logprobs: GenerationRequest.scored_prompt."""
    greedy = options.temperature < SAMPLING_EPS  # vLLM's rule, sent as 0 so every worker agrees
    return pb.SamplingParams(
        temperature=0.0 if greedy else options.temperature,
        top_p=options.top_p,
        top_k=options.top_k or 0,
        seed=random_seed if options.seed is None else options.seed,
        max_tokens=max_tokens,
        min_tokens=options.min_tokens,
        ignore_eos=options.ignore_eos,
        stop_token_ids=list(options.stop_token_ids),
        presence_penalty=options.presence_penalty,
        frequency_penalty=options.frequency_penalty,
        repetition_penalty=options.repetition_penalty,
        min_p=options.min_p,
        logit_bias=[pb.LogitBias(token_id=t, bias=b) for t, b in options.logit_bias],
        logprobs=options.logprobs,
        top_logprobs=options.top_logprobs,
        prompt_logprobs=prompt_logprobs is not None,
        top_prompt_logprobs=prompt_logprobs or 0,
        grammar=(pb.Grammar(json_schema=options.grammar.json_schema or "", regex=options.grammar.regex or "")
                 if options.grammar is not None else None),
    )
