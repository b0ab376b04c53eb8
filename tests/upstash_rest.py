"""A small Upstash-REST-compatible server in front of a real Redis (for tests).

What the edge publisher relies on, as Upstash documents it: ``POST /`` with a
JSON array body ``["LPUSH", key, value]`` and ``Authorization: Bearer
{token}`` answers ``{"result": ...}`` (bulk strings as text, integers as
numbers, nil as null), an error answers 400 ``{"error": "..."}``, a wrong
token 401. Every command received is recorded for the tests to inspect.
"""

from __future__ import annotations

import hmac
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import redis


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _json(self, status: int, value: object) -> None:
        body = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        owner = self.server.owner
        if not hmac.compare_digest(self.headers.get("Authorization", ""), f"Bearer {owner.token}"):
            return self._json(401, {"error": "Unauthorized"})
        if self.path.rstrip("/") != "":
            return self._json(404, {"error": "only POST / is served here"})
        try:
            command = json.loads(raw)
            if not isinstance(command, list) or not command:
                raise ValueError("the body must be a JSON array: [command, ...args]")
        except ValueError as exc:
            return self._json(400, {"error": f"ERR {exc}"})
        with owner.lock:
            owner.commands.append([str(part) for part in command])
        try:
            result = owner.client.execute_command(*command)
        except redis.ResponseError as exc:
            return self._json(400, {"error": str(exc)})
        self._json(200, {"result": _plain(result)})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: UpstashRest


class UpstashRest:
    """``UpstashRest(redis_url, token).start()``; ``.url``; ``.commands``; ``.stop()``."""

    def __init__(self, redis_url: str, token: str, host: str = "127.0.0.1", port: int = 0) -> None:
        self.token = token
        self.client = redis.Redis.from_url(redis_url)
        self.client.response_callbacks.clear()  # raw replies, as Upstash returns them
        self.commands: list[list[str]] = []
        self.lock = threading.Lock()
        self.server = _Server((host, port), _Handler)
        self.server.owner = self
        self.thread = threading.Thread(target=self.server.serve_forever, name="upstash-rest", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> UpstashRest:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.client.close()

    def pushed(self, queue: str) -> list[dict[str, Any]]:
        """The envelopes LPUSHed onto ``queue`` so far, decoded."""
        with self.lock:
            return [json.loads(c[2]) for c in self.commands if c[0].upper() == "LPUSH" and c[1] == queue]
