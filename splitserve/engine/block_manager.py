"""Paged KV block accounting: which request owns which block ids. Pure: no torch, no I/O."""

from __future__ import annotations

from collections import deque


class OutOfBlocks(Exception):
    """Raised when an allocation needs more free blocks than there are."""


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockManager:
    """Hands out fixed-size KV blocks to requests and takes them back.

    Free blocks are reused in the order they were freed (FIFO), starting from ids 0..num_blocks-1,
    so allocation order is deterministic and testable.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._tables: dict[str, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def block_table(self, request_id: str) -> list[int]:
        return self._tables[request_id]

    def owns(self, request_id: str) -> bool:
        return request_id in self._tables

    def can_allocate(self, num_tokens: int) -> bool:
        return blocks_for(num_tokens, self.block_size) <= len(self._free)

    def allocate(self, request_id: str, num_tokens: int) -> list[int]:
        """Reserve blocks for a new request's first num_tokens tokens; returns its block table."""
        if request_id in self._tables:
            raise ValueError(f"request {request_id!r} already holds blocks")
        self._tables[request_id] = self._take(blocks_for(num_tokens, self.block_size))
        return self._tables[request_id]

    def num_blocks_needed(self, request_id: str, num_tokens: int) -> int:
        """How many more blocks the request needs to hold num_tokens tokens."""
        have = len(self._tables[request_id])
        return max(0, blocks_for(num_tokens, self.block_size) - have)

    def grow(self, request_id: str, num_tokens: int) -> list[int]:
        """Extend a request's table so it can hold num_tokens tokens; returns the new block ids."""
        new_ids = self._take(self.num_blocks_needed(request_id, num_tokens))
        self._tables[request_id].extend(new_ids)
        return new_ids

    def free(self, request_id: str) -> list[int]:
        """Return all of a request's blocks to the free list; returns them. Unknown ids free nothing."""
        block_ids = self._tables.pop(request_id, [])
        self._free.extend(block_ids)
        return block_ids

    def _take(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(f"need {n} blocks, {len(self._free)} free")
        return [self._free.popleft() for _ in range(n)]
