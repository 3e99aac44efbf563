"""One address guard for every hop an upstream request makes.

The first request, each redirect and a token realm are all hops. A hop may reach:

- the exact ``host:port`` of a base URL the config names (the upstream's ``url`` or its own
  host, each mirror): a private registry on ``10.0.0.5:5000`` may be dialled, but a redirect
  from it to ``10.0.0.5:9000`` or ``127.0.0.1:5000`` is checked like any other hop;
- a target the upstream lists in ``allow_redirect_to`` (``host:port``, ``host``, ``*.domain``,
  with or without a port), e.g. the private object storage an on-site registry redirects to;
- anything else only if every address it resolves to is public: loopback, private, link-local,
  multicast, reserved and unspecified addresses are refused. The ``*`` entry also needs https.

Names are checked where they are resolved: :class:`GuardedResolver` is the connector's resolver,
so the connection goes to the very addresses that were checked (no second lookup for DNS
rebinding to slip through). IP literals never reach a resolver; :meth:`AddressGuard.refusal`
checks them before the request is sent.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import socket
from collections.abc import Iterable
from typing import Final

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

_DEFAULT_PORTS: Final = {"http": 80, "https": 443}


class AddressRefused(OSError):
    """A hop the guard refused (raised by the resolver, so aiohttp hands it back as the cause)."""


def is_public(address: str) -> bool:
    """A globally routable unicast address (IPv4-mapped IPv6 judged as the IPv4 it maps)."""
    try:
        ip = ipaddress.ip_address(address.strip("[]").split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def _host(host: str) -> str:
    return host.strip("[]").rstrip(".").lower()


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


def _pattern(text: str) -> tuple[str, int | None]:
    """``host[:port]``, ``*.domain[:port]`` or ``[v6][:port]`` -> (host pattern, port or None)."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":")
        return _host(host), int(port) if port else None
    host, sep, port = text.rpartition(":")
    if sep and port.isdigit():
        return _host(host), int(port)
    return _host(text), None


class AddressGuard:
    """What one upstream client may dial; shared by its resolver and its request path."""

    def __init__(self, named: Iterable[URL], allow: Iterable[str], *, https_only: bool) -> None:
        self._named = frozenset(
            (_host(u.host or ""), u.port or _DEFAULT_PORTS.get(u.scheme, 0)) for u in named
        )
        self._allow = tuple(_pattern(p) for p in allow)
        self.https_only = https_only

    def trusted(self, host: str, port: int) -> bool:
        """Named by the config (exact host and port) or listed in ``allow_redirect_to``."""
        host = _host(host)
        if (host, port) in self._named:
            return True
        return any(
            (want is None or want == port) and fnmatch.fnmatchcase(host, pattern)
            for pattern, want in self._allow
        )

    def refusal(self, url: URL) -> str | None:
        """Why ``url`` may not be requested, or None. Names pass here: the resolver checks them."""
        host = _host(url.host or "")
        port = url.port or _DEFAULT_PORTS.get(url.scheme, 0)
        if self.trusted(host, port):
            return None
        if url.scheme not in ("http", "https"):
            return f"{url.scheme}:// is not http(s)"
        if self.https_only and url.scheme != "https":
            return f"{url.scheme}:// to {host} (a '*' upstream is https only)"
        if _is_ip(host) and not is_public(host):
            return f"{host} is not a public address"
        return None

    def vet(self, host: str, port: int, results: list[ResolveResult]) -> list[ResolveResult]:
        """The resolved addresses if they may be dialled; AddressRefused otherwise."""
        if self.trusted(host, port):
            return results
        for r in results:
            if not is_public(r["host"]):
                raise AddressRefused(
                    f"{_host(host)} resolves to a non-public address ({r['host']})"
                )
        return results

    def vet_infos(self, host: str, port: int, addresses: Iterable[str]) -> None:
        """The same check for addresses looked up by the caller (a session we do not own)."""
        if self.trusted(host, port):
            return
        for address in addresses:
            if not is_public(address):
                raise AddressRefused(f"{_host(host)} resolves to a non-public address ({address})")


class GuardedResolver(AbstractResolver):
    """Resolves like aiohttp, then lets only what the guard vetted through to the connector."""

    def __init__(self, guard: AddressGuard) -> None:
        self._inner = aiohttp.ThreadedResolver()
        self._guard = guard

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return self._guard.vet(host, port, await self._inner.resolve(host, port, family))

    async def close(self) -> None:
        await self._inner.close()
