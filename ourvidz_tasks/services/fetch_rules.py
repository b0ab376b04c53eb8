"""Which references the fetcher may contact (:mod:`ourvidz_tasks.services.fetch`): the SSRF rules.

Both kinds of reference are untrusted: a URL (``http(s)://...``) or a bare
Supabase storage path (``bucket/path/to/file.png``).

* only ``http`` and ``https``; no credentials in the URL; storage paths
  without empty, ``.`` or ``..`` segments (:func:`parse_reference`);
* every address of the host is resolved and checked (:class:`AddressPolicy`);
  private, loopback, link-local (cloud metadata), multicast, reserved,
  unspecified, shared (100.64/10) and IPv6 ULA/site-local addresses, and IPv4
  ones embedded in IPv6 (mapped, NAT64, 6to4), are refused unless
  ``fetch_allow`` names the host or the address;
* every redirect hop is checked again (:func:`redirect_target`).

Refusals raise :class:`~ourvidz_tasks.contract.errors.UnsafeReference`, with
one-line messages naming at most the host and path (:attr:`Target.where`):
never the query string (signed URLs carry tokens).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote, unquote

import httpx

from ..contract.errors import ReferenceUnavailable, UnsafeReference

#: ``(host, port) -> addresses``; raises :class:`OSError` when the name does not resolve.
Resolver = Callable[[str, int], list[str]]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: the schemes allowed, with their default ports
SCHEMES = {"http": 80, "https": 443}
_MAX_REF_CHARS = 8192
_SHARED = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-._:")


def system_resolver(host: str, port: int) -> list[str]:
    """Every address ``getaddrinfo`` gives for ``host`` (IP literals come back as is)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    seen: list[str] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        address = str(sockaddr[0])
        if address not in seen:
            seen.append(address)
    return seen


