"""ReferenceFetcher against local HTTP servers on 127.0.0.1 only.

No test sends traffic outside 127.0.0.0/8: refused addresses are checked with
a client whose transport fails the test if it is ever called, names resolve
through injected resolvers, and the property tests use mock transports.
"""

from __future__ import annotations

import io
import socket
import ssl
import struct
import subprocess
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from ourvidz_tasks.contract.errors import FetchError, ReferenceUnavailable, UnsafeReference
from ourvidz_tasks.contract.settings import Settings
from ourvidz_tasks.services.fetch import ReferenceFetcher, decode_image

from .support.tools import tool

KEY = "service-key-sekrit"

Route = Callable[["Handler"], None]


# -- local servers ------------------------------------------------------------
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: LocalServer

    def do_GET(self) -> None:
        self.server.requests.append((self.path, dict(self.headers.items())))
        route = self.server.routes.get(self.path.split("?", 1)[0])
        try:
            if route is None:
                send(self, b"not found", status=404, ctype="text/plain")
            else:
                route(self)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            pass

    def log_message(self, format: str, *args: Any) -> None:
        pass


class LocalServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.socket = tls.wrap_socket(self.socket, server_side=True)
        self.routes: dict[str, Route] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.thread = threading.Thread(target=self.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass

    def header(self, index: int, name: str) -> str | None:
        headers = {k.lower(): v for k, v in self.requests[index][1].items()}
        return headers.get(name.lower())


def send(h: Handler, body: bytes, *, status: int = 200, ctype: str = "image/png", **extra: str) -> None:
    h.send_response(status)
    h.send_header("Content-Type", ctype)
    h.send_header("Content-Length", str(len(body)))
    h.send_header("Connection", "close")
    for name, value in extra.items():
        h.send_header(name.replace("_", "-"), value)
    h.end_headers()
    h.wfile.write(body)


def body(data: bytes, **kw: Any) -> Route:
    return lambda h: send(h, data, **kw)


def redirect(location: str | Callable[[], str], status: int = 302) -> Route:
    def route(h: Handler) -> None:
        where = location() if callable(location) else location
        send(h, b"", status=status, ctype="text/plain", Location=where)

    return route


def chunked(chunk: bytes, count: int, delay: float = 0.0) -> Route:
    def route(h: Handler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "image/png")
        h.send_header("Transfer-Encoding", "chunked")
        h.send_header("Connection", "close")
        h.end_headers()
        for _ in range(count):
            h.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            h.wfile.flush()
            if delay:
                time.sleep(delay)
        h.wfile.write(b"0\r\n\r\n")

    return route


def close_delimited(chunk: bytes, count: int) -> Route:
    """HTTP/1.0 style: no Content-Length, the body ends when the connection does."""

    def route(h: Handler) -> None:
        h.close_connection = True
        h.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nConnection: close\r\n\r\n")
        for _ in range(count):
            h.wfile.write(chunk)

    return route


def slow(delay: float, data: bytes = b"late") -> Route:
    def route(h: Handler) -> None:
        time.sleep(delay)
        send(h, data)

    return route


@pytest.fixture
def servers() -> Iterator[Callable[..., LocalServer]]:
    started: list[LocalServer] = []

    def start(tls: ssl.SSLContext | None = None) -> LocalServer:
        server = LocalServer(tls)
        started.append(server)
        return server

    yield start
    for server in started:
        server.shutdown()
        server.server_close()


@pytest.fixture
def server(servers: Callable[..., LocalServer]) -> LocalServer:
    return servers()


# -- helpers ------------------------------------------------------------------
def make_settings(**over: Any) -> Settings:
    values: dict[str, Any] = {
        "SUPABASE_URL": None,
        "SUPABASE_SERVICE_KEY": KEY,
        "fetch_allow": ("127.0.0.1",),
        "fetch_timeout": 2.0,
        "fetch_max_bytes": 1024 * 1024,
        "fetch_max_pixels": 4_000_000,
        "fetch_max_redirects": 3,
    }
    values.update(over)
    return Settings(**values)


def fetcher(**over: Any) -> ReferenceFetcher:
    resolver = over.pop("resolver", None)
    client = over.pop("client", None)
    total = over.pop("total_timeout", None)
    return ReferenceFetcher(make_settings(**over), client, resolver=resolver, total_timeout=total)


def encode(image: Image.Image, fmt: str, **kw: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kw)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming ``width`` x ``height`` with almost no data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1024, 9)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def no_network(request: httpx.Request) -> httpx.Response:
    raise AssertionError(f"tried to connect to {request.url.host}")


