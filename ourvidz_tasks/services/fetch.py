"""Safe download of untrusted reference images.

Job payloads name reference images either by URL (``http(s)://...``) or by a
bare Supabase storage path (``bucket/path/to/file.png``). Both are untrusted,
so :class:`ReferenceFetcher` refuses what could reach the inside of the
network or exhaust the worker:

* only ``http`` and ``https``; no credentials in the URL; storage paths
  without empty, ``.`` or ``..`` segments;
* every address of the host is resolved and checked; private, loopback,
  link-local (cloud metadata), multicast, reserved, unspecified, shared
  (100.64/10) and IPv6 ULA/site-local addresses, and IPv4 ones embedded in
  IPv6 (mapped, NAT64, 6to4), are refused unless ``fetch_allow`` names the host
  or the address; the request then goes to the address that was checked
  (the URL carries the IP, ``Host`` and TLS SNI carry the name), so DNS
  rebinding cannot swap it;
* redirects are followed by hand, at most ``fetch_max_redirects``, each hop
  checked again; the service key goes only with a storage path, only to the
  ``SUPABASE_URL`` origin, and never again once a redirect left that origin;
* the body is streamed and cut at ``fetch_max_bytes``; each network step is
  bounded by ``fetch_timeout`` and the whole fetch by an overall deadline;
* images are decoded only from a few formats and only after their header says
  they are within ``fetch_max_pixels``.

Failures raise :class:`~ourvidz_tasks.contract.errors.UnsafeReference` (refused before
a request) or :class:`~ourvidz_tasks.contract.errors.ReferenceUnavailable`, with one-line
messages naming at most the host and path: never the query string (signed
URLs carry tokens) nor the service key.

Left to the deployment: name resolution (``getaddrinfo``) is not bounded by the
deadline; the fetcher's own client ignores proxy and CA variables from the
environment (inject a client to change that); PIL's own bomb limit
(``2 * Image.MAX_IMAGE_PIXELS``) still applies above ``fetch_max_pixels``.
"""

from __future__ import annotations

import io
import ipaddress
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Self
from urllib.parse import quote, unquote

import httpx
from PIL import Image, ImageOps

from ..contract.errors import FetchError, ReferenceUnavailable, UnsafeReference
from ..contract.settings import Settings

__all__ = ["ReferenceFetcher", "Resolver", "decode_image", "system_resolver"]

#: ``(host, port) -> addresses``; raises :class:`OSError` when the name does not resolve.
Resolver = Callable[[str, int], list[str]]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_SCHEMES = {"http": 80, "https": 443}
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
#: formats worth a reference image; leaves out parsers that shell out (EPS) or are large
_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
_MAX_REF_CHARS = 8192
_SHARED = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-._:")
_USER_AGENT = "ourvidz-tasks-fetch/1"
_WHITE = (255, 255, 255)


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
class _Target:
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
        return host if self.port == _SCHEMES[self.scheme] else f"{host}:{self.port}"


