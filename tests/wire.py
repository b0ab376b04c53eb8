"""Publishing exactly as CONTRACT.md section 1 tells a non-Python publisher to.

A Celery protocol v2 envelope built by hand (base64 JSON body ``[args,
kwargs, embed]``) and LPUSHed onto the queue's Redis list: what the edge
function does. Tests use it to prove the wire contract, not Celery's client.
"""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import redis


def envelope(task: str, args: list[Any], queue: str, *, task_id: str | None = None,
             argsrepr: str | None = None, chain: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    task_id = task_id or str(uuid.uuid4())
    body = [args, {}, {"callbacks": None, "errbacks": None, "chain": chain, "chord": None}]
    return {
        "body": base64.b64encode(json.dumps(body).encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py", "task": task, "id": task_id, "shadow": None, "eta": None, "expires": None,
            "group": None, "group_index": None, "retries": 0, "timelimit": [None, None],
            "root_id": task_id, "parent_id": None, "argsrepr": argsrepr or "()", "kwargsrepr": "{}",
            "origin": "edge@test", "ignore_result": False,
        },
        "properties": {
            "correlation_id": task_id, "reply_to": "", "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0, "body_encoding": "base64", "delivery_tag": str(uuid.uuid4()),
        },
    }


def signature(task: str, args: list[Any] | None = None, queue: str | None = None) -> dict[str, Any]:
    """A chain element as ``embed.chain`` holds it (a serialized Celery signature)."""
    return {
        "task": task, "args": args or [], "kwargs": {},
        "options": {"queue": queue, "routing_key": queue, "exchange": ""} if queue else {},
        "subtask_type": None, "immutable": False, "chord_size": None,
    }


def publish(client: redis.Redis, task: str, job: Any, queue: str, **options: Any) -> str:
    env = envelope(task, [job], queue, argsrepr=f"({job.get('id') if isinstance(job, dict) else None!r},)", **options)
    client.lpush(queue, json.dumps(env))
    return str(env["headers"]["id"])
