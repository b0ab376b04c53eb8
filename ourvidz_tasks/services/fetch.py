"""Safe download of untrusted reference images.

Job payloads name reference images either by URL (``http(s)://...``) or by a
bare Supabase storage path (``bucket/path/to/file.png``). Both are untrusted,
so :class:`ReferenceFetcher` refuses what could reach the inside of the
network or exhaust the worker:

* what may be contacted at all is :mod:`ourvidz_tasks.services.fetch_rules`
  (schemes, credentials, storage paths, every resolved address, each hop);
  the request then goes to the address that was checked (the URL carries the
  IP, ``Host`` and TLS SNI carry the name), so DNS rebinding cannot swap it;
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
import time
from types import TracebackType
from typing import Self

import httpx
from PIL import Image, ImageOps

from ..contract.errors import FetchError, ReferenceUnavailable
from ..contract.settings import Settings
from .fetch_rules import (
    AddressPolicy,
    IPAddress,
    Resolver,
    Target,
    check_url,
    parse_reference,
    redirect_target,
    system_resolver,
)

__all__ = ["ReferenceFetcher", "decode_image"]

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
#: formats worth a reference image; leaves out parsers that shell out (EPS) or are large
_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
_USER_AGENT = "ourvidz-tasks-fetch/1"
_WHITE = (255, 255, 255)


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
        self._total = total_timeout if total_timeout is not None else 2 * settings.fetch_timeout
        self._owns_client = client is None
        self._client = client or httpx.Client(
            follow_redirects=False,
            trust_env=False,
            timeout=settings.fetch_timeout,
            limits=httpx.Limits(max_keepalive_connections=0),
        )
        self._policy = AddressPolicy(settings.fetch_allow, resolver or system_resolver)
        self._storage_origin: tuple[str, str, int] | None = None
        if settings.supabase_url:
            try:
                self._storage_origin = check_url(httpx.URL(settings.supabase_url)).origin
            except (FetchError, httpx.InvalidURL):
                self._storage_origin = None

    # -- public -----------------------------------------------------------
    def fetch_bytes(self, ref: str) -> bytes:
        """The body of ``ref`` (URL or storage path), at most ``fetch_max_bytes``."""
        deadline = time.monotonic() + self._total
        target, with_key = parse_reference(ref, self._settings.supabase_url)
        return self._get(target, with_key, deadline)

    def fetch_image(self, ref: str) -> Image.Image:
        """``ref`` decoded as a fully loaded RGB image within ``fetch_max_pixels``."""
        deadline = time.monotonic() + self._total
        target, with_key = parse_reference(ref, self._settings.supabase_url)
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

    # -- requests ---------------------------------------------------------
    def _get(self, target: Target, with_key: bool, deadline: float) -> bytes:
        """Follow the redirects of ``target`` by hand and read the final body."""
        hops = 0
        with_key = with_key and target.origin == self._storage_origin
        while True:
            addresses = self._policy.addresses(target)
            response = self._send(target, addresses, with_key, deadline)
            try:
                if response.status_code in _REDIRECTS:
                    hops += 1
                    if hops > self._settings.fetch_max_redirects:
                        raise ReferenceUnavailable(
                            f"more than {self._settings.fetch_max_redirects} redirects from {target.where}"
                        )
                    target = redirect_target(target, response.headers.get("location"))
                    # once the key has left the storage origin it never comes back
                    with_key = with_key and target.origin == self._storage_origin
                    continue
                if not 200 <= response.status_code < 300:
                    raise ReferenceUnavailable(f"HTTP {response.status_code} from {target.where}")
                return self._read(response, target, deadline)
            finally:
                response.close()

    def _send(self, target: Target, addresses: list[IPAddress], with_key: bool, deadline: float) -> httpx.Response:
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

    def _step_timeout(self, deadline: float, target: Target) -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ReferenceUnavailable(f"timed out fetching {target.where}")
        return min(self._settings.fetch_timeout, remaining)

    def _read(self, response: httpx.Response, target: Target, deadline: float) -> bytes:
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