class ReferenceFetcher:
    """Downloads untrusted reference images under the ``fetch_*`` settings.

    ``client`` is used as given (the caller closes it); without one the fetcher
    builds its own: no redirects, no proxies from the environment, no kept-alive
    connections (a pooled TLS connection is keyed by IP and must not serve
    another name). ``resolver`` maps ``(host, port)`` to addresses and sees every
    host, IP literals included, so a test resolver decides every address the
    fetcher may contact. ``total_timeout`` bounds a whole fetch, redirects
    included (default twice ``fetch_timeout``); one blocking read may overrun
    it by at most ``fetch_timeout``.
    """

    def __init__(
        self,
        settings: Settings,
        client: httpx.Client | None = None,
        *,
        resolver: Resolver | None = None,
        total_timeout: float | None = None,
    ) -> None:
        self._settings = settings
        self._resolver: Resolver = resolver or system_resolver
        self._total = total_timeout if total_timeout is not None else 2 * settings.fetch_timeout
        self._owns_client = client is None
        self._client = client or httpx.Client(
            follow_redirects=False,
            trust_env=False,
            timeout=settings.fetch_timeout,
            limits=httpx.Limits(max_keepalive_connections=0),
        )
        self._allow_hosts, self._allow_nets = _parse_allow(settings.fetch_allow)
        self._storage_origin: tuple[str, str, int] | None = None
        if settings.supabase_url:
            try:
                self._storage_origin = _target(httpx.URL(settings.supabase_url)).origin
            except (FetchError, httpx.InvalidURL):
                self._storage_origin = None

    # -- public -----------------------------------------------------------
    def fetch_bytes(self, ref: str) -> bytes:
        """The body of ``ref`` (URL or storage path), at most ``fetch_max_bytes``."""
        deadline = time.monotonic() + self._total
        target, with_key = self._initial(ref)
        return self._get(target, with_key, deadline)

    def fetch_image(self, ref: str) -> Image.Image:
        """``ref`` decoded as a fully loaded RGB image within ``fetch_max_pixels``."""
        deadline = time.monotonic() + self._total
        target, with_key = self._initial(ref)
        data = self._get(target, with_key, deadline)
        return decode_image(data, self._settings.fetch_max_pixels, target.where)

    def close(self) -> None:
        """Close the HTTP client if this fetcher built it."""
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- references -------------------------------------------------------
    def _initial(self, ref: object) -> tuple[_Target, bool]:
        """The first hop of ``ref`` and whether it may carry the service key."""
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
            return self._storage_target(text), True
        if " " in text:
            raise UnsafeReference("URL contains a space (encode it as %20)")
        return _target(_parse_url(text)), False

    def _storage_target(self, path: str) -> _Target:
        """``bucket/path`` as ``{SUPABASE_URL}/storage/v1/object/bucket/path``."""
        segments = path.split("/")
        if len(segments) < 2:
            raise UnsafeReference("storage path needs a bucket and an object path")
        for segment in segments:
            if segment in ("", ".", ".."):
                raise UnsafeReference("storage path has an empty, '.' or '..' segment")
            if unquote(segment) in (".", "..") or "/" in unquote(segment):
                raise UnsafeReference("storage path has an encoded '.', '..' or '/' segment")
        base = self._settings.supabase_url
        if not base:
            raise ReferenceUnavailable("storage path given but SUPABASE_URL is not set")
        encoded = "/".join(quote(segment, safe="!$&'()*+,;=:@") for segment in segments)
        url = f"{base.rstrip('/')}/storage/v1/object/{encoded}"
        target = _target(_parse_url(url))
        return _Target(target.url, target.scheme, target.host, target.port, f"storage {_clip(path)}")

    # -- addresses --------------------------------------------------------
    def _addresses(self, target: _Target) -> list[IPAddress]:
        """Every address of the host, each one allowed, or UnsafeReference."""
        host_allowed = target.host.rstrip(".") in self._allow_hosts
        literal = _ip(target.host)
        if literal is not None and not host_allowed:
            self._check(literal, target)
        try:
            raw = self._resolver(target.host, target.port)
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

    def _check(self, address: IPAddress, target: _Target) -> None:
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

    # -- requests ---------------------------------------------------------
    def _get(self, target: _Target, with_key: bool, deadline: float) -> bytes:
        """Follow the redirects of ``target`` by hand and read the final body."""
        hops = 0
        with_key = with_key and target.origin == self._storage_origin
        while True:
            addresses = self._addresses(target)
            response = self._send(target, addresses, with_key, deadline)
            try:
                if response.status_code in _REDIRECTS:
                    hops += 1
                    if hops > self._settings.fetch_max_redirects:
                        raise ReferenceUnavailable(
                            f"more than {self._settings.fetch_max_redirects} redirects from {target.where}"
                        )
                    target = self._follow(target, response)
                    # once the key has left the storage origin it never comes back
                    with_key = with_key and target.origin == self._storage_origin
                    continue
                if not 200 <= response.status_code < 300:
                    raise ReferenceUnavailable(f"HTTP {response.status_code} from {target.where}")
                return self._read(response, target, deadline)
            finally:
                response.close()

    def _follow(self, target: _Target, response: httpx.Response) -> _Target:
        location = response.headers.get("location")
        if not location:
            raise ReferenceUnavailable(f"redirect without Location from {target.where}")
        if "\\" in location or any(ord(ch) < 33 or ord(ch) == 127 for ch in location):
            raise UnsafeReference(f"redirect from {target.where} to a malformed URL")
        try:
            return _target(_parse_url(str(target.url.join(location))))
        except (httpx.InvalidURL, ValueError, UnicodeError):
            raise UnsafeReference(f"redirect from {target.where} to a malformed URL") from None
        except UnsafeReference as exc:
            raise UnsafeReference(f"redirect from {target.where}: {exc}") from None

    def _send(self, target: _Target, addresses: list[IPAddress], with_key: bool, deadline: float) -> httpx.Response:
        """Send GET to the first address that accepts a connection."""
        headers = {
            "Host": target.authority,
            "User-Agent": _USER_AGENT,
            "Accept": "image/*",
            "Accept-Encoding": "identity",
        }
        if with_key and self._settings.supabase_service_key is not None:
            key = self._settings.supabase_service_key.get_secret_value()
            if key:
                headers["Authorization"] = f"Bearer {key}"
        failure = "no address"
        for address in addresses:
            timeout = self._step_timeout(deadline, target)
            host = f"[{address.compressed}]" if address.version == 6 else address.compressed
            extensions: dict[str, object] = {"timeout": httpx.Timeout(timeout).as_dict()}
            if target.scheme == "https":
                extensions["sni_hostname"] = target.host
            try:
                url = target.url.copy_with(host=host, port=target.port)
                request = httpx.Request("GET", url, headers=headers, extensions=extensions)
                return self._client.send(request, stream=True, follow_redirects=False)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                failure = type(exc).__name__
                continue
            except httpx.TimeoutException:
                raise ReferenceUnavailable(f"timed out fetching {target.where}") from None
            except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError, OSError, ValueError) as exc:
                raise ReferenceUnavailable(f"cannot fetch {target.where}: {type(exc).__name__}") from None
        raise ReferenceUnavailable(f"cannot connect to {target.host}: {failure}")

    def _step_timeout(self, deadline: float, target: _Target) -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ReferenceUnavailable(f"timed out fetching {target.where}")
        return min(self._settings.fetch_timeout, remaining)

    def _read(self, response: httpx.Response, target: _Target, deadline: float) -> bytes:
        """The body, refused as soon as it passes ``fetch_max_bytes``."""
        cap = self._settings.fetch_max_bytes
        too_big = f"{target.where} is larger than {cap} bytes"
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise ReferenceUnavailable(f"{target.where} has an unsupported content-encoding")
        length = response.headers.get("content-length")
        if length is not None and length.strip().isdigit() and int(length) > cap:
            raise ReferenceUnavailable(too_big)
        body = bytearray()
        try:
            for chunk in response.iter_raw():  # as the network gives it: no re-chunking wait
                body += chunk
                if len(body) > cap:
                    raise ReferenceUnavailable(too_big)
                if time.monotonic() > deadline:
                    raise ReferenceUnavailable(f"timed out fetching {target.where}")
        except httpx.TimeoutException:
            raise ReferenceUnavailable(f"timed out fetching {target.where}") from None
        except (httpx.HTTPError, httpx.StreamError, OSError, ValueError) as exc:
            raise ReferenceUnavailable(f"cannot read {target.where}: {type(exc).__name__}") from None
        return bytes(body)


