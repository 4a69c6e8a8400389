"""Addresses and ports."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import urllib.parse


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


def peer_ip(peer: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP of a gRPC peer ("ipv4:10.0.0.5:5123", "ipv6:[::1]:5123"); None for any other kind."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return None
    host = urllib.parse.unquote(rest.rpartition(":")[0]).strip("[]").partition("%")[0]
    try:
        return _plain(ipaddress.ip_address(host))
    except ValueError:
        return None


async def host_is_peer(host: str, peer: str) -> bool:
    """Whether host (an address a worker advertises) names the machine the gRPC peer connected
    from: one of its resolved addresses is the peer's, or both are loopback."""
    ip = peer_ip(peer)
    if ip is None:
        return False
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return False
    resolved = {_plain(ipaddress.ip_address(info[4][0].partition("%")[0])) for info in infos}
    return ip in resolved or (ip.is_loopback and any(a.is_loopback for a in resolved))


def _plain(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An IPv4 address mapped into IPv6 (::ffff:10.0.0.5), as the IPv4 address it is."""
    return (ip.ipv4_mapped or ip) if isinstance(ip, ipaddress.IPv6Address) else ip
