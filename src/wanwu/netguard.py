"""Network safety for URL inputs: an httpx transport that only reaches public addresses, within a deadline.

A URL named by someone else (a service caller, a job submitter) must not make this machine reach its own
network. :class:`GuardedTransport` resolves each host itself, refuses loopback, private, link-local,
multicast, reserved and unspecified addresses (IPv4 and IPv6, IPv4 embedded in IPv6 included), and connects
to the address it vetted, so a second DNS answer cannot swap it (DNS rebinding). Every connection is vetted,
so every redirect is too. ``allow_private=True`` is the explicit opt-in.

:func:`deadline` bounds a whole fetch (connect, TLS, every read), not each read: a server trickling one byte
at a time cannot hold a thread longer than the deadline.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import httpcore
import httpx

from wanwu.errors import FetchError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
REFUSED_MESSAGE = (
    "refused: the URL's host does not resolve to a public internet address (the server only fetches public URLs)"
)


class RefusedAddressError(FetchError):
    """A URL's host resolved to an address the guard does not allow. Says nothing about what is there."""

    def __init__(self) -> None:
        super().__init__(REFUSED_MESSAGE)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_public(ip: IPAddress) -> bool:
    """True for a globally routable unicast address; False for loopback, private, link-local, multicast,
    reserved, unspecified, shared (CGNAT) and documentation ranges, and IPv6 that embeds such an IPv4."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return False
        inner = _embedded_ipv4(ip)
        if inner is not None:  # the IPv4 address it stands for decides
            return is_public(inner)
    return ip.is_global and not (
        ip.is_multicast or ip.is_loopback or ip.is_link_local or ip.is_private or ip.is_reserved
        or ip.is_unspecified
    )


# --- the per-fetch deadline ------------------------------------------------------------------------------

_local = threading.local()


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Everything the guarded transport does on this thread inside the block ends by ``seconds`` from now."""
    previous = getattr(_local, "deadline", None)
    _local.deadline = time.monotonic() + seconds
    try:
        yield
    finally:
        _local.deadline = previous


def _remaining(timeout: float | None) -> float | None:
    end: float | None = getattr(_local, "deadline", None)
    if end is None:
        return timeout
    left = end - time.monotonic()
    if left <= 0:
        raise httpcore.ReadTimeout("the fetch deadline passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self.inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self.inner.read(max_bytes, _remaining(timeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.inner.write(buffer, _remaining(timeout))

    def close(self) -> None:
        self.inner.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        return _DeadlineStream(self.inner.start_tls(ssl_context, server_hostname, _remaining(timeout)))

    def get_extra_info(self, info: str) -> Any:
        return self.inner.get_extra_info(info)


# --- the guarded network backend -------------------------------------------------------------------------


class GuardedBackend(httpcore.NetworkBackend):
    """Resolves, vets every address, and connects to a vetted one (never resolving again)."""

    def __init__(self, allow_private: bool = False) -> None:
        self.allow_private = allow_private
        self._sync = httpcore.SyncBackend()

    def resolve(self, host: str, port: int) -> list[str]:
        """The host's addresses, all vetted. Without ``allow_private``, a host that does not resolve gets the
        same answer as one that resolves to a private address: callers cannot probe internal DNS names."""
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as e:
            if not self.allow_private:
                raise RefusedAddressError() from None
            raise httpcore.ConnectError(f"cannot resolve the host: {e}") from None
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        if not self.allow_private and not all(is_public(ipaddress.ip_address(a.split("%")[0])) for a in addresses):
            raise RefusedAddressError()  # one bad answer refuses the host: no racing good and bad records
        if not addresses:
            if not self.allow_private:
                raise RefusedAddressError()
            raise httpcore.ConnectError("the host has no address")
        return addresses

    def connect_tcp(
        self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        last: Exception | None = None
        for address in self.resolve(host, port):
            try:
                stream = self._sync.connect_tcp(address, port, _remaining(timeout), local_address, socket_options)
            except httpcore.ConnectTimeout:
                raise
            except httpcore.ConnectError as e:
                last = e
                continue
            return _DeadlineStream(stream)
        raise last or httpcore.ConnectError("cannot connect")

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        raise RefusedAddressError()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class GuardedTransport(httpx.HTTPTransport):
    """An httpx transport over :class:`GuardedBackend`: no proxies, no unix sockets, vetted addresses."""

    def __init__(self, allow_private: bool = False, max_connections: int = 32) -> None:
        super().__init__()
        import certifi

        self._pool = httpcore.ConnectionPool(
            ssl_context=ssl.create_default_context(cafile=certifi.where()),
            max_connections=max_connections,
            network_backend=GuardedBackend(allow_private),
        )


def guarded_client(timeout: float, allow_private: bool = False, max_connections: int = 32) -> httpx.Client:
    """An httpx client for fetching URLs that other people name: guarded, at most 5 redirects, no env proxies."""
    return httpx.Client(
        transport=GuardedTransport(allow_private, max_connections),
        timeout=httpx.Timeout(timeout, connect=min(10.0, timeout)),
        follow_redirects=True,
        max_redirects=5,
        trust_env=False,
        headers={"User-Agent": "wanwu/0.1"},
    )