# -- images ---------------------------------------------------------------
def decode_image(data: bytes, max_pixels: int, where: str = "reference") -> Image.Image:
    """``data`` as a loaded RGB image; the size is checked before pixels are decoded.

    Only PNG, JPEG, WEBP, GIF and BMP; the first frame of an animation; EXIF
    orientation applied; at most ``max_pixels`` (``width * height``).
    """
    try:
        # Image.open reads the header only; PIL itself raises DecompressionBombError
        # past 2 * Image.MAX_IMAGE_PIXELS and warns past it (an error under -W error)
        with Image.open(io.BytesIO(data), formats=_FORMATS) as image:
            width, height = image.size
            if width <= 0 or height <= 0:
                raise ReferenceUnavailable(f"{where} has no pixels")
            if width * height > max_pixels:
                raise ReferenceUnavailable(f"{where} is {width}x{height}, more than {max_pixels} pixels")
            image.load()
            return _to_rgb(ImageOps.exif_transpose(image))
    except FetchError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ReferenceUnavailable(f"{where} has too many pixels") from None
    except Exception as exc:  # a hostile file may break the decoder in any way
        raise ReferenceUnavailable(f"{where} is not a decodable image: {type(exc).__name__}") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB: 16-bit scaled down, transparency composited over white."""
    if image.mode.startswith("I;16"):
        image = image.convert("I")
    if image.mode == "I":
        image = image.point(lambda v: v * (1 / 257) + 0.5).convert("L")
    elif image.mode == "F":
        image = image.convert("L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, _WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    rgb = image.convert("RGB")
    rgb.load()
    return rgb


# -- helpers --------------------------------------------------------------
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
    if scheme not in _SCHEMES:
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


def _target(url: httpx.URL) -> _Target:
    """Check a parsed URL's scheme, credentials and host."""
    scheme = url.scheme.lower()
    if scheme not in _SCHEMES:
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
    port = url.port if url.port is not None else _SCHEMES[scheme]
    path = url.raw_path.split(b"?", 1)[0].decode("ascii", "replace")
    return _Target(url=url, scheme=scheme, host=host, port=port, where=_clip(f"{host}{path}"))


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
