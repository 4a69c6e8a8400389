"""Conversions between protobuf messages and the engine's dataclasses."""

from __future__ import annotations

import torch

from splitserve.engine.kv_cache import KVLayout
from splitserve.engine.request import FinishReason, SamplingParams, TokenLogprobs
from splitserve.engine.structured import Grammar
from splitserve.v1 import common_pb2 as pb

_FINISH_TO_PROTO = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
    FinishReason.ERROR: pb.FINISH_REASON_ERROR,
}
FINISH_REASON_NAMES = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_ABORT: "abort",
    pb.FINISH_REASON_ERROR: "error",
}


def sampling_from_proto(msg: pb.SamplingParams) -> SamplingParams:
    """Engine sampling params from a fully-set proto (raises ValueError on bad values)."""
    return SamplingParams(
        temperature=msg.temperature,
        top_p=msg.top_p,
        top_k=msg.top_k or None,
        seed=msg.seed,
        max_new_tokens=msg.max_tokens,
        min_new_tokens=msg.min_tokens,
        stop_token_ids=tuple(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
        presence_penalty=msg.presence_penalty,
        frequency_penalty=msg.frequency_penalty,
        repetition_penalty=msg.repetition_penalty or 1.0,  # 0 is the unset proto default
        min_p=msg.min_p,
        logit_bias=tuple((b.token_id, b.bias) for b in msg.logit_bias),
        logprobs=msg.logprobs,
        top_logprobs=msg.top_logprobs,
        prompt_logprobs=msg.top_prompt_logprobs if msg.prompt_logprobs else None,
        grammar=grammar_from_proto(msg.grammar) if msg.HasField("grammar") else None,
    )


def grammar_from_proto(msg: pb.Grammar) -> Grammar:
    return Grammar(json_schema=msg.json_schema or None, regex=msg.regex or None)


def logprobs_to_proto(logprobs: TokenLogprobs) -> pb.TokenLogprobs:
    return pb.TokenLogprobs(logprob=logprobs.logprob, top_token_ids=[t for t, _ in logprobs.top],
                            top_logprobs=[lp for _, lp in logprobs.top], rank=logprobs.rank)


def finish_to_proto(reason: FinishReason | None) -> int:
    return pb.FINISH_REASON_UNSPECIFIED if reason is None else _FINISH_TO_PROTO[reason]


def layout_to_proto(layout: KVLayout) -> pb.KvLayout:
    return pb.KvLayout(num_layers=layout.num_layers, num_kv_heads=layout.num_kv_heads,
                       head_dim=layout.head_dim, block_size=layout.block_size,
                       dtype=str(layout.dtype).removeprefix("torch."))


def layout_from_proto(msg: pb.KvLayout) -> KVLayout:
    dtype = getattr(torch, msg.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown KV dtype {msg.dtype!r}")
    return KVLayout(msg.num_layers, msg.num_kv_heads, msg.head_dim, msg.block_size, dtype)
