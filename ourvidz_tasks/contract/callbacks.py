"""The callback body and its signature (CONTRACT.md section 4).

A callback is one JSON object per job event (``processing``, then one
terminal ``completed`` or ``failed``), encoded once by :func:`dumps`; the
edge checks ``X-Callback-Signature`` (:func:`sign`) against those exact bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from collections.abc import Sequence
from typing import Any, Literal

Status = Literal["processing", "completed", "failed"]
#: the header that carries :func:`sign`'s value
SIGNATURE_HEADER = "X-Callback-Signature"


def sign(secret: bytes, body: bytes) -> str:
    """The ``X-Callback-Signature`` value for the exact body bytes."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def dumps(body: dict[str, Any]) -> bytes:
    """The one JSON encoding of callback bodies (compact, UTF-8)."""
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def callback_body(
    job_id: str,
    worker_id: str,
    status: Status,
    *,
    attempt: int,
    assets: Sequence[dict[str, Any]] = (),
    metadata: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
    callback_id: str | None = None,
) -> dict[str, Any]:
    """A callback body: ``assets`` always a list, ``metadata`` always an object."""
    body: dict[str, Any] = {
        "job_id": job_id,
        "worker_id": worker_id,
        "status": status,
        "assets": list(assets),
        "metadata": {**(metadata or {}), "callback_id": callback_id or uuid.uuid4().hex, "attempt": attempt},
    }
    if error is not None:
        body["error"] = error
    return body