def no_resolve(host: str, port: int) -> list[str]:
    raise AssertionError(f"tried to resolve {host}")


def numeric_resolver(host: str, port: int) -> list[str]:
    """Parses numeric IPv4 forms locally (inet_aton: 2130706433, 0x7f.1); never DNS."""
    return [socket.inet_ntoa(socket.inet_aton(host))]


def names(mapping: dict[str, list[str]]) -> Callable[[str, int], list[str]]:
    def resolve(host: str, port: int) -> list[str]:
        if host in mapping:
            return mapping[host]
        raise socket.gaierror(socket.EAI_NONAME, "unknown")

    return resolve


RED = Image.new("RGB", (16, 8), (200, 10, 20))


# -- good fetches ------------------------------------------------------------
@pytest.mark.parametrize(("fmt", "tolerance"), [("PNG", 0), ("JPEG", 12), ("WEBP", 12), ("GIF", 40), ("BMP", 0)])
def test_fetch_image_formats(server: LocalServer, fmt: str, tolerance: int) -> None:
    server.routes["/ref"] = body(encode(RED, fmt), ctype=f"image/{fmt.lower()}")
    with fetcher() as f:
        image = f.fetch_image(f"{server.url}/ref?x=1")
    assert image.mode == "RGB" and image.size == (16, 8)
    pixel = image.getpixel((3, 3))
    assert isinstance(pixel, tuple)
    assert all(abs(a - b) <= tolerance for a, b in zip(pixel, (200, 10, 20), strict=True))
    assert server.requests[0][0] == "/ref?x=1"


def test_fetch_bytes_and_headers(server: LocalServer) -> None:
    server.routes["/raw"] = body(b"hello")
    with fetcher() as f:
        assert f.fetch_bytes(f"{server.url}/raw") == b"hello"
    assert server.header(0, "host") == f"127.0.0.1:{server.port}"
    assert server.header(0, "authorization") is None
    assert server.header(0, "accept-encoding") == "identity"


def test_alpha_palette_and_16bit_become_rgb() -> None:
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.putpixel((0, 0), (10, 20, 30, 255))
    out = decode_image(encode(rgba, "PNG"), 100)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (10, 20, 30)
    assert out.getpixel((1, 1)) == (255, 255, 255)  # transparent over white

    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 50, 60, 70] + [0] * 762)
    palette.putpixel((0, 0), 0)
    out = decode_image(encode(palette, "PNG", transparency=0), 100)
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 1)) == (50, 60, 70)

    gif = decode_image(encode(palette, "GIF", transparency=0), 100)
    assert gif.mode == "RGB" and gif.getpixel((1, 1)) == (50, 60, 70)

    deep = Image.new("I;16", (4, 4), 65535)
    deep.putpixel((0, 0), 0)
    deep.putpixel((1, 0), 32896)  # 128 * 257
    out = decode_image(encode(deep, "PNG"), 100)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (0, 0, 0)
    assert out.getpixel((1, 0)) == (128, 128, 128)
    assert out.getpixel((2, 2)) == (255, 255, 255)

    cmyk = decode_image(encode(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "JPEG"), 100)
    assert cmyk.mode == "RGB"


# -- storage paths and the key ----------------------------------------------------
def storage_route(expect_key: bool = True, then: Route | None = None) -> Route:
    def route(h: Handler) -> None:
        if h.headers.get("Authorization") != f"Bearer {KEY}":
            send(h, b'{"error":"unauthorized"}', status=401, ctype="application/json")
        elif then is not None:
            then(h)
        else:
            send(h, encode(RED, "PNG"))

    return route


