"""The transfer interface: a prefill server serves held payloads, a decode server pulls them.

The payload of a request is its exported KV blocks as raw bytes, in the layout documented in
``splitserve/engine/kv_cache.py``; its size is ``KvHandle.num_bytes``.

A puller that holds a prefix of the request's blocks in its own prefix cache pulls from its
`first_block`-th block on: the payload is then those blocks only (``pull_size``).

Ownership: while a transport is sending a request's payload it holds it open (``KvSource.open`` ..
``close``), and the prefill server neither releases nor lets the lease free those blocks in between.

Capability: every pull presents the request's KV capability (``KvHandle.capability``, minted by
the scheduler and known only to the prefill server and the decode server chosen for the request);
a wrong one opens nothing (``KvPermissionDenied``) and no byte is sent.
"""

from __future__ import annotations

import abc
import hmac
from typing import TYPE_CHECKING, Protocol

from splitserve.engine.block_manager import blocks_for
from splitserve.v1 import common_pb2 as pb

if TYPE_CHECKING:
    from splitserve.engine.kv_cache import KVLayout


class KvPullError(Exception):
    """A pull failed: the prefill server does not hold the request, or the transfer broke."""


class KvPermissionDenied(KvPullError):
    """The pull presented a wrong capability for the request (gRPC PERMISSION_DENIED)."""


def check_capability(expected: str, presented: str, request_id: str) -> None:
    """Raise KvPermissionDenied unless presented is the request's KV capability (constant time)."""
    if not hmac.compare_digest(expected.encode(), presented.encode()):
        raise KvPermissionDenied(f"a wrong KV capability for request {request_id}")


class InvalidKvHandle(KvPullError, ValueError):
    """A handle that cannot describe this server's KV (gRPC INVALID_ARGUMENT where it is an RPC)."""


def check_handle(handle: pb.KvHandle, layout: KVLayout) -> int:
    """The payload size a handle must name for a receiver whose cache has `layout`; raises
    InvalidKvHandle when it does not, before anything is allocated for it.

    The handle comes from a peer: its num_bytes is what a puller allocates, so it must follow from
    the token count and this server's own layout, never be taken on trust.
    """
    from splitserve.common.protoconv import layout_to_proto  # torch: only where a layout exists

    if handle.layout != layout_to_proto(layout):
        raise InvalidKvHandle(f"{handle.request_id}: KV layout {handle.layout} is not this server's")
    if handle.num_tokens <= 0:
        raise InvalidKvHandle(f"{handle.request_id}: a KV handle of {handle.num_tokens} tokens")
    num_blocks = blocks_for(handle.num_tokens, layout.block_size)
    num_bytes = num_blocks * layout.bytes_per_block
    if len(handle.block_ids) != num_blocks or handle.num_bytes != num_bytes:
        raise InvalidKvHandle(f"{handle.request_id}: {handle.num_tokens} tokens take {num_blocks} blocks "
                              f"of {num_bytes} bytes, the handle says {len(handle.block_ids)} blocks "
                              f"of {handle.num_bytes} bytes")
    return num_bytes


def pull_size(handle: pb.KvHandle, first_block: int) -> int:
    """The payload size of a pull of handle's blocks from first_block on; InvalidKvHandle when no
    block is left to pull, or the handle's bytes do not split evenly into its blocks."""
    if first_block == 0:  # the whole payload (synthetic benchmark handles list no blocks)
        return handle.num_bytes
    num_blocks = len(handle.block_ids)
    if not 0 < first_block < num_blocks:
        raise InvalidKvHandle(f"{handle.request_id}: a pull from block {first_block} of {num_blocks}")
    if handle.num_bytes % num_blocks:
        raise InvalidKvHandle(f"{handle.request_id}: {handle.num_bytes} bytes are not {num_blocks} "
                              f"equal blocks")
    return handle.num_bytes // num_blocks * (num_blocks - first_block)


class KvSource(Protocol):
    """What a prefill server offers a transport."""

    async def open(self, request_id: str, capability: str, first_block: int = 0) -> memoryview | None:
        """The payload of a held request from its first_block-th block on, pinned until close(); None
        when not held. Raises KvPermissionDenied, pinning nothing, when capability is not the
        request's, and InvalidKvHandle when first_block is not one of its blocks."""

    def close(self, request_id: str) -> None:
        """Unpin a payload opened before (its blocks may be released from now on)."""


class KvServer(abc.ABC):
    """Prefill side: serves payloads from a KvSource to pulling decode servers."""

    transport: int  # a pb.KvTransport value

    @property
    @abc.abstractmethod
    def address(self) -> str:
        """What goes into KvHandle.ucx_address ("" for transports that ride the gRPC API)."""

    @abc.abstractmethod
    async def start(self, source: KvSource) -> None: ...

    @abc.abstractmethod
    async def stop(self) -> None: ...


class KvPuller(abc.ABC):
    """Decode side: pulls the payload a handle names, into fresh memory.

    A puller given the receiving cache's layout refuses (InvalidKvHandle) a handle that does not fit
    it before allocating anything; without one (benchmarks of synthetic payloads) it trusts
    num_bytes. Either way a peer that sends more than num_bytes fails the pull.
    """

    async def start(self) -> None:
        """Set up ahead of the first pull (call inside the serving event loop); optional."""

    @abc.abstractmethod
    async def pull(self, handle: pb.KvHandle, first_block: int = 0) -> memoryview:
        """Exactly pull_size(handle, first_block) bytes (the blocks from first_block on), or
        KvPullError."""

    @abc.abstractmethod
    async def close(self) -> None: ...
