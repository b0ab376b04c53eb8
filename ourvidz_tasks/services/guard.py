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
from dataclasses import dataclass
from typing import Any

import redis
from celery.worker.consumer import Consumer as CeleryConsumer
from kombu.exceptions import ContentDisallowed
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.json import dumps

from ..contract import keys, names
from ..contract.settings import load_settings
from ..contract.text import as_text
from . import fairness, fetching
from .backoff import Backoff
from .redis_client import (
    STEADY_WAIT,
    Connection,
    SentinelConnection,
    SentinelSSLConnection,
    SSLConnection,
    TransientError,
    connect,
    steady,
)

log = logging.getLogger(__name__)

DEAD_LETTERS = keys.DEAD_LETTERS  # the name callers have used; spelled in contract.keys
DEAD_TTL = 30 * 24 * 3600
MAX_RAW = 64 * 1024

#: how long a lost sentinel primary is waited for before Celery's reconnect backoff (and how long broker
#: commands wait out a failover's transient answers: :func:`~.redis_client.steady`)
FAILOVER_WAIT = STEADY_WAIT
#: how often a sentinel transport without a primary asks again (seconds)
ELECTION_POLL = 0.1

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
    #: the queues this process serves in fair order (:mod:`.fairness`; their intake runs in it too)
    fair: FairFetch | None = None