def test_storage_path_sends_bearer_key(server: LocalServer) -> None:
    server.routes["/storage/v1/object/refs/user%201/a%20b.png"] = storage_route()
    with fetcher(SUPABASE_URL=server.url + "/") as f:
        image = f.fetch_image("refs/user 1/a b.png")
    assert image.size == (16, 8)
    assert server.header(0, "authorization") == f"Bearer {KEY}"


def test_storage_path_without_key_is_unauthorised(server: LocalServer) -> None:
    server.routes["/storage/v1/object/refs/a.png"] = storage_route()
    with (
        fetcher(SUPABASE_URL=server.url, SUPABASE_SERVICE_KEY=None) as f,
        pytest.raises(ReferenceUnavailable, match="HTTP 401"),
    ):
        f.fetch_image("refs/a.png")
    assert server.header(0, "authorization") is None


def test_url_form_never_carries_the_key(server: LocalServer) -> None:
    server.routes["/storage/v1/object/refs/a.png"] = storage_route()
    with fetcher(SUPABASE_URL=server.url) as f, pytest.raises(ReferenceUnavailable, match="HTTP 401"):
        f.fetch_image(f"{server.url}/storage/v1/object/refs/a.png")
    assert server.header(0, "authorization") is None


def test_key_not_sent_to_another_origin_after_redirect(servers: Callable[..., LocalServer]) -> None:
    storage, other = servers(), servers()
    other.routes["/img.png"] = body(encode(RED, "PNG"))
    storage.routes["/storage/v1/object/refs/a.png"] = storage_route(then=redirect(f"{other.url}/img.png"))
    with fetcher(SUPABASE_URL=storage.url) as f:
        assert f.fetch_image("refs/a.png").size == (16, 8)
    assert storage.header(0, "authorization") == f"Bearer {KEY}"
    assert len(other.requests) == 1
    assert other.header(0, "authorization") is None


def test_key_not_resent_when_redirected_back(servers: Callable[..., LocalServer]) -> None:
    storage, other = servers(), servers()
    storage.routes["/storage/v1/object/refs/a.png"] = storage_route(then=redirect(f"{other.url}/bounce"))
    storage.routes["/storage/v1/object/private/secret.png"] = storage_route()
    other.routes["/bounce"] = redirect(f"{storage.url}/storage/v1/object/private/secret.png")
    with fetcher(SUPABASE_URL=storage.url) as f, pytest.raises(ReferenceUnavailable) as info:
        f.fetch_image("refs/a.png")
    assert "HTTP 401" in str(info.value) and KEY not in str(info.value)
    assert [p for p, _ in storage.requests] == [
        "/storage/v1/object/refs/a.png",
        "/storage/v1/object/private/secret.png",
    ]
    assert storage.header(1, "authorization") is None
    assert other.header(0, "authorization") is None


def test_same_origin_redirect_keeps_the_key(server: LocalServer) -> None:
    server.routes["/storage/v1/object/refs/a.png"] = storage_route(then=redirect("/storage/v1/object/refs/b.png"))
    server.routes["/storage/v1/object/refs/b.png"] = storage_route()
    with fetcher(SUPABASE_URL=server.url) as f:
        assert f.fetch_image("refs/a.png").size == (16, 8)
    assert server.header(1, "authorization") == f"Bearer {KEY}"


@pytest.mark.parametrize(
    "ref",
    [
        "refs",
        "refs/",
        "refs//a.png",
        "refs/../a.png",
        "refs/./a.png",
        "refs/x/..",
        "refs/%2e%2e/a.png",
        "refs/a%2Fb.png",
        "/refs/a.png",
        "//evil.example/a.png",
        "refs\\a.png",
    ],
)
def test_bad_storage_paths(ref: str) -> None:
    with (
        fetcher(SUPABASE_URL="http://127.0.0.1:9", client=httpx.Client(transport=httpx.MockTransport(no_network))) as f,
        pytest.raises(UnsafeReference),
    ):
        f.fetch_bytes(ref)


def test_storage_path_needs_supabase_url() -> None:
    with (
        fetcher(client=httpx.Client(transport=httpx.MockTransport(no_network))) as f,
        pytest.raises(ReferenceUnavailable, match="SUPABASE_URL"),
    ):
        f.fetch_bytes("refs/a.png")


