"""The paged KV cache's memory: zeroed, on 2 MiB pages where Linux offers them, and its blocks export
and import as before."""

from __future__ import annotations

import gc
import re
from pathlib import Path

import pytest
import torch

from splitserve.engine.kernels import kernels_enabled, load_cpu_kernels
from splitserve.engine.kv_cache import KVCache, KVLayout
from splitserve.engine.ops import CpuKernelOps

THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _mapping_of(address: int) -> dict[str, str]:
    """The /proc/self/smaps fields of the mapping that holds address."""
    fields: dict[str, str] = {}
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        span = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if span:
            if inside:
                break
            inside = int(span.group(1), 16) <= address < int(span.group(2), 16)
        elif inside and ":" in line:
            key, value = line.split(":", 1)
            fields[key] = value.strip()
    return fields


def _cache(num_blocks: int = 64) -> KVCache:
    layout = KVLayout(num_layers=4, num_kv_heads=3, head_dim=64, block_size=16, dtype=torch.bfloat16)
    return KVCache(layout, num_blocks, torch.device("cpu"))  # 64 blocks: 6 MiB


@pytest.mark.skipif(not THP_MODE.exists(), reason="this kernel has no transparent huge pages")
def test_the_cpu_kv_cache_asks_linux_for_huge_pages() -> None:
    cache = _cache()
    mapping = _mapping_of(cache.data.data_ptr())
    # "hg": the mapping was advised MADV_HUGEPAGE, whatever the system's THP mode (with "madvise", as
    # on most distributions, only such memory gets huge pages; torch's own allocation does not ask).
    assert "hg" in mapping["VmFlags"].split(), mapping
    assert cache.data.data_ptr() % (2 << 20) == 0


def test_the_kv_cache_is_zeroed_outlives_its_region_handle_and_round_trips_blocks() -> None:
    cache = _cache()
    assert cache.data.is_contiguous() and tuple(cache.data.shape) == (4, 2, 64, 3, 16, 64)
    assert not cache.data.any()
    gc.collect()  # the mapping's only holder is the tensor (torch.frombuffer's reference): still usable
    blocks = torch.randn(4, 2, 3, 3, 16, 64).bfloat16()
    cache.import_([5, 63, 0], blocks)
    assert torch.equal(cache.export([5, 63, 0]), blocks)
    k, v = cache.layer(2)
    assert torch.equal(k[63], blocks[2, 0, 1]) and torch.equal(v[0], blocks[2, 1, 2])


@pytest.mark.skipif(not kernels_enabled(), reason="this CPU has no AVX512_BF16")
def test_a_tiled_cache_exports_and_imports_plain_rows() -> None:
    """Under the CPU kernels blocks are kept tiled in memory but travel in plain rows, so a peer that
    keeps them plain (another device, or the kernels off) reads the same tokens."""
    kernels = load_cpu_kernels()
    assert kernels is not None, "kernels failed to build on a CPU that supports them"
    ops = CpuKernelOps(kernels)
    layout = KVLayout(num_layers=4, num_kv_heads=3, head_dim=64, block_size=16, dtype=torch.bfloat16)
    cache = KVCache(layout, 64, torch.device("cpu"), retile=ops.retile_kv)
    plain_cache = _cache()
    blocks = torch.randn(4, 2, 3, 3, 16, 64).bfloat16()
    sent = blocks.clone()
    cache.import_([5, 63, 0], blocks)
    plain_cache.import_([5, 63, 0], blocks)
    assert torch.equal(blocks, sent)  # the caller's tensor is not rewritten
    assert not torch.equal(cache.data, plain_cache.data)  # kept tiled ...
    tiled = plain_cache.data.clone()
    ops.retile_kv(tiled, True)
    assert torch.equal(cache.data, tiled)  # ... as the kernels read them
    assert torch.equal(cache.export([5, 63, 0]), blocks)  # and exported plain
    cache.import_bytes([1, 2, 3], memoryview(plain_cache.export([0, 5, 63]).view(torch.uint8).numpy()))
    assert torch.equal(cache.export([1, 2, 3]), blocks[:, :, [2, 0, 1]])
    # A decode server converts its own payload first, then imports it as it is.
    payload = plain_cache.export([63]).clone()
    cache.import_([7], cache.to_memory_layout(payload), in_memory_layout=True)
    assert torch.equal(cache.export([7]), blocks[:, :, [1]])
    with pytest.raises(ValueError):
        cache.to_memory_layout(blocks[:, :, :2])  # not contiguous: never converted in place
    with pytest.raises(ValueError):
        KVCache(layout, 4, torch.device("meta"), retile=ops.retile_kv)  # only a CPU cache is tiled
