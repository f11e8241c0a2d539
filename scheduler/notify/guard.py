"""Where a webhook may go: the scheduler host must not become a way into internal networks.

A URL's host is resolved and every address it resolves to must be public, or inside one of
[notify] allow_networks. The check runs at submit (a clear refusal, exit 2) and again at every
delivery on the addresses actually connected to (`resolve_allowed` returns them and the sender
connects to exactly those), so a name that resolves elsewhere later (DNS rebinding) is refused.
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import socket
from collections.abc import Sequence
from urllib.parse import urlsplit

from jobs.notify import NotifyError, check_url
from scheduler.notify.pool import DaemonPool

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
RESOLVE_TIMEOUT_S = 3.0
# Addresses Python's ipaddress does not mark non-global but that lead inside a cloud or host.
_ALWAYS_INTERNAL = (
    ipaddress.ip_network("169.254.0.0/16"),  # link-local: cloud metadata at 169.254.169.254
    ipaddress.ip_network("100.64.0.0/10"),  # carrier-grade NAT, Alibaba metadata at 100.100.100.200
    ipaddress.ip_network("fd00:ec2::/32"),  # AWS metadata over IPv6 (fd00:ec2::254)
)
# Resolution runs on a small pool so a slow resolver costs the caller at most RESOLVE_TIMEOUT_S
# (and, its threads being daemon threads, never holds up the process's exit).
_resolver = DaemonPool(max_workers=4, thread_name_prefix="notify-dns")


class Refused(NotifyError):
    """The destination is not one gpulab may connect to; `str()` says why, in one line."""


class Unresolved(Refused):
    """The host did not resolve (now): refused at submit, tried again at delivery (DNS may be back)."""


def networks(allow: Sequence[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(n, strict=False) for n in allow)


def address_allowed(address: Address, allow: Sequence[Network]) -> bool:
    """Public (globally routable, not special) or explicitly allowed by an admin."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    if any(address in net for net in allow if net.version == address.version):
        return True
    if any(address in net for net in _ALWAYS_INTERNAL if net.version == address.version):
        return False
    return address.is_global and not address.is_multicast


def resolve_allowed(url: str, allow: Sequence[Network]) -> list[Address]:
    """The addresses to connect to for `url`, all of them allowed; raise Refused otherwise.
    Every address a name resolves to must be allowed (an attacker's name with one public and
    one internal address would otherwise win half the time)."""
    check_url(url)
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        literal: Address | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    found = [literal] if literal is not None else _resolve(host, port)
    refused = [a for a in found if not address_allowed(a, allow)]
    if refused:
        what = host if literal is not None else f"{host} ({refused[0]})"
        raise Refused(
            f"{what} is not a public address; webhooks may reach internal, loopback or link-local "
            "addresses only where an admin allows them ([notify] allow_networks)"
        )
    return found


def _resolve(host: str, port: int) -> list[Address]:
    future = _resolver.submit(socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM)
    try:
        infos = future.result(timeout=RESOLVE_TIMEOUT_S)
    except concurrent.futures.TimeoutError:
        raise Unresolved(f"cannot resolve {host} (no answer within {RESOLVE_TIMEOUT_S:.0f}s)") from None
    except (OSError, UnicodeError) as exc:
        raise Unresolved(f"cannot resolve {host} ({getattr(exc, 'strerror', None) or exc})") from None
    addresses: list[Address] = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise Unresolved(f"cannot resolve {host}")
    return addresses