def test_private_supabase_host_needs_the_allowlist(server: LocalServer) -> None:
    server.routes["/storage/v1/object/refs/a.png"] = storage_route()
    with fetcher(SUPABASE_URL=server.url, fetch_allow=()) as f, pytest.raises(UnsafeReference):
        f.fetch_image("refs/a.png")
    assert server.requests == []


# -- redirects ---------------------------------------------------------------------
def test_redirect_is_followed_and_rechecked(server: LocalServer) -> None:
    server.routes["/a"] = redirect("/b", 301)
    server.routes["/b"] = redirect(f"{server.url}/c", 307)
    server.routes["/c"] = body(b"done")
    with fetcher() as f:
        assert f.fetch_bytes(f"{server.url}/a") == b"done"
    assert [p for p, _ in server.requests] == ["/a", "/b", "/c"]


def test_redirect_to_refused_address(server: LocalServer) -> None:
    """Allowed by name; the redirect to the bare loopback IP is not allowed."""
    resolver = names({"refs.test": ["127.0.0.1"]})
    server.routes["/a"] = redirect(f"http://127.0.0.1:{server.port}/b")
    server.routes["/b"] = body(b"never")
    with (
        fetcher(fetch_allow=("refs.test",), resolver=resolver) as f,
        pytest.raises(UnsafeReference, match=r"127\.0\.0\.1"),
    ):
        f.fetch_bytes(f"http://refs.test:{server.port}/a")
    assert [p for p, _ in server.requests] == ["/a"]
    assert server.header(0, "host") == f"refs.test:{server.port}"


@pytest.mark.parametrize(
    "location",
    ["http://169.254.169.254/latest/meta-data/", "http://[::1]/", "file:///etc/passwd", "gopher://x/", "http://u:p@x/"],
)
def test_redirect_to_refused_targets(server: LocalServer, location: str) -> None:
    server.routes["/a"] = redirect(location)
    with fetcher() as f, pytest.raises(UnsafeReference):
        f.fetch_bytes(f"{server.url}/a")
    assert len(server.requests) == 1


def test_redirect_refusal_names_the_hop(server: LocalServer) -> None:
    server.routes["/a"] = redirect("file:///etc/passwd")
    with fetcher() as f, pytest.raises(UnsafeReference) as info:
        f.fetch_bytes(f"{server.url}/a?sig=abc")
    assert str(info.value) == "redirect from 127.0.0.1/a: scheme 'file' is not allowed (http, https only)"


def test_too_many_redirects(server: LocalServer) -> None:
    server.routes["/loop"] = redirect("/loop")
    with fetcher(fetch_max_redirects=2) as f, pytest.raises(ReferenceUnavailable, match="more than 2 redirects"):
        f.fetch_bytes(f"{server.url}/loop")
    assert len(server.requests) == 3


def test_no_redirects_allowed(server: LocalServer) -> None:
    server.routes["/a"] = redirect("/b")
    with fetcher(fetch_max_redirects=0) as f, pytest.raises(ReferenceUnavailable, match="redirects"):
        f.fetch_bytes(f"{server.url}/a")


def test_redirect_without_location(server: LocalServer) -> None:
    server.routes["/a"] = body(b"", status=302)
    with fetcher() as f, pytest.raises(ReferenceUnavailable, match="Location"):
        f.fetch_bytes(f"{server.url}/a")


# -- statuses, sizes, timeouts -------------------------------------------------------
def test_404_names_status_host_and_path_but_not_query(server: LocalServer) -> None:
    with fetcher() as f, pytest.raises(ReferenceUnavailable) as info:
        f.fetch_bytes(f"{server.url}/missing.png?token=SIGNED-TOKEN")
    message = str(info.value)
    assert "HTTP 404" in message and "127.0.0.1/missing.png" in message
    assert "SIGNED-TOKEN" not in message and "token" not in message and "\n" not in message


