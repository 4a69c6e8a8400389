"""The paged KV cache tensor, and the layout its blocks travel in between processes.

Layout (both in memory and on the wire): one tensor of shape
``[num_layers, 2, num_blocks, num_kv_heads, block_size, head_dim]`` where index 0 of the second axis
is K and 1 is V; each head's tile of a block (``block_size x head_dim``) is contiguous, so attention
streams it. On the wire a tile is plain rows (token-major). In memory it is too, except under the
CPU kernels with blocks of a multiple of 16 tokens, whose caches keep each tile in the kernels'
tiled layout (kernels/cpu_bf16.cpp, decode_attention), converted to and from plain rows on export
and import. Exporting a list of block ids gathers ``[:, :, block_ids]`` into a contiguous tensor of
shape
``[num_layers, 2, len(block_ids), num_kv_heads, block_size, head_dim]`` in the cache dtype;
importing writes such a tensor into (other) block ids. Two processes agree on a transfer when their
``KVLayout`` values are equal, whichever layout each keeps in memory.
"""

from __future__ import annotations

import contextlib
import math
import mmap
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * itemsize

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size

    def export_shape(self, num_blocks: int) -> tuple[int, ...]:
        return (self.num_layers, 2, num_blocks, self.num_kv_heads, self.block_size, self.head_dim)


class KVCache:
    """One preallocated tensor holding every layer's K and V in fixed-size blocks."""

    def __init__(self, layout: KVLayout, num_blocks: int, device: torch.device,
                 retile: Callable[[torch.Tensor, bool], None] | None = None) -> None:
        """retile, where the blocks are kept tiled (ops.retile_kv): converts exported blocks in place
        to plain rows (False) or imported ones to the tiled layout (True)."""
        if retile is not None and device.type != "cpu":
            raise ValueError("only a CPU cache keeps its blocks tiled")
        self.layout = layout
        self.num_blocks = num_blocks
        self.retile = retile
        shape = layout.export_shape(num_blocks)
        if device.type == "cpu":
            self.data = zeros_on_huge_pages(shape, layout.dtype)
        else:
            self.data = torch.zeros(shape, dtype=layout.dtype, device=device)
        # Each layer's views, made once: indexing anew costs ~3 us a layer, every step.
        self._layers = [(self.data[i, 0], self.data[i, 1]) for i in range(layout.num_layers)]

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one layer, each ``[num_blocks, num_kv_heads, block_size, head_dim]`` (each
        tile in the kernels' tiled layout where this cache has a retile)."""
        return self._layers[index]

    def export(self, block_ids: list[int]) -> torch.Tensor:
        """Copy the given blocks out as one contiguous tensor on the CPU (see module docstring)."""
        if self.data.device.type == "cpu":
            # numpy copies on the calling thread alone. torch's index_select would start an OpenMP
            # team on it, and a prefill server exports off its engine thread: a second team slows
            # every step (worker/engine_loop.py, load_engine).
            raw = self.data.view(torch.uint8).numpy()
            blocks = torch.from_numpy(np.take(raw, block_ids, axis=2)).view(self.layout.dtype)
            if self.retile is not None:
                self.retile(blocks, False)
            return blocks
        index = torch.tensor(block_ids, dtype=torch.long, device=self.data.device)
        return self.data.index_select(2, index).cpu().contiguous()

    def to_memory_layout(self, blocks: torch.Tensor) -> torch.Tensor:
        """Exported blocks (plain rows), converted in place to the layout this cache keeps in memory
        and returned; blocks must be a contiguous CPU tensor the caller owns, such as a pulled payload.
        On any thread (one thread alone, no OpenMP team), so that a decode server converts a payload
        before its engine thread writes it: import_ with in_memory_layout=True then only copies."""
        if self.retile is not None:
            if blocks.device.type != "cpu" or not blocks.is_contiguous():
                raise ValueError("blocks to convert in place must be a contiguous CPU tensor")
            self.retile(blocks, True)
        return blocks

    def import_(self, block_ids: list[int], blocks: torch.Tensor, in_memory_layout: bool = False) -> None:
        """Write exported blocks into block_ids of this cache; in_memory_layout: they were converted
        by to_memory_layout already (else a copy is converted here)."""
        expected = self.layout.export_shape(len(block_ids))
        if tuple(blocks.shape) != expected or blocks.dtype != self.layout.dtype:
            raise ValueError(
                f"KV blocks of shape {tuple(blocks.shape)} {blocks.dtype} do not match this cache's "
                f"layout {expected} {self.layout.dtype}"
            )
        if self.retile is not None and not in_memory_layout:
            # numpy copies on this thread alone (see export); the caller's tensor stays as it was
            copy = torch.from_numpy(np.array(blocks.cpu().view(torch.int16).numpy(), order="C"))
            blocks = self.to_memory_layout(copy.view(self.layout.dtype))
        index = torch.tensor(block_ids, dtype=torch.long, device=self.data.device)
        self.data.index_copy_(2, index, blocks.to(self.data.device))

    def import_bytes(self, block_ids: list[int], payload: bytes | memoryview) -> None:
        """Import blocks that arrived as raw bytes in the export layout."""
        flat = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        blocks = flat.view(self.layout.dtype).view(self.layout.export_shape(len(block_ids)))
        self.import_(block_ids, self.to_memory_layout(blocks), in_memory_layout=True)


HUGE_PAGE = 2 << 20


def zeros_on_huge_pages(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed CPU tensor in private anonymous memory that asks Linux for 2 MiB pages
    (``MADV_HUGEPAGE``; honoured where transparent huge pages are ``always`` or ``madvise``).

    The decode attention reads each sequence's blocks wherever the block manager put them: with 4 KiB
    pages nearly every 6 KiB block is a TLB miss, and such reads stream from memory at about half the
    rate of a sequential read (docs/benchmarks.md). The memory is touched here, as torch.zeros would
    (with THP's `defrag` at `madvise`, a fragmented machine may compact memory for it first). Where
    the kernel has no THP the pages stay small; where there is no anonymous mmap, torch.zeros.
    """
    if not hasattr(mmap, "MAP_ANONYMOUS"):
        return torch.zeros(shape, dtype=dtype)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(AttributeError, OSError):  # no MADV_HUGEPAGE, or a kernel without THP
        region.madvise(mmap.MADV_HUGEPAGE)
    flat = torch.frombuffer(region, dtype=torch.uint8)  # holds a reference to the region
    start = -flat.data_ptr() % HUGE_PAGE  # 2 MiB pages map only 2 MiB-aligned addresses
    data = flat[start:start + nbytes].view(dtype).view(shape)
    data.zero_()
    return data


def export_bytes(blocks: torch.Tensor) -> memoryview:
    """Raw bytes of an exported block tensor (contiguous, CPU), without a copy."""
    return memoryview(blocks.contiguous().view(torch.uint8).numpy()).cast("B")
