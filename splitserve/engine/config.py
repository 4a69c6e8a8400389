"""The engine's one frozen configuration."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

MAX_PREFILL_SLICE_MS = 60_000.0
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class EngineRole(enum.Enum):
    """What an engine instance does with a request after prefill."""

    COLOCATED = "colocated"  # prefill and decode here
    PREFILL = "prefill"  # prefill, then hold the KV blocks until they are exported and released
    DECODE = "decode"  # receive KV blocks and decode


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # HF id, folder or .gguf; None = the bundled default
    dtype: str = "bfloat16"  # measured faster on CPUs with AVX512_BF16 and on GPUs; see README
    device: str = "cpu"
    block_size: int = 16
    kv_cache_bytes: int = 1 << 30
    token_budget: int = 2048
    max_num_seqs: int = 64
    max_model_len: int | None = None  # None = the model's max_position_embeddings
    role: EngineRole = EngineRole.COLOCATED
    # Chunked prefill (colocated only): every step carries the running decodes plus prompt chunks,
    # at most chunk_size tokens in all. None: a waiting prompt runs whole first, stalling decodes.
    chunk_size: int | None = None
    # Layered prefill (colocated only): while sequences are decoding, a prompt batch's forward pass
    # runs a slice of layer parts (a layer's attention, or its MLP) per step, those expected to end
    # within this many milliseconds (one part at least), with a decode step between slices. None: the
    # pass runs whole, stalling the decodes for all of it.
    prefill_slice_ms: float | None = None
    # Automatic prefix caching: full prompt blocks stay cached after their request ends, and a
    # prompt starting with cached blocks computes only the rest. Decode engines cache nothing.
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name in ("block_size", "kv_cache_bytes", "token_budget", "max_num_seqs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.chunk_size is not None:
            if self.chunk_size < 1:
                raise ValueError("chunk_size must be >= 1")
            if self.role is not EngineRole.COLOCATED:
                raise ValueError("chunked prefill is for a colocated engine (it mixes prefill and decode)")
        if self.prefill_slice_ms is not None:
            if not 0 < self.prefill_slice_ms <= MAX_PREFILL_SLICE_MS:
                raise ValueError(f"prefill_slice_ms must be in (0, {MAX_PREFILL_SLICE_MS:g}]")
            if self.role is not EngineRole.COLOCATED or self.chunk_size is not None:
                raise ValueError("layered prefill is for a colocated engine without chunked prefill")
        try:
            device = torch.device(self.device)
        except RuntimeError as exc:
            raise ValueError(f"device {self.device!r} is not a torch device (cpu, cuda, cuda:N)") from exc
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device cuda was asked for, but this torch build sees no CUDA device")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)
