"""A stand-in for an OpenAI-compatible server (vLLM, SGLang): ``POST /v1/completions`` with canned tokens.

Each whitespace-separated word of the prompt is one "token"; the reply is
``max_tokens`` words (``finish_reason: length``), or two when the prompt says
``STOP`` (``stop``). A context over :data:`CONTEXT` tokens is refused with
vLLM's 400 messages. Every request body is kept in :attr:`ChatServer.seen`. :meth:`ChatServer.down`
and :meth:`ChatServer.up` take it away and bring it back on the same port (an outage).
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CONTEXT = 512


class ChatServer:
    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.seen.append(body)
                status, answer = server.answer(self.path, body)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.handler = Handler
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.httpd.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def answer(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if path != "/v1/completions":
            return 404, {"error": {"message": f"no route {path}"}}
        prompt, limit = str(body["prompt"]), int(body["max_tokens"])
        used = len(prompt.split())
        if used >= CONTEXT:
            return 400, {"error": {"message": f"The decoder prompt (length {used}) is longer than the maximum "
                                              f"model length of {CONTEXT}.", "type": "BadRequestError"}}
        if used + limit > CONTEXT:
            return 400, {"error": {"message": f"This model's maximum context length is {CONTEXT} tokens. However, "
                                              f"you requested {used + limit} tokens ({used} in the messages, {limit} "
                                              "in the completion).", "type": "BadRequestError"}}
        made = min(2, limit) if "STOP" in prompt else limit
        return 200, {
            "id": "cmpl-1", "object": "text_completion", "model": body["model"],
            "choices": [{"index": 0, "text": " ".join(["word"] * made),
                         "finish_reason": "stop" if made < limit else "length"}],
            "usage": {"prompt_tokens": used, "completion_tokens": made, "total_tokens": used + made},
        }

    def down(self) -> None:
        """Stop serving and close the port: a client is refused, as by a server that went away."""
        self.httpd.shutdown()
        self.httpd.server_close()

    def up(self) -> None:
        """Serve again on the same port (after :meth:`down`), as a restarted server does."""
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), self.handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def __enter__(self) -> ChatServer:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.down()
