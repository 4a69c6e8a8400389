"""The engine: model runner, paged KV cache, scheduling and sampling. No gRPC, Redis or UCX here.

The public names load on first use, so the torch-free parts (block_manager, model_source) can be
imported by services that carry no torch (the gateway, the scheduler).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_PUBLIC = {
    "EngineConfig": "config", "EngineRole": "config", "LLMEngine": "engine", "LoadedModel": "loader",
    "FinishReason": "request", "RequestState": "request", "SamplingParams": "request",
    "Sequence": "request", "StepOutput": "request",
}
__all__ = sorted(_PUBLIC)

if TYPE_CHECKING:  # for type checkers; at run time __getattr__ loads them
    from splitserve.engine.config import EngineConfig, EngineRole  # noqa: F401
    from splitserve.engine.engine import LLMEngine  # noqa: F401
    from splitserve.engine.loader import LoadedModel  # noqa: F401
    from splitserve.engine.request import (  # noqa: F401
        FinishReason, RequestState, SamplingParams, Sequence, StepOutput)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
