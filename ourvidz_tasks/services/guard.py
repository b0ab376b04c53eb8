"""Messages that are not tasks: dead letters instead of dead workers.

A plain Celery worker on Redis dies on one list item that is not JSON
(kombu's ``loads`` raises inside the consumer loop), and quietly drops or logs
the body of an item that is JSON but no Celery envelope. Here every such item
goes to the dead-letter list (``keys.DEAD_LETTERS``) with its reason:

- :class:`RedisTransport` (kombu's Redis transport, one method changed)
  catches items that are not JSON or not an envelope right where they are
  popped. A raw job (the legacy edge format) found on a Celery queue is
  re-published as the proper task instead, when it names a known type.
- :class:`Consumer` (Celery's consumer) dead-letters bodies that fail to
  decode (wrong content type such as pickle, bad base64), unknown task names
  and malformed envelopes, without logging the body (it holds prompts).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

import redis
from celery.worker.consumer import Consumer as CeleryConsumer
from kombu.exceptions import ContentDisallowed
from kombu.transport import redis as kombu_redis

from ..contract import keys
from ..contract.settings import load_settings
from ..contract.text import as_text
from .redis_client import connect

log = logging.getLogger(__name__)

DEAD_LETTERS = keys.DEAD_LETTERS  # the name callers have used; spelled in contract.keys
DEAD_TTL = 30 * 24 * 3600
MAX_RAW = 64 * 1024

#: Set by the worker at start: ``publish(job) -> bool`` re-publishes a raw job.
RawJobHandler = Callable[[dict[str, Any]], bool]


class DeadLetters:
    """The dead-letter list: each entry is JSON with ``reason``, ``queue``, ``raw``."""

    def __init__(self, store: redis.Redis, key: str = DEAD_LETTERS) -> None:
        self.redis, self.key = store, key

    def push(self, reason: str, *, raw: bytes | str | None = None, queue: str | None = None,
             task_id: str | None = None, job_id: str | None = None) -> None:
        text = as_text(raw) if raw is not None else None
        entry = {
            "reason": reason, "queue": queue, "task_id": task_id, "job_id": job_id,
            "raw": text[:MAX_RAW] if text is not None else None, "at": time.time(),
        }
        with self.redis.pipeline() as pipe:
            pipe.lpush(self.key, json.dumps(entry))
            pipe.expire(self.key, DEAD_TTL)
            pipe.execute()
        log.error("dead letter (task %s, job %s, queue %s): %s", task_id, job_id, queue, reason)

    def entries(self) -> list[dict[str, Any]]:
        return [json.loads(item) for item in self.redis.lrange(self.key, 0, -1)]


class _Hooks:
    """What the running worker plugs into the transport (set once at start)."""

    dead: DeadLetters | None = None
    raw_job: RawJobHandler | None = None


hooks = _Hooks()


def _is_envelope(payload: object) -> bool:
    if not isinstance(payload, dict):
        return False
    props = payload.get("properties")
    return (
        isinstance(props, dict)
        and "delivery_tag" in props
        and isinstance(payload.get("headers", {}), dict)
        and "body" in payload
    )


def _foreign(channel: kombu_redis.Channel, item: bytes, queue: str) -> None:
    """Handle a popped list item that is not a Celery envelope."""
    dead = hooks.dead or DeadLetters(channel.client)
    try:
        payload = json.loads(as_text(item))
    except ValueError as exc:
        dead.push(f"not JSON: {exc}", raw=item, queue=queue)
        return
    if isinstance(payload, dict) and ("type" in payload or "job_type" in payload) and hooks.raw_job:
        try:
            if hooks.raw_job(payload):
                log.warning("raw job found on queue %s re-published as a task", queue)
                return
        except Exception as exc:  # keep the item, whatever went wrong
            dead.push(f"raw job could not be re-published: {type(exc).__name__}", raw=item, queue=queue)
            return
    dead.push("not a Celery envelope", raw=item, queue=queue)


#: (queue, item) popped by BRPOP but lost to a broken connection before kombu recorded it in unacked
_orphans: list[tuple[str, bytes]] = []


class Channel(kombu_redis.Channel):
    """kombu's Redis channel, with foreign list items dead-lettered, not fatal."""

    def _brpop_read(self, **options: Any) -> bool:
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if not dest__item:
                raise kombu_redis.Empty()
            dest, item = dest__item
            dest = as_text(dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            payload = _decode(item)
            if payload is None:
                _foreign(self, item, dest)
                return True
            try:
                self.connection._deliver(payload, dest)
            except (redis.RedisError, OSError):  # not self.connection_errors: kombu counts KeyError as one
                # popped, but not recorded in unacked: only this process still has it
                _orphans.append((dest, item))
                log.warning("a message popped from %s was not recorded (broker lost); it goes back on reconnect", dest)
                raise
            except Exception as exc:  # an envelope kombu or Celery chokes on: a dead letter, not a dead worker
                self._forget(payload)
                (hooks.dead or DeadLetters(self.client)).push(
                    f"malformed envelope: {type(exc).__name__}", raw=item, queue=dest)
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]
            flush = getattr(self, "_flush_brpop_reauth", None)
            if flush is not None:
                flush()

    def _brpop_start(self, timeout: Any = 1) -> Any:
        while _orphans:
            dest, item = _orphans[0]
            self.client.rpush(dest, item)  # the consuming end: it is next
            _orphans.pop(0)
            log.warning("a message popped from %s before the broker was lost is back on its queue", dest)
        return super()._brpop_start(timeout)

    def _forget(self, payload: dict[str, Any]) -> None:
        """Drop a message that failed on delivery from kombu's unacked bookkeeping, if it got there."""
        try:
            tag = payload["properties"]["delivery_tag"]
            if tag in self.qos._delivered:
                self.qos.ack(tag)
        except Exception as exc:
            log.error("could not drop a malformed envelope from unacked: %s", type(exc).__name__)

    def _get(self, queue: str, timeout: Any = None) -> dict[str, Any]:
        while True:
            with self.conn_or_acquire() as client:
                for pri in self.priority_steps:
                    item = client.rpop(self._q_for_pri(queue, pri))
                    if item:
                        payload = _decode(item)
                        if payload is not None:
                            return payload
                        _foreign(self, item, queue)
                        break
                else:
                    raise kombu_redis.Empty()


