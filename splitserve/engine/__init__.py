"""The engine: model runner, paged KV cache, scheduling and sampling. No gRPC, Redis or UCX here."""

from splitserve.engine.config import EngineConfig, EngineRole
from splitserve.engine.engine import LLMEngine
from splitserve.engine.loader import LoadedModel
from splitserve.engine.request import FinishReason, RequestState, SamplingParams, Sequence, StepOutput

__all__ = [
    "EngineConfig",
    "EngineRole",
    "FinishReason",
    "LLMEngine",
    "LoadedModel",
    "RequestState",
    "SamplingParams",
    "Sequence",
    "StepOutput",
]
