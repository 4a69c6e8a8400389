"""Addresses and ports."""

from __future__ import annotations

import asyncio
import ipaddress
import random
import socket
import urllib.parse

PORT_FLOOR = 10000  # free_port's ports lie between this and the kernel's ephemeral range
_handed: set[int] = set()  # this process's free_port answers, never given twice


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the caller binds it soon after), below the kernel's
    ephemeral range where it can be: a port in that range can go to any process that binds port 0
    (every worker's gRPC server does) or to an outgoing connection before its caller binds it (seen:
    a worker took the gateway's HTTP port, and `up` read gRPC's HTTP/2 from its readiness check)."""
    low = _ephemeral_low()
    for _ in range(64 if low > PORT_FLOOR + 1000 else 0):
        port = random.randrange(PORT_FLOOR, low)
        if port in _handed:
            continue
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        _handed.add(port)
        return port
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out for port 0 and outgoing connections (Linux's default
    where it cannot be read)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


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


RESOLVE_TIMEOUT_S = 2.0  # a name a caller chose must not hold the resolver's threads for long


async def host_is_peer(host: str, peer: str) -> bool:
    """Whether host (an address a worker advertises) names the machine the gRPC peer connected
    from: every address it resolves to is the peer's, or, for a peer on loopback (a process on
    this machine), an address of this machine.

    Every address, not any: a name that also resolves elsewhere could send the traffic there when
    it is resolved again to dial it."""
    ip = peer_ip(peer)
    if ip is None:
        return False
    try:
        async with asyncio.timeout(RESOLVE_TIMEOUT_S):
            infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError, TimeoutError):
        return False
    resolved = {_plain(ipaddress.ip_address(info[4][0].partition("%")[0])) for info in infos}
    if ip.is_loopback:
        return bool(resolved) and all(a.is_loopback or _is_local(a) for a in resolved)
    return resolved == {ip}


def _is_local(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether ip is an address of this machine (a socket can bind it)."""
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((str(ip), 0))
        except OSError:
            return False
    return True


def _plain(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An IPv4 address mapped into IPv6 (::ffff:10.0.0.5), as the IPv4 address it is."""
    return (ip.ipv4_mapped or ip) if isinstance(ip, ipaddress.IPv6Address) else ip


def scheduler_addresses(value: str) -> list[str]:
    """The host:port addresses of a --scheduler value (comma-separated); ValueError when empty."""
    addresses = [a.strip() for a in value.split(",") if a.strip()]
    if not addresses or any(":" not in a for a in addresses):
        raise ValueError(f"--scheduler {value!r}: expected host:port[,host:port...]")
    return addresses