def _decode(item: bytes) -> dict[str, Any] | None:
    try:
        payload = json.loads(as_text(item))
    except ValueError:
        return None
    return payload if _is_envelope(payload) else None


class RedisTransport(kombu_redis.Transport):
    """kombu's Redis transport using :class:`Channel`."""

    Channel = Channel


class SentinelChannel(Channel, kombu_redis.SentinelChannel):
    """:class:`Channel` on the primary its sentinels name (``sentinel://`` broker URLs)."""


class SentinelTransport(kombu_redis.SentinelTransport):
    """kombu's Redis Sentinel transport using :class:`SentinelChannel`."""

    Channel = SentinelChannel


class Consumer(CeleryConsumer):
    """Celery's consumer; undecodable, unknown and invalid tasks become dead letters."""

    def _dead(self, reason: str, message: Any, body: Any = None) -> None:
        headers = getattr(message, "headers", None) or {}
        raw = body if isinstance(body, (bytes, str)) else getattr(message, "body", None)
        queue = (getattr(message, "delivery_info", None) or {}).get("routing_key")
        try:
            (hooks.dead or DeadLetters(connect(self.app.conf.ourvidz_redis_url, load_settings()))).push(
                reason, raw=raw if isinstance(raw, (bytes, str)) else None, queue=queue, task_id=headers.get("id")
            )
        except Exception as exc:  # never let bookkeeping kill the consumer
            log.error("could not record a dead letter (%s): %s", reason, exc)

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        self._dead(f"undecodable message ({message.content_type}): {type(exc).__name__}", message)
        message.ack()

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self._dead("not a Celery task message", message, body)
        message.reject_log_error(log, self.connection_errors)

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        name = (getattr(message, "headers", None) or {}).get("task")
        self._dead(f"unknown task {str(name)[:100]!r}", message, body)
        message.reject_log_error(log, self.connection_errors)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        if isinstance(exc, ContentDisallowed):
            reason = f"refused content type {str(getattr(message, 'content_type', '?'))[:60]!r} (JSON only)"
        else:
            reason = f"invalid task message: {type(exc).__name__}"
        self._dead(reason, message, body)
        message.reject_log_error(log, self.connection_errors)
