"""Messages that are not tasks: dead letters instead of dead workers.

A plain Celery worker on Redis dies on one list item that is not JSON
(kombu's ``loads`` raises inside the consumer loop), and quietly drops or logs
the body of an item that is JSON but no Celery envelope. Here every such item
goes to the dead-letter list (``keys.DEAD_LETTERS``) with its reason:

- :class:`RedisTransport` (kombu's Redis transport, its fetch changed)
  catches items that are not JSON or not an envelope right where they are
  fetched. Its fetch has no window in which a message is off the broker
  (:mod:`.fetching`: moved into the consumer's processing list, out of it as
  it enters ``unacked``). A raw job (the legacy edge format) found on a Celery queue is
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
from kombu.transport import virtual
from kombu.utils.json import dumps

from ..contract import keys
from ..contract.settings import load_settings
from ..contract.text import as_text
from . import fetching
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
    #: this process's crash-recovery incarnation (``runtime.recovery``): names its processing lists
    consumer: str | None = None
    #: a fault seam for tests: called with each fetched envelope before kombu records it in ``unacked``
    fetched: Callable[[dict[str, Any]], None] | None = None


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


class QoS(kombu_redis.QoS):
    """kombu's Redis QoS; a message fetched into a processing list leaves it as it enters ``unacked``."""

    def append(self, message: Any, delivery_tag: str) -> None:
        fetched: tuple[str, bytes] | None = getattr(self.channel, "_fetched", None)
        if fetched is None:
            super().append(message, delivery_tag)
            return
        delivery = message.delivery_info
        record = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
        with self.pipe_or_acquire() as pipe:  # MULTI/EXEC: in unacked and out of the processing list at once
            pipe.zadd(self.unacked_index_key, {delivery_tag: time.time()})
            pipe.hset(self.unacked_key, delivery_tag, record)
            pipe.lrem(fetched[0], 1, fetched[1])
            pipe.execute()
        virtual.QoS.append(self, message, delivery_tag)


class Channel(kombu_redis.Channel):
    """kombu's Redis channel: foreign list items dead-lettered, not fatal; a fetch without a window.

    Once this process has a consumer identity (its crash-recovery incarnation, set by
    ``runtime.recovery``), a fetch moves the message into that incarnation's processing list
    (:mod:`.fetching`) instead of popping it: a non-blocking sweep of every source list in kombu's
    BRPOP order, then, if all were empty, a ``BLMOVE`` on the first one for ``brpop_timeout``.
    """

    QoS = QoS

    #: the fetch command in flight (None: kombu's own BRPOP), and the source lists it names
    _fetch_cmd: str | None = None
    _fetch_sources: list[str] = []  # noqa: RUF012 (replaced, never mutated)
    #: the next fetch sweeps (True) or blocks (False: the last sweep found nothing)
    _fetch_sweep = True
    #: the processing lists may hold a message: put it back before the next fetch (start, connection lost)
    _fetch_stranded = True
    #: (processing list, item) while the fetched message is being delivered (read by :meth:`QoS.append`)
    _fetched: tuple[str, bytes] | None = None

    def _brpop_start(self, timeout: Any = None) -> Any:
        identity = hooks.consumer
        if identity is None:
            self._fetch_cmd = None
            return super()._brpop_start(timeout)
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return None
        sources = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
        if self._fetch_stranded:
            fetching.restore_own(self.client, identity, sources)
            self._fetch_stranded, self._fetch_sweep = False, True
        if self._fetch_sweep:
            command = fetching.sweep_command(identity, sources)
        else:
            command = fetching.block_command(identity, sources[0], self.brpop_timeout if timeout is None else timeout)
        self._fetch_cmd, self._fetch_sources = command[0], sources
        self._in_poll = self.client.connection
        self._brpop_sent_at = time.monotonic()  # type: ignore[assignment]
        self.client.connection.send_command(*command)
        return None

    def _brpop_read(self, **options: Any) -> bool:
        command = self._fetch_cmd or "BRPOP"
        try:
            try:
                reply = self.client.parse_response(self.client.connection, command, **options)
            except self.connection_errors:
                self._fetch_stranded = True  # a reply lost on the way may have moved a message
                self.client.connection.disconnect()
                raise
            if command == "BLMOVE":
                reply = [self._fetch_sources[0], reply] if reply else None
            if not reply:
                # an empty sweep is followed by a blocking move, a timed-out one by a sweep
                self._fetch_sweep = command != "EVAL"
                raise kombu_redis.Empty()
            self._fetch_sweep = True
            source, item = as_text(reply[0]), reply[1]
            processing = keys.fetching(hooks.consumer, source) if self._fetch_cmd and hooks.consumer else None
            self._handle(source, item, processing)
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]
            flush = getattr(self, "_flush_brpop_reauth", None)
            if flush is not None:
                flush()

    def _handle(self, source: str, item: bytes, processing: str | None) -> None:
        dest = source.rsplit(self.sep, 1)[0]
        self._queue_cycle.rotate(dest)
        payload = _decode(item)
        if payload is None:
            _foreign(self, item, dest)
            if processing:
                fetching.unfetch(self.client, processing, item)
            return
        self._fetched = (processing, item) if processing else None
        try:
            if hooks.fetched is not None:
                hooks.fetched(payload)
            self.connection._deliver(payload, dest)
        except (redis.RedisError, OSError):  # not self.connection_errors: kombu counts KeyError as one
            # not recorded in unacked: it stays in this incarnation's processing list, on the broker,
            # and goes back to its queue when this process reconnects (or recovery, once it is gone)
            self._fetch_stranded = True
            log.warning("a message fetched from %s was not recorded (broker lost); it goes back on reconnect", dest)
            raise
        except Exception as exc:  # an envelope kombu or Celery chokes on: a dead letter, not a dead worker
            self._forget(payload)
            (hooks.dead or DeadLetters(self.client)).push(
                f"malformed envelope: {type(exc).__name__}", raw=item, queue=dest)
            if processing:
                fetching.unfetch(self.client, processing, item)
        finally:
            self._fetched = None

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