def test_500_is_unavailable(server: LocalServer) -> None:
    server.routes["/x"] = body(b"oops", status=500)
    with fetcher() as f, pytest.raises(ReferenceUnavailable, match="HTTP 500"):
        f.fetch_bytes(f"{server.url}/x")


def test_content_length_over_cap_refused_up_front(server: LocalServer) -> None:
    server.routes["/big"] = body(b"x" * 5000)
    with fetcher(fetch_max_bytes=4096) as f, pytest.raises(ReferenceUnavailable, match="larger than 4096"):
        f.fetch_bytes(f"{server.url}/big")


def test_body_at_cap_is_fine(server: LocalServer) -> None:
    server.routes["/exact"] = body(b"x" * 4096)
    with fetcher(fetch_max_bytes=4096) as f:
        assert len(f.fetch_bytes(f"{server.url}/exact")) == 4096


def test_chunked_body_over_cap_refused_while_streaming(server: LocalServer) -> None:
    server.routes["/endless"] = chunked(b"x" * 16384, 10_000)
    started = time.monotonic()
    with fetcher(fetch_max_bytes=100_000) as f, pytest.raises(ReferenceUnavailable, match="larger than"):
        f.fetch_bytes(f"{server.url}/endless")
    assert time.monotonic() - started < 5


def test_close_delimited_body_over_cap(server: LocalServer) -> None:
    server.routes["/endless"] = close_delimited(b"x" * 16384, 10_000)
    with fetcher(fetch_max_bytes=100_000) as f, pytest.raises(ReferenceUnavailable, match="larger than"):
        f.fetch_bytes(f"{server.url}/endless")


def test_content_encoding_refused(server: LocalServer) -> None:
    server.routes["/gz"] = body(zlib.compress(b"x" * 100_000), Content_Encoding="deflate")
    with fetcher() as f, pytest.raises(ReferenceUnavailable, match="content-encoding"):
        f.fetch_bytes(f"{server.url}/gz")


@pytest.mark.stress
def test_slow_server_times_out(server: LocalServer) -> None:
    answers_in = 6.0
    server.routes["/slow"] = slow(answers_in)
    started = time.monotonic()
    with fetcher(fetch_timeout=0.3) as f, pytest.raises(ReferenceUnavailable, match="timed out"):
        f.fetch_bytes(f"{server.url}/slow")
    assert time.monotonic() - started < answers_in / 2  # its timeout, not the server's answer


@pytest.mark.stress
def test_dripping_server_hits_the_overall_deadline(server: LocalServer) -> None:
    chunks, every = 100, 0.1  # each chunk within the read timeout, all of them 10 s
    server.routes["/drip"] = chunked(b"x", chunks, delay=every)
    started = time.monotonic()
    with fetcher(fetch_timeout=0.5, total_timeout=0.8) as f, pytest.raises(ReferenceUnavailable, match="timed out"):
        f.fetch_bytes(f"{server.url}/drip")
    assert time.monotonic() - started < chunks * every / 2  # the overall deadline, not the drip's end


def test_connection_refused_is_unavailable() -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    with fetcher() as f, pytest.raises(ReferenceUnavailable, match="cannot connect"):
        f.fetch_bytes(f"http://127.0.0.1:{port}/x")


def test_falls_back_to_the_next_checked_address(server: LocalServer) -> None:
    """127.0.0.2 refuses (the server listens on 127.0.0.1 only); the next one answers."""
    server.routes["/x"] = body(b"ok")
    resolver = names({"two.test": ["127.0.0.2", "127.0.0.1"]})
    with fetcher(fetch_allow=("127.0.0.0/8",), resolver=resolver) as f:
        assert f.fetch_bytes(f"http://two.test:{server.port}/x") == b"ok"


# -- images ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "data",
    [b"not an image", encode(RED, "PNG")[:50], b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", b""],
    ids=["text", "truncated", "eps", "empty"],
)
def test_undecodable_bytes(server: LocalServer, data: bytes) -> None:
    server.routes["/bad"] = body(data)
    with fetcher() as f, pytest.raises(ReferenceUnavailable, match="not a decodable image"):
        f.fetch_image(f"{server.url}/bad")