@dataclass(frozen=True)
class Target:
    """One checked hop: where to connect and what to call it."""

    url: httpx.URL  # the logical URL, with the host name
    scheme: str
    host: str  # ASCII (IDNA) host, lower case, IPv6 without brackets
    port: int
    where: str  # host and path for messages; never the query string

    @property
    def origin(self) -> tuple[str, str, int]:
        return (self.scheme, self.host, self.port)

    @property
    def authority(self) -> str:
        """The ``Host`` header: the name, bracketed if IPv6, and a non-default port."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == SCHEMES[self.scheme] else f"{host}:{self.port}"


def parse_reference(ref: object, storage_base: str | None) -> tuple[Target, bool]:
    """The first hop of ``ref`` (a URL, or a storage path under ``storage_base``, the
    ``SUPABASE_URL``) and whether it may carry the service key."""
    if not isinstance(ref, str):
        raise UnsafeReference("reference is not a string")
    text = ref.strip()
    if not text:
        raise UnsafeReference("reference is empty")
    if len(text) > _MAX_REF_CHARS:
        raise UnsafeReference(f"reference is longer than {_MAX_REF_CHARS} characters")
    if any((ch.isspace() and ch != " ") or ord(ch) < 32 or ord(ch) == 127 for ch in text):
        raise UnsafeReference("reference contains control characters")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafeReference("reference is not valid text") from None
    if "\\" in text:
        raise UnsafeReference("reference contains a backslash")
    scheme = _scheme_of(text)
    if scheme is None and not text.startswith("/"):
        return _storage_target(text, storage_base), True
    if " " in text:
        raise UnsafeReference("URL contains a space (encode it as %20)")
    return check_url(_parse_url(text)), False


def _storage_target(path: str, base: str | None) -> Target:
    """``bucket/path`` as ``{SUPABASE_URL}/storage/v1/object/bucket/path``."""
    segments = path.split("/")
    if len(segments) < 2:
        raise UnsafeReference("storage path needs a bucket and an object path")
    for segment in segments:
        if segment in ("", ".", ".."):
            raise UnsafeReference("storage path has an empty, '.' or '..' segment")
        if unquote(segment) in (".", "..") or "/" in unquote(segment):
            raise UnsafeReference("storage path has an encoded '.', '..' or '/' segment")
    if not base:
        raise ReferenceUnavailable("storage path given but SUPABASE_URL is not set")
    encoded = "/".join(quote(segment, safe="!$&'()*+,;=:@") for segment in segments)
    url = f"{base.rstrip('/')}/storage/v1/object/{encoded}"
    target = check_url(_parse_url(url))
    return Target(target.url, target.scheme, target.host, target.port, f"storage {_clip(path)}")


def redirect_target(target: Target, location: str | None) -> Target:
    """The next hop of a redirect from ``target`` to ``location`` (its ``Location`` header)."""
    if not location:
        raise ReferenceUnavailable(f"redirect without Location from {target.where}")
    if "\\" in location or any(ord(ch) < 33 or ord(ch) == 127 for ch in location):
        raise UnsafeReference(f"redirect from {target.where} to a malformed URL")
    try:
        return check_url(_parse_url(str(target.url.join(location))))
    except (httpx.InvalidURL, ValueError, UnicodeError):
        raise UnsafeReference(f"redirect from {target.where} to a malformed URL") from None
    except UnsafeReference as exc:
        raise UnsafeReference(f"redirect from {target.where}: {exc}") from None


class AddressPolicy:
    """Which addresses the fetcher may contact: public ones, and those ``fetch_allow`` names.

    ``allow``: host names (a name allows every address it resolves to) and
    addresses or networks (``10.0.0.0/8``, ``[::1]``). ``resolver`` maps
    ``(host, port)`` to addresses and sees every host, IP literals included.
    """

    def __init__(self, allow: tuple[str, ...], resolver: Resolver = system_resolver) -> None:
        self.resolver = resolver
        self._allow_hosts, self._allow_nets = _parse_allow(allow)

    def addresses(self, target: Target) -> list[IPAddress]:
        """Every address of the host, each one allowed, or UnsafeReference."""
        host_allowed = target.host.rstrip(".") in self._allow_hosts
        literal = _ip(target.host)
        if literal is not None and not host_allowed:
            self._check(literal, target)
        try:
            raw = self.resolver(target.host, target.port)
        except (OSError, UnicodeError, ValueError):
            raise ReferenceUnavailable(f"cannot resolve {target.host}") from None
        if not raw:
            raise ReferenceUnavailable(f"cannot resolve {target.host}")
        addresses: list[IPAddress] = []
        for text in raw:
            address = _ip(text)
            if address is None:
                raise UnsafeReference(f"resolver gave a non-address for {target.host}")
            if not host_allowed:
                self._check(address, target)
            addresses.append(address)
        return addresses

    def _check(self, address: IPAddress, target: Target) -> None:
        if _is_public(address) or self._allowed(address):
            return
        raise UnsafeReference(f"{target.host} resolves to a non-public address ({address})")

    def _allowed(self, address: IPAddress) -> bool:
        candidates: list[IPAddress] = [address]
        if isinstance(address, ipaddress.IPv6Address):
            candidates.extend(_embedded_v4(address))
            if address.scope_id:
                candidates.append(ipaddress.IPv6Address(address.compressed.split("%")[0]))
        return any(c in net for c in candidates for net in self._allow_nets if c.version == net.version)


def _scheme_of(text: str) -> str | None:
    """The URL scheme of ``text`` (RFC 3986 syntax), or None for a bare path."""
    head, sep, _rest = text.partition(":")
    if not sep or not head or "/" in head:
        return None
    if head[0].isascii() and head[0].isalpha() and all(ch.isascii() and (ch.isalnum() or ch in "+-.") for ch in head):
        return head.lower()
    return None


def _parse_url(text: str) -> httpx.URL:
    scheme = _scheme_of(text)
    if scheme is None:
        raise UnsafeReference("reference has no scheme and is not a storage path")
    if scheme not in SCHEMES:
        raise UnsafeReference(f"scheme {scheme[:20]!r} is not allowed (http, https only)")
    rest = text[len(scheme) + 1 :]
    if not rest.startswith("//"):
        raise UnsafeReference("URL has no host")
    authority = re.split(r"[/?#]", rest[2:], maxsplit=1)[0]
    if "@" in authority:
        raise UnsafeReference("URL carries credentials (user:pass@host)")
    try:
        return httpx.URL(text)
    except (httpx.InvalidURL, ValueError, UnicodeError):
        raise UnsafeReference(f"malformed {scheme} URL") from None


def check_url(url: httpx.URL) -> Target:
    """Check a parsed URL's scheme, credentials and host."""
    scheme = url.scheme.lower()
    if scheme not in SCHEMES:
        raise UnsafeReference(f"scheme {scheme[:20]!r} is not allowed (http, https only)")
    try:
        host = url.raw_host.decode("ascii").lower()
    except UnicodeDecodeError:
        raise UnsafeReference("URL host is not ASCII") from None
    if not host:
        raise UnsafeReference("URL has no host")
    if url.userinfo:
        raise UnsafeReference(f"URL for {host} carries credentials (user:pass@host)")
    if not set(host) <= _HOST_CHARS or host.startswith((".", "-")):
        raise UnsafeReference("URL host is malformed")
    port = url.port if url.port is not None else SCHEMES[scheme]
    path = url.raw_path.split(b"?", 1)[0].decode("ascii", "replace")
    return Target(url=url, scheme=scheme, host=host, port=port, where=_clip(f"{host}{path}"))


def _clip(text: str, limit: int = 160) -> str:
    """``text`` cut to ``limit`` characters for a one-line message."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _embedded_v4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 one may lead to: mapped, NAT64, 6to4."""
    found: list[ipaddress.IPv4Address] = []
    if address.ipv4_mapped is not None:
        found.append(address.ipv4_mapped)
    if address in _NAT64 or address in _NAT64_LOCAL:
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    if address.sixtofour is not None:
        found.append(address.sixtofour)
    return found


def _is_public(address: IPAddress) -> bool:
    """Globally routable unicast, including any IPv4 address embedded in it."""
    if (
        not address.is_global
        or address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    ):
        return False
    if isinstance(address, ipaddress.IPv4Address):
        return address not in _SHARED
    if address.is_site_local:
        return False
    return all(_is_public(v4) for v4 in _embedded_v4(address))


def _parse_allow(entries: tuple[str, ...]) -> tuple[frozenset[str], tuple[IPNetwork, ...]]:
    """``fetch_allow`` as host names (lower case, no trailing dot) and networks."""
    hosts: set[str] = set()
    nets: list[IPNetwork] = []
    for entry in entries:
        text = entry.strip()
        if not text:
            continue
        bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
        try:
            nets.append(ipaddress.ip_network(bare, strict=False))
        except ValueError:
            hosts.add(text.lower().rstrip("."))
    return frozenset(hosts), tuple(nets)
