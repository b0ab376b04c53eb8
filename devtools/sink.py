"""A local Supabase-compatible sink: storage objects and the job callback.

A real HTTP server (standard library only) for the demo and the tests:

- ``POST|PUT /storage/v1/object/{bucket}/{path}``: upload (Bearer key required)
- ``GET /storage/v1/object/{bucket}/{path}``: download (Bearer key required)
- ``GET /storage/v1/object/public/{bucket}/{path}``: download, no key
- ``DELETE /storage/v1/object/{bucket}/{path}``: remove (Bearer key required)
- ``POST /functions/v1/job-callback``: checks the key and the HMAC signature,
  records the call
- ``GET /_sink/callbacks``, ``GET /_sink/requests``: what was received; ``?job_id=ID``: only what
  concerns that job (:meth:`Sink.requests_for`: its callbacks, and objects with ``ID`` as a folder)
- ``POST /_sink/faults`` ``{"callback": 503, "storage": 503, "thumbnail": 500, "preview": 500}``:
  answer those statuses (``thumbnail``: thumbnail uploads only; ``preview``: live
  preview uploads only) until reset with ``{}`` (outage drills); ``{"callback_hang": 30}``:
  hold each callback 30 s, then answer 504 (an edge that hangs rather than refuses)

Live previews (``.../preview.webp``) are overwritten in place; the sink also
keeps every version in memory (``Sink.versions(rel)``), so a test can open each.

Run it alone with ``python -m devtools.sink --root DIR --port N``; the key
and secret come from ``SUPABASE_SERVICE_KEY`` and ``JOB_CALLBACK_SECRET``.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

OBJECT = "/storage/v1/object/"
PUBLIC = "/storage/v1/object/public/"
CALLBACK = "/functions/v1/job-callback"
PREVIEW = "/preview.webp"
MAX_BODY = 512 * 1024 * 1024
#: the request headers each recorded request keeps (the key itself is recorded only as ``authorized``)
RECORDED_HEADERS = ("Content-Type", "x-upsert", "X-Callback-Signature")


class SinkState:
    """What the sink has received, shared by the handler threads."""

    def __init__(self, root: Path, key: str, secret: str | None) -> None:
        self.root = root
        self.key = key
        self.secret = secret.encode() if secret else None
        self.lock = threading.Lock()
        self.callbacks: list[dict[str, Any]] = []
        self.requests: list[dict[str, Any]] = []
        self.faults: dict[str, int] = {}
        #: every upload of a live preview (``*/preview.webp``), in arrival order, by path
        self.versions: dict[str, list[bytes]] = {}

    def object_path(self, rel: str) -> Path | None:
        parts = [unquote(p) for p in rel.split("/")]
        if not parts or any(p in ("", ".", "..") or "\\" in p for p in parts):
            return None
        return self.root.joinpath(*parts)


def concerns(request: dict[str, Any], job_id: str) -> bool:
    """Whether a recorded request is about ``job_id``: a callback whose body names it, or an object path
    with it as a folder (``bucket/user/{job_id}/0.png``, a reference under ``refs/{job_id}/``)."""
    return request.get("job_id") == job_id or job_id in request["path"].split("/")[:-1]


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        # headers and body go out in two writes: without this, Nagle + delayed ACK add 40 ms a reply
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    @property
    def state(self) -> SinkState:
        return self.server.state

    def _reply(self, status: int, body: bytes = b"", content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, value: object) -> None:
        self._reply(status, json.dumps(value).encode())

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise ValueError("body too large")
        return self.rfile.read(length) if length else b""

    def _authorized(self) -> bool:
        return hmac.compare_digest(self.headers.get("Authorization", ""), f"Bearer {self.state.key}")

    def _record(self, **extra: Any) -> None:
        headers = {name: self.headers[name] for name in RECORDED_HEADERS if name in self.headers}
        with self.state.lock:
            self.state.requests.append(
                {"method": self.command, "path": urlsplit(self.path).path, "at": time.time(),
                 "authorized": self._authorized(), "headers": headers, **extra}
            )

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        path, job_id = parts.path, parse_qs(parts.query).get("job_id", [None])[0]
        self._record()
        if path == "/_sink/callbacks":
            with self.state.lock:
                calls = self.state.callbacks
                return self._json(200, [c for c in calls if job_id is None or c["body"].get("job_id") == job_id])
        if path == "/_sink/requests":
            with self.state.lock:
                return self._json(200, [r for r in self.state.requests if job_id is None or concerns(r, job_id)])
        if path == "/_sink/health":
            return self._json(200, {"ok": True})
        if path.startswith(PUBLIC):
            return self._download(path[len(PUBLIC):])
        if path.startswith(OBJECT):
            if not self._authorized():
                return self._json(401, {"error": "unauthorized"})
            return self._download(path[len(OBJECT):])
        self._json(404, {"error": "not found"})

    do_HEAD = do_GET

    def _download(self, rel: str) -> None:
        if (status := self.state.faults.get("storage")) is not None:
            return self._json(status, {"error": "injected fault"})
        target = self.state.object_path(rel)
        if target is None or not target.is_file():
            return self._json(404, {"error": "object not found"})
        meta = target.with_name(target.name + ".content-type")
        content_type = meta.read_text() if meta.exists() else "application/octet-stream"
        self._reply(200, target.read_bytes(), content_type)

    def do_PUT(self) -> None:
        self.do_POST()

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        try:
            body = self._body()
        except ValueError:
            return self._json(413, {"error": "too large"})
        if path == "/_sink/faults":
            with self.state.lock:
                self.state.faults = {k: int(v) for k, v in json.loads(body or b"{}").items()}
            return self._json(200, self.state.faults)
        if path == CALLBACK:
            return self._callback(body)
        if path.startswith(OBJECT) and not path.startswith(PUBLIC):
            return self._upload(path[len(OBJECT):], body)
        self._record()
        self._json(404, {"error": "not found"})

    def _upload(self, rel: str, body: bytes) -> None:
        self._record(size=len(body), content_type=self.headers.get("Content-Type"))
        if not self._authorized():
            return self._json(401, {"error": "unauthorized"})
        status = self.state.faults.get("storage")
        if rel.endswith(".thumb.webp"):
            status = self.state.faults.get("thumbnail", status)
        if rel.endswith(PREVIEW):
            status = self.state.faults.get("preview", status)
        if status is not None:
            return self._json(status, {"error": "injected fault"})
        target = self.state.object_path(rel)
        if target is None:
            return self._json(400, {"error": "bad path"})
        if target.exists() and self.headers.get("x-upsert", "").lower() != "true":
            return self._json(409, {"error": "exists"})
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(body)
        target.with_name(target.name + ".content-type").write_text(self.headers.get("Content-Type", ""))
        if rel.endswith(PREVIEW):
            with self.state.lock:
                self.state.versions.setdefault(rel, []).append(body)
        self._json(200, {"Key": rel})

    def do_DELETE(self) -> None:
        path = urlsplit(self.path).path
        self._record()
        if not path.startswith(OBJECT) or path.startswith(PUBLIC):
            return self._json(404, {"error": "not found"})
        if not self._authorized():
            return self._json(401, {"error": "unauthorized"})
        if (status := self.state.faults.get("storage")) is not None:
            return self._json(status, {"error": "injected fault"})
        target = self.state.object_path(path[len(OBJECT):])
        if target is None or not target.is_file():
            return self._json(404, {"error": "object not found"})
        target.unlink()
        target.with_name(target.name + ".content-type").unlink(missing_ok=True)
        self._json(200, {"message": "Successfully deleted"})

    def _callback(self, body: bytes) -> None:
        signature = self.headers.get("X-Callback-Signature")
        expected = "sha256=" + hmac.new(self.state.secret, body, hashlib.sha256).hexdigest() if self.state.secret else None
        signature_ok = expected is None or (signature is not None and hmac.compare_digest(signature, expected))
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        job_id = parsed.get("job_id") if isinstance(parsed, dict) else None
        self._record(job_id=job_id if isinstance(job_id, str) else None)
        if (hang := self.state.faults.get("callback_hang")) is not None:
            time.sleep(hang)  # an edge that hangs, then gives up (a gateway timeout): nothing recorded
            return self._json(504, {"error": "injected hang"})
        if (status := self.state.faults.get("callback")) is not None:
            return self._json(status, {"error": "injected fault"})
        if not self._authorized():
            return self._json(401, {"error": "unauthorized"})
        if parsed is None:
            return self._json(400, {"error": "not JSON"})
        with self.state.lock:
            self.state.callbacks.append(
                {"body": parsed, "signature": signature, "signature_ok": signature_ok, "at": time.time(),
                 "content_type": self.headers.get("Content-Type")}
            )
        if not signature_ok:
            return self._json(401, {"error": "bad signature"})
        self._json(200, {"ok": True})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: SinkState


class Sink:
    """The sink server; ``start()`` serves in a background thread."""

    def __init__(self, root: Path, key: str, secret: str | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.state = SinkState(root, key, secret)
        self.server = _Server((host, port), _Handler)
        self.server.state = self.state
        self.thread = threading.Thread(target=self.server.serve_forever, name="sink", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> Sink:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def callbacks(self, job_id: str | None = None) -> list[dict[str, Any]]:
        with self.state.lock:
            return [c for c in self.state.callbacks if job_id is None or c["body"].get("job_id") == job_id]

    def requests(self) -> list[dict[str, Any]]:
        with self.state.lock:
            return list(self.state.requests)

    def requests_for(self, job_id: str) -> list[dict[str, Any]]:
        """The requests about one job (:func:`concerns`), in arrival order: a test sharing the session's
        sink reads only its own job's, whatever ran before it."""
        with self.state.lock:
            return [r for r in self.state.requests if concerns(r, job_id)]

    def put(self, rel: str, data: bytes, content_type: str = "image/png") -> str:
        """Store an object directly (e.g. a reference image); return its public URL."""
        target = self.state.object_path(rel)
        if target is None:
            raise ValueError(f"bad object path {rel!r}")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        target.with_name(target.name + ".content-type").write_text(content_type)
        return f"{self.url}{PUBLIC}{rel}"

    def versions(self, rel: str) -> list[bytes]:
        """Every upload of the live preview ``rel`` (``bucket/user/job/preview.webp``), oldest first."""
        with self.state.lock:
            return list(self.state.versions.get(rel, []))

    def faults(self, **statuses: int) -> None:
        with self.state.lock:
            self.state.faults = dict(statuses)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="folder that holds the stored objects")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=54321)
    args = parser.parse_args()
    key = os.environ.get("SUPABASE_SERVICE_KEY")
    if not key:
        parser.error("SUPABASE_SERVICE_KEY must be set")
    sink = Sink(args.root, key, os.environ.get("JOB_CALLBACK_SECRET"), args.host, args.port)
    signal.signal(signal.SIGTERM, _interrupt)
    print(f"sink listening on {sink.url}, objects in {args.root}", flush=True)
    try:
        sink.server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        sink.server.server_close()


if __name__ == "__main__":
    main()
