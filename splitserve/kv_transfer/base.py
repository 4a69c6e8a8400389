"""The transfer interface: a prefill server serves held payloads, a decode server pulls them.

The payload of a request is its exported KV blocks as raw bytes, in the layout documented in
``splitserve/engine/kv_cache.py``; its size is ``KvHandle.num_bytes``.

Ownership: while a transport is sending a request's payload it holds it open (``KvSource.open`` ..
``close``), and the prefill server neither releases nor lets the lease free those blocks in between.
"""

from __future__ import annotations

import abc
from typing import Protocol

from splitserve.v1 import common_pb2 as pb


class KvPullError(Exception):
    """A pull failed: the prefill server does not hold the request, or the transfer broke."""


class KvSource(Protocol):
    """What a prefill server offers a transport."""

    async def open(self, request_id: str) -> memoryview | None:
        """The payload of a held request, pinned until close(); None when not held."""

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
    """Decode side: pulls the payload a handle names, into fresh memory."""

    async def start(self) -> None:
        """Set up ahead of the first pull (call inside the serving event loop); optional."""

    @abc.abstractmethod
    async def pull(self, handle: pb.KvHandle) -> memoryview:
        """Exactly handle.num_bytes bytes, or KvPullError."""

    @abc.abstractmethod
    async def close(self) -> None: ...
