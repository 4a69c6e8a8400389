"""Compiled CPU kernels, built once per torch installation and checkout into the cache, loaded on demand.

The build needs a C++ compiler and runs only on CPUs with AVX512_BF16; anywhere else (or with
SPLITSERVE_KERNELS=0) load_cpu_kernels() returns None and the engine uses plain torch ops. Where the
CPU also has AMX_BF16 (Sapphire Rapids and later), the GEMMs and the prefill attention run on AMX
tiles, 3-10x the AVX512 rate from 8 rows up; SPLITSERVE_AMX=0 keeps them on AVX512.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import structlog

from splitserve.common.cpuinfo import cpuinfo_field
from splitserve.engine.model_source import cache_lock, cache_root

log = structlog.get_logger(__name__)

SOURCE = Path(__file__).with_name("cpu_bf16.cpp")
REQUIRED_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")
AMX_FLAGS = ("amx_tile", "amx_bf16")
# -fopenmp makes at::parallel_for parallel (it is inlined from ATen's headers); the library then
# needs libgomp.so.1, which resolves to the copy torch has already loaded: one thread pool.
CFLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma"]
LDFLAGS = ["-fopenmp"]


def cpu_flags() -> set[str]:
    return set(cpuinfo_field("flags").split())


ZEN4_FAMILY, ZEN5_FAMILY = 25, 26


def amd_family() -> int | None:
    """This CPU's family where it is AMD's (25: Zen 3 and 4, 26: Zen 5), else None."""
    family = cpuinfo_field("cpu family")
    return int(family) if cpuinfo_field("vendor_id") == "AuthenticAMD" and family.isdigit() else None


def attention_prefetch() -> str:
    """How the decode attention prefetches K and V, by what was measured fastest (docs/benchmarks.md):
    into L1 a block at a time on AMD's Zen 5 (CPU family 26 and later); into L2 a line for each line
    read on AMD's Zen 4 (family 25); into L2 a block at a time on Intel's Sapphire Rapids and wherever
    it was not measured."""
    family = amd_family()
    if family is None:
        return "l2"
    if family >= ZEN5_FAMILY:
        return "l1"
    return "l2-lines" if family == ZEN4_FAMILY else "l2"


def decode_pipeline_wanted() -> bool:
    """Whether DecodeLayers runs its larger decode steps pipelined (one half of the batch's attention
    beside the other half's GEMMs): SPLITSERVE_DECODE_PIPELINE=1 or 0 says; unset, where it was
    measured quicker, AMD's Zen 4 (CPU family 25: up to 8-17% off the step at 32-96 sequences of 1,024
    tokens; docs/benchmarks.md, "The attention beside the GEMMs"). Elsewhere it was not measured, and
    steps run kernel by kernel as before."""
    setting = os.environ.get("SPLITSERVE_DECODE_PIPELINE", "")
    if setting:
        if setting not in ("0", "1"):
            raise ValueError(f"SPLITSERVE_DECODE_PIPELINE must be 0 or 1, not {setting[:20]!r}")
        return setting == "1"
    return amd_family() == ZEN4_FAMILY


def kernels_enabled() -> bool:
    return os.environ.get("SPLITSERVE_KERNELS", "1") != "0" and set(REQUIRED_FLAGS) <= cpu_flags()


def amx_wanted() -> bool:
    return os.environ.get("SPLITSERVE_AMX", "1") != "0" and set(AMX_FLAGS) <= cpu_flags()


def _enable_amx(module: ModuleType) -> None:
    """Turn the AMX GEMM path on where the CPU has it and Linux grants the tile state."""
    if amx_wanted() and not module.amx_enable():
        log.warning("cpu has AMX but Linux refused its tile state; GEMMs stay on AVX512")


def kernels_build_dir(torch_module: ModuleType, source: Path = SOURCE) -> Path:
    """Where the kernels are built and cached: one folder per source (its bytes and its path),
    compiler flags and torch installation. torch takes a build made from another file or against
    another torch for stale, so two environments with the same torch version (a development venv and a
    CI clone's), or two checkouts sharing one venv, each get their own: when they shared one, each
    rebuilt the other's build, ~35-45 s at its next start."""
    torch_dir = str(Path(torch_module.__file__).resolve().parent)
    key = [source.read_bytes(), str(source.resolve()).encode(), " ".join(CFLAGS).encode(), torch_dir.encode()]
    digest = hashlib.sha256(b"\0".join(key)).hexdigest()[:12]
    return cache_root() / "kernels" / f"torch{torch_module.__version__}-{digest}"


STALE_LOCK_S = 600  # a build takes ~40 s: without the flock, a lock this old was left by a dead build


@contextlib.contextmanager
def _build_lock(build_dir: Path) -> Iterator[None]:
    """Held while this process loads (and so maybe builds) the kernels in build_dir.

    torch's own build lock is a file it creates and removes; when its owner is killed mid-build the
    file stays, and every later load waits on it forever (a worker stopped during its first start
    left each following start hanging, silent). Every load here first takes the cache's lock for
    build_dir, which goes with its holder: whoever holds it knows a torch lock file there is stale.
    On a file system without locks, only one older than STALE_LOCK_S is taken for stale.
    """
    with cache_lock(build_dir.name, "another process building the cpu kernels") as held:
        stale = build_dir / "lock"
        try:
            if held or time.time() - stale.stat().st_mtime > STALE_LOCK_S:
                stale.unlink()
                log.warning("removed the kernel build lock of a process killed mid-build", path=str(stale))
        except FileNotFoundError:
            pass
        yield


@functools.cache
def load_cpu_kernels() -> ModuleType | None:
    """The compiled module, or None where it cannot run; logs why."""
    if not kernels_enabled():
        log.info("cpu kernels off", reason="SPLITSERVE_KERNELS=0 or no AVX512_BF16")
        return None
    import torch
    from torch.utils import cpp_extension

    build_dir = kernels_build_dir(torch)
    digest = build_dir.name.rsplit("-", 1)[1]
    build_dir.mkdir(parents=True, exist_ok=True)
    name = f"splitserve_cpu_bf16_{digest}"
    try:
        with _build_lock(build_dir):
            if not (build_dir / f"{name}.so").exists():  # a start silent for ~40 s looked hung
                log.info("building the cpu kernels, once per checkout and torch (~40 s)",
                         build_dir=str(build_dir))
            module = cpp_extension.load(
                name=name,
                sources=[str(SOURCE)],
                extra_cflags=CFLAGS,
                extra_ldflags=LDFLAGS,
                build_directory=str(build_dir),
                verbose=False,
            )
    except (RuntimeError, OSError, ImportError) as exc:
        log.warning("cpu kernels failed to build or load; using torch ops", error=str(exc)[:500])
        return None
    _enable_amx(module)
    module.set_attention_prefetch(attention_prefetch())
    module.set_decode_pipeline(decode_pipeline_wanted())
    log.info("cpu kernels loaded", amx=module.amx_enabled(), attention_prefetch=module.attention_prefetch(),
             decode_pipeline=module.decode_pipeline())
    return module

