"""Loading a model's weights by name into our model (finding its files is model_source.py)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch

from splitserve.engine.config import EngineConfig
from splitserve.engine.model_source import (  # noqa: F401  (re-exported: the loader's public names)
    DEFAULT_MODEL,
    ModelNotFound,
    ModelSource,
    _default_gguf,
    cache_root,
    eos_token_ids,
    resolve_model,
)
from splitserve.engine.models.llama import LlamaModel, ModelSpec, rope_cos_sin
from splitserve.engine.ops import select_ops

log = structlog.get_logger(__name__)


def iter_weights(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor in the folder's safetensors (or PyTorch .bin) files."""
    files = sorted(folder.glob("model*.safetensors")) or sorted(folder.glob("*.safetensors"))
    if files:
        from safetensors.torch import safe_open

        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        return
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if not bins:
        raise ModelNotFound(f"{folder}: no *.safetensors or pytorch_model*.bin weights")
    for file in bins:
        yield from torch.load(file, map_location="cpu", weights_only=True).items()


_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_SHARDS = {
    "self_attn.q_proj": ("self_attn.qkv", 0),
    "self_attn.k_proj": ("self_attn.qkv", 1),
    "self_attn.v_proj": ("self_attn.qkv", 2),
    "mlp.gate_proj": ("mlp.gate_up", 0),
    "mlp.up_proj": ("mlp.gate_up", 1),
}


def load_weights(model: torch.nn.Module, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Copy transformers-named tensors into our fused modules; fails on anything missing."""
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for name, tensor in weights:
        target, shard = _map_name(name)
        if target is None or (target == "lm_head.weight" and target not in params):
            continue  # rotary buffers, or a tied head stored anyway
        if target not in params:
            raise ValueError(f"checkpoint tensor {name} has no place in the model")
        param = params[target]
        if shard is None:
            param.data.copy_(tensor)
        else:
            _shard_slice(param, target, shard, model).copy_(tensor)
        loaded.add(target)
    missing = set(params) - loaded
    if missing:
        raise ValueError(f"checkpoint lacks tensors for: {sorted(missing)[:5]}")


def _map_name(name: str) -> tuple[str | None, int | None]:
    if "rotary_emb" in name:
        return None, None
    match = _LAYER.match(name)
    if not match:
        return name.removeprefix("model."), None
    index, rest = match.groups()
    module, _, leaf = rest.rpartition(".")
    if module in _SHARDS:
        fused, shard = _SHARDS[module]
        return f"layers.{index}.{fused}.{leaf}", shard
    return f"layers.{index}.{rest}", None


def _shard_slice(param: torch.Tensor, target: str, shard: int, model: Any) -> torch.Tensor:
    spec = model.spec
    if ".qkv." in target:
        q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        start, size = [(0, q), (q, kv), (q + kv, kv)][shard]
    else:
        size = spec.intermediate_size
        start = shard * size
    return param.data.narrow(0, start, size)


@dataclass(frozen=True)
class LoadedModel:
    """Weights, tokenizer and shape of a model, loadable once and shared by engines in a process."""

    source: ModelSource
    spec: ModelSpec
    model: LlamaModel
    tokenizer: object
    eos_token_ids: frozenset[int]
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def load(cls, config: EngineConfig) -> LoadedModel:
        from transformers import AutoConfig, AutoTokenizer

        started = time.monotonic()
        source = resolve_model(config.model)
        hf_config = AutoConfig.from_pretrained(source.path)
        spec = ModelSpec.from_hf_config(hf_config)
        ops = select_ops(config.torch_device, config.torch_dtype, spec.head_dim,
                         spec.num_heads // spec.num_kv_heads)
        with torch.device("meta"):
            model = LlamaModel(spec, ops)
        model = model.to(config.torch_dtype).to_empty(device=config.torch_device)  # allocated once, in dtype
        model.tie_weights()  # to_empty() unties parameters that were created on the meta device
        cos, sin = rope_cos_sin(hf_config, spec, config.torch_dtype)
        model.set_rope(cos.to(config.torch_device), sin.to(config.torch_device))
        load_weights(model, iter_weights(source.path))
        ops.prepare(model)
        model.eval()
        tokenizer = AutoTokenizer.from_pretrained(source.path)
        log.info("model loaded", model=source.name, path=str(source.path), dtype=config.dtype,
                 device=config.device, ops=ops.name, seconds=round(time.monotonic() - started, 2))
        return cls(source, spec, model, tokenizer, eos_token_ids(source, tokenizer), config.torch_dtype,
                   config.torch_device)
