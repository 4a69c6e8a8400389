"""Addresses and ports."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the caller binds it soon after)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def advertised_host(bind_host: str) -> str:
    """The host other processes should dial to reach a server bound to bind_host."""
    if bind_host in ("0.0.0.0", "::", ""):
        return socket.gethostname()
    return bind_host