@dataclass(frozen=True)
class FairFetch:
    """A pool's fetch in fair order: its queues, how long a pool counts as present without a fetch
    (the lease) and how long a picked job counts as running without ending (the longest job)."""

    queues: frozenset[str]
    present: float
    keep: float


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
    """kombu's Redis QoS; a message fetched into a processing list leaves it as it enters ``unacked``;
    the bookkeeping waits out a failover's transient answers (:func:`steady`)."""

    def append(self, message: Any, delivery_tag: str) -> None:
        fetched: tuple[str, bytes] | None = getattr(self.channel, "_fetched", None)
        if fetched is None:
            steady(lambda: kombu_redis.QoS.append(self, message, delivery_tag))
            return
        delivery = message.delivery_info
        record = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])

        def record_it() -> None:
            with self.pipe_or_acquire() as pipe:  # MULTI/EXEC: in unacked and out of the processing list at once
                pipe.zadd(self.unacked_index_key, {delivery_tag: time.time()})
                pipe.hset(self.unacked_key, delivery_tag, record)
                pipe.lrem(fetched[0], 1, fetched[1])
                pipe.execute()

        steady(record_it)
        virtual.QoS.append(self, message, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        steady(lambda: self._remove_from_indices(delivery_tag).execute())
        virtual.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        steady(lambda: kombu_redis.QoS.reject(self, delivery_tag, requeue))

    def restore_visible(self, start: int = 0, num: int = 10, interval: int = 10) -> None:
        try:  # kombu's sweep of old unacked entries; at connect too, where an error would be fatal
            super().restore_visible(start, num, interval)
        except TransientError as exc:  # it runs again on its period
            log.warning("unacked sweep skipped: broker answers %s", str(exc).split(" ", 1)[0])


class Channel(kombu_redis.Channel):
    """kombu's Redis channel: foreign list items dead-lettered, not fatal; a fetch without a window.

    Once this process has a consumer identity (its crash-recovery incarnation, set by
    ``runtime.recovery``), a fetch moves the message into that incarnation's processing list
    (:mod:`.fetching`) instead of popping it: a non-blocking sweep of every source list in kombu's
    BRPOP order, then, if all were empty, a ``BLMOVE`` on the first one for ``brpop_timeout``.
    """

    QoS = QoS
    connection_class: type[redis.Connection] = Connection
    connection_class_ssl = SSLConnection  # type: ignore[assignment]

    #: the fetch command in flight (None: kombu's own BRPOP), and the source lists it names
    _fetch_cmd: str | None = None
    _fetch_sources: list[str] = []  # noqa: RUF012 (replaced, never mutated)
    #: the next fetch sweeps (True) or blocks (False: the last sweep found nothing)
    _fetch_sweep = True
    #: the processing lists may hold a message: put it back before the next fetch (start, connection lost)
    _fetch_stranded = True
    #: (processing list, item) while the fetched message is being delivered (read by :meth:`QoS.append`)
    _fetched: tuple[str, bytes] | None = None
    #: pauses between fetches while the broker answers transiently (a failover settling)
    _fetch_pauses: Backoff | None = None

    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        steady(lambda: super(Channel, self)._put(queue, message, **kwargs))

    def _new_queue(self, queue: str, auto_delete: bool = False, **kwargs: Any) -> Any:
        return steady(lambda: super(Channel, self)._new_queue(queue, auto_delete, **kwargs))

    def _queue_bind(self, exchange: Any, routing_key: Any, pattern: Any, queue: Any) -> Any:
        return steady(lambda: super(Channel, self)._queue_bind(exchange, routing_key, pattern, queue))

    def _brpop_start(self, timeout: Any = None) -> Any:
        identity = hooks.consumer
        if identity is None:
            self._fetch_cmd = None
            return super()._brpop_start(timeout)
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return None
        fair = hooks.fair
        if fair is not None and fair.queues.issuperset(queues):
            sources = list(queues)  # picked messages wait in a processing list per queue
        else:
            fair = None
            sources = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
        if self._fetch_stranded:
            try:
                fetching.restore_own(self.client, identity, sources)
            except TransientError as exc:  # a new primary without its replica yet: no fetch before it
                self._fetch_paused(exc)
                return None
            self._fetch_stranded, self._fetch_sweep = False, True
        wait = self.brpop_timeout if timeout is None else timeout
        if fair is not None:
            command = fairness.pick_command(identity, queues, present=fair.present, keep=fair.keep) \
                if self._fetch_sweep else fairness.bell_command(queues, wait)
        elif self._fetch_sweep:
            command = fetching.sweep_command(identity, sources)
        else:
            command = fetching.block_command(identity, sources[0], wait)
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
            except TransientError as exc:  # refused, nothing moved: wait a little, fetch again, never exit
                self._fetch_paused(exc)
                raise kombu_redis.Empty() from None
            except self.connection_errors:
                self._fetch_stranded = True  # a reply lost on the way may have moved a message
                self.client.connection.disconnect()
                raise
            self._fetch_pauses = None
            if command == "BLPOP":  # the bell rang (or it timed out): pick again
                self._fetch_sweep = True
                raise kombu_redis.Empty()
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

    def _fetch_paused(self, exc: TransientError) -> None:
        if self._fetch_pauses is None:
            self._fetch_pauses = Backoff(0.05, 1.0)
            log.warning("broker answers %s to the fetch; fetching again with backoff", str(exc).split(" ", 1)[0])
        self._fetch_stranded = True  # reconnecting: (re)register the processing lists on the new primary
        time.sleep(self._fetch_pauses.next())  # the event loop has nothing else to do meanwhile (solo pools)

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

    connection_class = SentinelConnection
    connection_class_ssl = SentinelSSLConnection  # type: ignore[assignment]


class SentinelTransport(kombu_redis.SentinelTransport):
    """kombu's Redis Sentinel transport using :class:`SentinelChannel`.

    A connection that finds no primary (the sentinels still name the dead one) tries again every
    :data:`ELECTION_POLL` seconds for up to :data:`FAILOVER_WAIT`: the pool is back as soon as the
    sentinels name the new primary, not after Celery's reconnect backoff (2 s, then 4 s, ...).
    """

    Channel = SentinelChannel

    def establish_connection(self) -> Any:
        deadline = time.monotonic() + FAILOVER_WAIT
        while True:
            try:
                return super().establish_connection()
            except self.connection_errors:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(ELECTION_POLL)


class Consumer(CeleryConsumer):
    """Celery's consumer; undecodable, unknown and invalid tasks become dead letters."""

    def _dead(self, reason: str, message: Any, body: Any = None) -> None:
        headers = getattr(message, "headers", None) or {}
        raw = body if isinstance(body, (bytes, str)) else getattr(message, "body", None)
        queue = (getattr(message, "delivery_info", None) or {}).get("routing_key")
        if isinstance(queue, str):  # the queue its publisher sent it to, not the ready queue it came through
            queue = names.family_of_queue(queue)
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