@pytest.mark.parametrize(
    ("size", "cap"),
    [
        ((100_000, 100_000), 4_000_000),
        ((8000, 8000), 40_000_000),
        ((2001, 2000), 4_000_000),
        ((20_000, 20_000), 500_000_000),
    ],
)
def test_decompression_bomb_refused_before_decoding(
    server: LocalServer, monkeypatch: pytest.MonkeyPatch, size: tuple[int, int], cap: int
) -> None:
    """The last case is within our cap but past PIL's own hard limit (2 * MAX_IMAGE_PIXELS)."""
    data = bomb_png(*size)
    assert len(data) < 200
    server.routes["/bomb.png"] = body(data)

    def no_load(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_load)
    with fetcher(fetch_max_pixels=cap) as f, pytest.raises(ReferenceUnavailable, match="pixels"):
        f.fetch_image(f"{server.url}/bomb.png")


def test_pil_bomb_warning_escalated_by_the_caller_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Between MAX_IMAGE_PIXELS and twice that PIL only warns; under -W error it is refused."""

    def no_load(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_load)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ReferenceUnavailable, match="too many pixels"):
            decode_image(bomb_png(10_000, 10_000), 200_000_000)


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = encode(Image.new("RGB", (40, 20), (0, 128, 255)), "JPEG", exif=exif.tobytes())
    assert decode_image(data, 10_000).size == (20, 40)


def test_pixel_cap_allows_images_at_the_cap() -> None:
    assert decode_image(encode(RED, "PNG"), 16 * 8).size == (16, 8)
    with pytest.raises(ReferenceUnavailable, match="more than 127 pixels"):
        decode_image(encode(RED, "PNG"), 16 * 8 - 1)


# -- address policy --------------------------------------------------------------------
def test_loopback_refused_when_not_allowlisted(server: LocalServer) -> None:
    server.routes["/x"] = body(b"secret")
    with fetcher(fetch_allow=()) as f, pytest.raises(UnsafeReference, match="non-public"):
        f.fetch_bytes(f"{server.url}/x")
    assert server.requests == []


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/iam/",
        "http://10.1.2.3/x",
        "http://172.16.0.1/x",
        "http://192.168.1.1/x",
        "http://100.64.0.1/x",
        "http://0.0.0.0/x",
        "http://127.0.0.1/x",
        "http://224.0.0.1/x",
        "http://240.0.0.1/x",
        "http://255.255.255.255/x",
        "http://[::1]/x",
        "http://[::]/x",
        "http://[::ffff:127.0.0.1]/x",
        "http://[::ffff:169.254.169.254]/x",
        "http://[fd00::1]/x",
        "http://[fe80::1]/x",
        "http://[fec0::1]/x",
        "http://[ff02::1]/x",
        "http://[64:ff9b::a9fe:a9fe]/x",
        "http://[2002:7f00:1::]/x",
        "https://[::1]:8443/x?token=abc",
    ],
)
def test_refused_addresses_without_connecting(url: str) -> None:
    client = httpx.Client(transport=httpx.MockTransport(no_network))
    with (
        fetcher(fetch_allow=("8.8.8.8", "203.0.113.0/24"), client=client, resolver=no_resolve) as f,
        pytest.raises(UnsafeReference) as info,
    ):
        f.fetch_bytes(url)
    assert "token" not in str(info.value)


@pytest.mark.parametrize("host", ["2130706433", "0x7f.1", "017700000001"])
def test_numeric_host_forms_are_resolved_then_refused(host: str) -> None:
    client = httpx.Client(transport=httpx.MockTransport(no_network))
    with (
        fetcher(fetch_allow=(), client=client, resolver=numeric_resolver) as f,
        pytest.raises(UnsafeReference, match="non-public"),
    ):
        f.fetch_bytes(f"http://{host}/x")


def test_any_private_address_refuses_the_host() -> None:
    client = httpx.Client(transport=httpx.MockTransport(no_network))
    resolver = names({"mixed.test": ["127.0.0.1", "10.0.0.1"], "pub.test": ["93.184.216.34", "10.0.0.1"]})
    with fetcher(client=client, resolver=resolver) as f, pytest.raises(UnsafeReference, match=r"10\.0\.0\.1"):
        f.fetch_bytes("http://mixed.test/x")
        with pytest.raises(UnsafeReference, match=r"10\.0\.0\.1"):
            f.fetch_bytes("http://pub.test/x")


def test_allowlist_by_host_and_by_cidr(server: LocalServer) -> None:
    server.routes["/x"] = body(b"ok")
    resolver = names({"refs.test": ["127.0.0.1"], "REFS2.test": ["127.0.0.1"], "refs2.test": ["127.0.0.1"]})
    with fetcher(fetch_allow=("Refs.Test.",), resolver=resolver) as f:
        assert f.fetch_bytes(f"http://refs.test:{server.port}/x") == b"ok"
        with pytest.raises(UnsafeReference):
            f.fetch_bytes(f"http://refs2.test:{server.port}/x")
    with fetcher(fetch_allow=("127.0.0.0/8",), resolver=resolver) as f:
        assert f.fetch_bytes(f"http://refs2.test:{server.port}/x") == b"ok"


def test_resolves_once_and_connects_to_the_checked_address(server: LocalServer) -> None:
    """A rebinding resolver answers a private address on the second call: never asked."""
    server.routes["/x"] = body(b"ok")
    answers = iter([["127.0.0.1"], ["10.0.0.1"]])
    calls: list[str] = []

    def rebinding(host: str, port: int) -> list[str]:
        calls.append(host)
        return next(answers)

    with fetcher(fetch_allow=("127.0.0.1",), resolver=rebinding) as f:
        assert f.fetch_bytes(f"http://rebind.test:{server.port}/x") == b"ok"
    assert calls == ["rebind.test"]
    assert server.header(0, "host") == f"rebind.test:{server.port}"


def test_unresolvable_host_is_unavailable() -> None:
    with (
        fetcher(resolver=names({}), client=httpx.Client(transport=httpx.MockTransport(no_network))) as f,
        pytest.raises(ReferenceUnavailable, match=r"cannot resolve nowhere\.test"),
    ):
        f.fetch_bytes("https://nowhere.test/a.png?sig=1")


# -- schemes and syntax --------------------------------------------------------------------
@pytest.mark.parametrize(
    "ref",
    [
        "file:///etc/passwd",
        "FILE:///etc/passwd",
        "ftp://127.0.0.1/x",
        "gopher://127.0.0.1:70/_x",
        "data:image/png;base64,iVBORw0KGgo=",
        "javascript:alert(1)",
        "dict://127.0.0.1:11211/stats",
        "localhost:8080/x",
        "http:/x",
        "http:x",
        "http://",
        "http:///x",
        "http://:80/x",
        "",
        "   ",
        "http://127.0.0.1/a b",
        "http://127.0.0.1/\x00",
        "http://127.0.0.1\\@evil.test/",
        "http://0251.0376.0251.0376/x",
        "http://%31%32%37.0.0.1/x",
        "http://[fe80::1%25eth0]/x",
        "http://-x.test/x",
        "http://a!b.test/x",
    ],
)
def test_bad_schemes_and_syntax(ref: str) -> None:
    client = httpx.Client(transport=httpx.MockTransport(no_network))
    with (
        fetcher(client=client, resolver=no_resolve, SUPABASE_URL="http://127.0.0.1:9") as f,
        pytest.raises(UnsafeReference),
    ):
        f.fetch_bytes(ref)


@pytest.mark.parametrize(
    "ref",
    ["http://user:hunter2@127.0.0.1/x", "http://user@127.0.0.1/x", "http://@127.0.0.1/x", "https://a:b@example.test/x"],
)
def test_userinfo_refused(ref: str) -> None:
    client = httpx.Client(transport=httpx.MockTransport(no_network))
    with fetcher(client=client, resolver=no_resolve) as f, pytest.raises(UnsafeReference, match="credentials") as info:
        f.fetch_bytes(ref)
    assert "hunter2" not in str(info.value)


# -- TLS: the URL carries the IP, SNI and certificate checks carry the name ------------
@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tool("openssl", "openssl")
    folder = tmp_path_factory.mktemp("tls")
    key, crt = folder / "key.pem", folder / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(crt),
            "-days",
            "2",
            "-subj",
            "/CN=refs.test",
            "-addext",
            "subjectAltName=DNS:refs.test",
        ],
        check=True,
        capture_output=True,
    )
    return crt, key


def test_https_uses_the_name_for_sni_and_verification(
    servers: Callable[..., LocalServer], cert: tuple[Path, Path]
) -> None:
    crt, key = cert
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(crt, key)
    seen: list[str | None] = []

    def record_sni(sock: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
        seen.append(name)

    tls.sni_callback = record_sni
    server = servers(tls)
    server.routes["/x.png"] = body(encode(RED, "PNG"))
    resolver = names({"refs.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
    trust = ssl.create_default_context(cafile=str(crt))
    with (
        httpx.Client(verify=trust) as client,
        fetcher(fetch_allow=("127.0.0.1",), resolver=resolver, client=client) as f,
    ):
        assert f.fetch_image(f"https://refs.test:{server.port}/x.png").size == (16, 8)
        with pytest.raises(ReferenceUnavailable):
            f.fetch_image(f"https://other.test:{server.port}/x.png")  # certificate is for refs.test
    assert seen[:2] == ["refs.test", "other.test"]
    assert server.header(0, "host") == f"refs.test:{server.port}"
    assert len(server.requests) == 1


# -- properties ----------------------------------------------------------------------------
URLISH = st.one_of(
    st.text(max_size=80),
    st.builds(
        lambda prefix, rest: prefix + rest,
        st.sampled_from(
            [
                "http://",
                "https://",
                "HTTP://",
                "file://",
                "ftp://",
                "data:",
                "//",
                "/",
                "refs/",
                "http://[",
                "http://u@",
                "http://127.0.0.1:",
                "http://[::ffff:",
                "http://10.",
                "https://xn--",
                "javascript:",
                "http:\\\\",
            ]
        ),
        st.text(st.characters(codec="utf-8"), max_size=60),
    ),
)


@hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ref=URLISH)
def test_arbitrary_refs_only_raise_fetch_errors_and_never_connect(ref: str) -> None:
    """Nothing is allowed and every name resolves to loopback: every ref is refused."""
    client = httpx.Client(transport=httpx.MockTransport(no_network))
    resolver = names({})

    def loopback(host: str, port: int) -> list[str]:
        if len(host) % 2:
            return resolver(host, port)
        return ["127.0.0.1"]

    f = ReferenceFetcher(make_settings(SUPABASE_URL="http://storage.test", fetch_allow=()), client, resolver=loopback)
    with pytest.raises(FetchError):
        f.fetch_image(ref)
    client.close()


SAMPLE_BODIES = [
    encode(RED, "PNG"),
    encode(RED, "JPEG"),
    encode(Image.new("LA", (3, 3)), "PNG"),
    encode(RED, "PNG")[:70],
    bomb_png(50_000, 50_000),
    bomb_png(3000, 3000),
    b"",
]


@hsettings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    status=st.sampled_from([200, 204, 301, 302, 303, 307, 308, 400, 404, 500]),
    location=st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
    payload=st.one_of(st.sampled_from(SAMPLE_BODIES), st.binary(max_size=300)),
    length=st.one_of(st.none(), st.sampled_from(["0", "5", "99999999", "-1", "x"])),
)
def test_arbitrary_responses_only_raise_fetch_errors(
    status: int, location: str, payload: bytes, length: str | None
) -> None:
    def respond(request: httpx.Request) -> httpx.Response:
        headers = {"Location": location}
        if length is not None:
            headers["Content-Length"] = length
        return httpx.Response(status, headers=headers, stream=httpx.ByteStream(payload))

    client = httpx.Client(transport=httpx.MockTransport(respond))
    f = ReferenceFetcher(
        make_settings(fetch_max_pixels=4_000_000, fetch_max_bytes=10_000),
        client,
        resolver=lambda host, port: ["127.0.0.1"],
    )
    try:
        image = f.fetch_image("http://anything.test/x")
    except FetchError:
        pass
    else:
        assert image.mode == "RGB"
    finally:
        client.close()
