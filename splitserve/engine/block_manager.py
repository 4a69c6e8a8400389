"""Paged KV block accounting: which request owns which block ids, and which full blocks hold a
known prompt prefix (the prefix cache). Pure: no torch, no I/O."""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

MAX_CACHE_SALT_CHARS = 256  # a request's cache_salt; the gateway refuses longer ones with HTTP 400


class OutOfBlocks(Exception):
    """Raised when an allocation needs more free blocks than there are."""


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def block_hashes(token_ids: Sequence[int], block_size: int, salt: str | None = None,
                 namespace: str = "") -> list[bytes]:
    """The hash of each full block of token_ids, chained: block i's covers its tokens and block i-1's
    hash, so equal hashes mean equal prefixes. SHA-256, so a collision is not a practical concern.

    The chain starts from the namespace (an engine's model, dtype and block size: KV blocks are equal
    only under equal ones, which matters when hashes cross workers) and the salt (vLLM's cache_salt),
    so requests with different salts never share a block.
    """
    root = b"splitserve-prefix\x00"
    for part in (namespace.encode(), (salt or "").encode()):
        root += struct.pack("<I", len(part)) + part
    parent = hashlib.sha256(root).digest()
    hashes = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        block = token_ids[start:start + block_size]
        parent = hashlib.sha256(parent + struct.pack(f"<{block_size}I", *block)).digest()
        hashes.append(parent)
    return hashes


def routing_key(block_hash: bytes) -> int:
    """The 64-bit key under which a worker publishes a cached block for routing (a hint: a collision
    only misroutes a request, the worker matches full hashes)."""
    return int.from_bytes(block_hash[:8], "little")


@dataclass
class PrefixCacheStats:
    """vLLM's counters: prompt tokens looked up in the cache, and how many of them were found."""

    queries: int = 0
    hits: int = 0


class BlockManager:
    """Hands out fixed-size KV blocks to requests and takes them back; keeps full prompt blocks cached.

    A block is free, held (by one or more requests' tables: a reference count), or cached and
    unheld. Free blocks are kept as extents (runs of consecutive ids), and a table is kept in runs:
    the decode attention reads a run as one stream, where the tables of a free list that reused
    blocks first freed, first taken cost a decode step at 1,024 tokens of context 16-25% more after
    churn (docs/benchmarks.md, "Tables kept in runs"). So a table takes the block after its last one
    while that is free; otherwise it starts a new run in the largest free extent, at its start when
    it starts the cache, else in its middle, leaving the first half to the table that ends just
    before it (many sequences grow at once, and taking the next free block each would interleave
    them). Finding the largest extent scans them all (as many as the gaps between held runs), only
    when a run starts. Among equal extents the one whose entry was written first wins, so
    allocation is deterministic and testable.

    With caching on, a full block whose hash was registered (cache()) keeps its content when its
    last holder frees it, and is taken back (its hash forgotten) only when no plain free block is
    left, least recently used first. A request's blocks are released tail first, so a shared prefix
    outlives its suffixes.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._extents: dict[int, int] = {0: num_blocks}  # free runs: first block -> length
        self._extent_ending: dict[int, int] = {num_blocks: 0}  # the other way: one past the last -> first
        self._num_free = num_blocks  # blocks in the extents
        self._tables: dict[str, list[int]] = {}
        self._refs = [0] * num_blocks
        self._cached: dict[bytes, int] = {}  # block hash -> the block holding it
        self._hash_of: dict[int, bytes] = {}  # the other way round
        self._unheld: OrderedDict[int, None] = OrderedDict()  # cached, no holder: least recently used first
        self.stats = PrefixCacheStats()
        self.version = 0  # counts changes to the set of cached hashes

    def cached_keys(self) -> list[int]:
        """The routing keys of every cached block (what a worker publishes to its schedulers)."""
        return [routing_key(h) for h in self._cached]

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take: plain free ones and cached ones no request holds."""
        return self._num_free + len(self._unheld)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def block_table(self, request_id: str) -> list[int]:
        return self._tables[request_id]

    def owns(self, request_id: str) -> bool:
        return request_id in self._tables

    def cached_prefix(self, hashes: Sequence[bytes]) -> list[int]:
        """The blocks holding the longest cached run of hashes from the first (a pure lookup)."""
        found = []
        for h in hashes:
            block = self._cached.get(h)
            if block is None:
                break
            found.append(block)
        return found

    def can_allocate(self, num_tokens: int, hashes: Sequence[bytes] = ()) -> bool:
        return self._fits(num_tokens, self.cached_prefix(hashes))

    def _fits(self, num_tokens: int, hits: list[int]) -> bool:
        """Whether num_tokens fit when the request reuses the cached blocks hits."""
        reclaimed = sum(1 for b in hits if self._refs[b] == 0)  # counted free, but the request keeps them
        return blocks_for(num_tokens, self.block_size) - len(hits) <= self.num_free_blocks - reclaimed

    def allocate(self, request_id: str, num_tokens: int, hashes: Sequence[bytes] = ()) -> list[int]:
        """Reserve blocks for a new request's first num_tokens tokens; returns its block table.

        The table starts with the cached blocks of the longest run of hashes found (the caller's
        tokens there are already computed: cached_prefix() says how many); the rest are fresh.
        """
        if request_id in self._tables:
            raise ValueError(f"request {request_id!r} already holds blocks")
        hits = self.cached_prefix(hashes)
        if not self._fits(num_tokens, hits):
            raise OutOfBlocks(f"need {blocks_for(num_tokens, self.block_size)} blocks, "
                              f"{self.num_free_blocks} free")
        if hashes:
            self.stats.queries += num_tokens
            self.stats.hits += len(hits) * self.block_size
        for block in hits:
            self._hold(block)
        fresh = self._take(blocks_for(num_tokens, self.block_size) - len(hits), hits[-1] if hits else None)
        self._tables[request_id] = hits + fresh
        return self._tables[request_id]

    def cache(self, request_id: str, hashes: Sequence[bytes]) -> None:
        """Register the request's first len(hashes) blocks, now computed, under their hashes.

        A hash already cached in another block keeps that block (the request's copy stays private).
        """
        for block, h in zip(self._tables[request_id], hashes):
            if h not in self._cached and block not in self._hash_of:
                self._cached[h] = block
                self._hash_of[block] = h
                self.version += 1

    def num_blocks_needed(self, request_id: str, num_tokens: int) -> int:
        """How many more blocks the request needs to hold num_tokens tokens."""
        have = len(self._tables[request_id])
        return max(0, blocks_for(num_tokens, self.block_size) - have)

    def grow(self, request_id: str, num_tokens: int) -> list[int]:
        """Extend a request's table so it can hold num_tokens tokens; returns the new block ids."""
        table = self._tables[request_id]
        new_ids = self._take(self.num_blocks_needed(request_id, num_tokens), table[-1] if table else None)
        table.extend(new_ids)
        return new_ids

    def free(self, request_id: str) -> list[int]:
        """Release a request's blocks, tail first; returns its table. Unknown ids free nothing.

        A block no one else holds goes back to the free extents, or, if it is cached, stays cached
        (most recently used) until an allocation needs it.
        """
        block_ids = self._tables.pop(request_id, [])
        for block in block_ids:
            self._refs[block] -= 1
        released = [b for b in block_ids if self._refs[b] == 0]
        for block in released:
            if block not in self._hash_of:
                self._release(block)
        self._unheld.update((b, None) for b in reversed(released) if b in self._hash_of)
        return block_ids

    def reset_cache(self) -> int:
        """Forget every cached hash (held blocks stay with their requests); returns how many."""
        forgotten = len(self._cached)
        for block in self._unheld:
            self._release(block)
        self._unheld.clear()
        self._cached.clear()
        self._hash_of.clear()
        self.version += 1
        return forgotten

    def _hold(self, block: int) -> None:
        self._refs[block] += 1
        self._unheld.pop(block, None)

    def _take(self, n: int, after: int | None = None) -> list[int]:
        """n blocks, continuing the run that ends at block after where its next blocks are free;
        cached unheld blocks (least recently used first) only once no plain free block is left."""
        if n > self.num_free_blocks:
            raise OutOfBlocks(f"need {n} blocks, {self.num_free_blocks} free")
        taken: list[int] = []
        while len(taken) < n and self._extents:
            last = taken[-1] if taken else after
            want = n - len(taken)
            if last is not None and last + 1 in self._extents:
                first, offset = last + 1, 0
                count = min(want, self._extents[first])
            else:
                first = max(self._extents, key=self._extents.__getitem__)
                count = min(want, self._extents[first])
                offset = 0 if first == 0 else (self._extents[first] - count) // 2
            self._carve(first, offset, count)
            taken.extend(range(first + offset, first + offset + count))
        while len(taken) < n:  # evict the least recently used cached block
            block, _ = self._unheld.popitem(last=False)
            del self._cached[self._hash_of.pop(block)]
            self.version += 1
            taken.append(block)
        for block in taken:
            self._refs[block] = 1
        return taken

    def _carve(self, first: int, offset: int, count: int) -> None:
        """Take blocks first + offset .. + count out of the free extent that starts at first."""
        length = self._extents.pop(first)
        del self._extent_ending[first + length]
        self._num_free -= count
        if offset:
            self._extents[first] = offset
            self._extent_ending[first + offset] = first
        rest = length - offset - count
        if rest:
            self._extents[first + offset + count] = rest
            self._extent_ending[first + length] = first + offset + count

    def _release(self, block: int) -> None:
        """Put a block back into the free extents, joining the extents either side of it."""
        first, length = block, 1
        left = self._extent_ending.pop(block, None)
        if left is not None:
            first, length = left, self._extents.pop(left) + 1
        right = self._extents.pop(block + 1, None)
        if right is not None:
            del self._extent_ending[block + 1 + right]
            length += right
        self._extents[first] = length
        self._extent_ending[first + length] = first
        self._num_free += 1
