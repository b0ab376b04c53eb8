"""Crash recovery on Redis without waiting for ``visibility_timeout``.

kombu keeps a delivered, unacknowledged message in the ``unacked`` hash and
hands it back only after ``visibility_timeout`` (hours here, since it must
exceed the longest job). So each worker proves it is alive instead:

- the owner is one process *incarnation*, ``{node}/{random id}``, never the
  node name alone: a supervisor restarts a killed pool under the same name
  (``sdxl@gpu0``), and that new process must not look like the owner of what
  its dead predecessor held;
- a heartbeat key ``ourvidz:alive:{node}/{incarnation}`` (TTL
  ``lease_seconds``), refreshed every ``lease_seconds / 3`` by a daemon thread;
  ``ourvidz:incarnation:{node}`` names the node's newest incarnation;
- an owner record ``ourvidz:owner:{delivery_tag}`` (the incarnation) written
  when the worker receives a message (``task_received``, :meth:`Recovery.received`), ETA-held
  retries included, and kept only for a grace period once its task ended (:meth:`Recovery.ended`);
- at start, a worker requeues at once every message an earlier incarnation of
  its node name held (node names are unique per live process, as Celery requires);
- a message fetched but not yet recorded in ``unacked`` waits in its consumer's processing list
  (``services.fetching``); the same judgement hands it back once that incarnation is gone;
- every worker scans ``unacked`` on the same period: a message whose owner is
  proven gone (:mod:`.liveness`: its process gone on this host, a newer
  incarnation of its node, or silent for a lease plus a margin on another host,
  judged by a scanner that was not itself stalled) or that has no owner after a
  grace period goes back to the head of its queue, under kombu's own mutex,
  in one transaction, as kombu itself restores messages. A lapsed heartbeat alone
  (a live worker starved under load) is no proof.

The poison guard counts deliveries per job attempt in Redis
(:func:`count_delivery`; on Redis only those whose owner died mid-job, :mod:`.admission`),
so a job that kills its worker every time is given up after ``max_deliveries`` with a ``failed`` callback.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from typing import Any, cast

import redis
from kombu.transport.redis import Mutex, MutexHeld

from ..contract import keys
from ..contract.text import as_text
from ..services import fetching
from ..services.guard import hooks
from .liveness import Silence, owner_gone, write_beat

log = logging.getLogger(__name__)

UNACKED, UNACKED_INDEX, UNACKED_MUTEX = "unacked", "unacked_index", "unacked_mutex"


def node_of(owner: str) -> str:
    """The node name of an owner record (``node/incarnation``; older records hold the node alone)."""
    return owner.rsplit("/", 1)[0] if "/" in owner else owner


class Recovery:
    """Heartbeat, owner records and the unacked scanner of one worker process (one incarnation)."""

    def __init__(self, broker: redis.Redis, node: str, *, lease_seconds: float,
                 owner_ttl: int, scan: bool = True) -> None:
        self.broker, self.node = broker, node
        self.incarnation = uuid.uuid4().hex[:12]
        #: what owner records and the heartbeat key name: this process, not its node name
        self.identity = f"{node}/{self.incarnation}"
        self.lease = lease_seconds
        self.owner_ttl = owner_ttl
        self.scan_enabled = scan
        #: earlier incarnations' messages still to hand back (kombu's mutex was busy, or no broker yet)
        self._reclaim_pending = True
        #: task id -> delivery tag of the messages this process holds now
        self.held: dict[Any, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="recovery", daemon=True)
        #: how silent another host's owner must be to be gone; None while this scanner was stalled
        self._silence = Silence(lease_seconds, lease_seconds / 3)
        self.silence: float | None = None

    # -- liveness ------------------------------------------------------------------
    def start(self) -> None:
        """Announce this incarnation, hand back what earlier ones held, and keep beating.

        A broker that does not answer yet is not fatal: the thread retries every period. From now
        on the broker guard fetches into this incarnation's processing lists (:mod:`~..services.fetching`).
        """
        hooks.consumer = self.identity
        try:
            self.beat()
            self.reclaim()
        except redis.RedisError as exc:
            log.warning("recovery: broker not answering at start (%s); retrying", type(exc).__name__)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.broker.delete(self._alive(self.identity), keys.beat(self.identity))
        except redis.RedisError as exc:
            log.warning("recovery: could not remove the heartbeat: %s", type(exc).__name__)

    def beat(self) -> None:
        with self.broker.pipeline() as pipe:
            pipe.set(self._alive(self.identity), str(time.time()), px=int(self.lease * 1000))
            pipe.set(keys.incarnation(self.node), self.incarnation, ex=max(1, int(self.owner_ttl)))
            # the registry of processing lists lives while any worker beats (every key we write expires)
            pipe.expire(keys.FETCHERS, fetching.REGISTRY_TTL)
            pipe.execute()
        write_beat(self.broker, self.identity, int(self.owner_ttl))

    def own(self, delivery_tag: str) -> None:
        """Record that this incarnation holds ``delivery_tag`` (called on receipt)."""
        self.broker.set(keys.owner(delivery_tag), self.identity, ex=self.owner_ttl)

    def release(self, delivery_tag: str) -> None:
        """The task of ``delivery_tag`` ended: keep the record only for the grace period."""
        self.broker.expire(keys.owner(delivery_tag), max(1, int(self.lease * 2)))

    def received(self, task_id: Any, delivery_tag: str) -> None:
        """A message arrived (``task_received``): own it, so that a crash hands it back quickly."""
        self.own(delivery_tag)
        self.held[task_id] = delivery_tag

    def ended(self, task_id: Any) -> None:
        """Its task ended (``task_postrun``): the message is acked next. If that ack is lost (a broker
        outage), the owner record expires after the grace and the scanner hands the message back."""
        tag = self.held.pop(task_id, None)
        if not tag:
            return
        try:
            self.release(tag)
        except redis.RedisError as exc:
            log.warning("recovery: could not release %s: %s", tag, type(exc).__name__)

    def _loop(self) -> None:
        period = self.lease / 3
        while not self._stop.wait(period):
            self.silence = self._silence.tick()
            try:
                self.beat()
                if self._reclaim_pending:
                    self.reclaim()
                if self.scan_enabled:
                    self.scan()
            except redis.RedisError as exc:
                log.warning("recovery: %s", type(exc).__name__)

    @staticmethod
    def _alive(identity: str) -> str:
        return keys.alive(identity)

    def _owner(self, tag: str) -> str | None:
        raw = self.broker.get(keys.owner(tag))
        return as_text(raw) if raw is not None else None

    def reclaim(self) -> int:
        """Requeue at once every message an earlier incarnation of this node name held.

        That process is gone (this one took its name), so there is no lease to wait for.
        """
        restored, pending = 0, False
        for raw_tag in self.broker.zrange(UNACKED_INDEX, 0, -1):
            tag = as_text(raw_tag)
            owner = self._owner(tag)
            if owner is None or owner == self.identity or node_of(owner) != self.node:
                continue
            got = self._restore_locked(tag, owner, "earlier incarnation")
            pending = pending or got < 0
            restored += max(got, 0)
        restored += fetching.restore_dead(
            self.broker, lambda owner: owner != self.identity and node_of(owner) == self.node)
        self._reclaim_pending = pending
        return restored

    # -- the scanner ---------------------------------------------------------------
    def scan(self) -> int:
        """Restore messages whose owner is dead; return how many.

        Not in the first ``lease`` seconds after the broker (re)started: heartbeats written just
        before a restart may have expired while it was down, and live workers need one beat
        period to reconnect and refresh theirs; a live worker's job must not run twice.
        """
        if int(self.broker.info("server").get("uptime_in_seconds", 0)) < self.lease:
            return 0
        # the grace is for messages without an owner record only (just delivered: the receiver may not
        # have written it yet); an owner whose heartbeat lapsed is dead, so a lost host's jobs come back
        # one lease after its last beat, however recently they were delivered (tests/test_fleet.py)
        cutoff = time.time() - self.lease * 2
        restored = 0
        entries = cast("list[tuple[bytes, float]]", self.broker.zrange(UNACKED_INDEX, 0, -1, withscores=True))
        for raw_tag, delivered in entries:
            tag = as_text(raw_tag)
            owner = self._owner(tag)
            if owner is None and delivered > cutoff:
                continue
            if owner is not None and not owner_gone(self.broker, owner, self.silence):
                continue  # alive, or not proven gone (a starved worker, or this scanner was stalled)
            got = self._restore_locked(tag, owner, "dead worker")
            if got < 0:
                break
            restored += got
        # messages fetched but never recorded in unacked, by incarnations proven gone (the same judgement)
        restored += fetching.restore_dead(self.broker, lambda owner: owner_gone(self.broker, owner, self.silence))
        return restored

    def _restore_locked(self, tag: str, owner: str | None, why: str) -> int:
        """Restore one message under kombu's mutex: 1 restored, 0 gone already, -1 mutex busy."""
        try:
            with Mutex(self.broker, UNACKED_MUTEX, 30):
                if self._restore(tag):
                    log.warning("recovery: message %s of %s %s requeued", tag, why, owner or "?")
                    return 1
        except MutexHeld:
            return -1
        return 0

    def _restore(self, tag: str) -> bool:
        done = False

        def transaction(pipe: Any) -> None:
            nonlocal done
            raw = pipe.hget(UNACKED, tag)
            pipe.multi()
            pipe.zrem(UNACKED_INDEX, tag)
            pipe.hdel(UNACKED, tag)
            if raw is None:
                return
            payload, exchange, routing_key = json.loads(raw)
            payload.setdefault("headers", {})["redelivered"] = True
            info = payload.get("properties", {}).get("delivery_info", {})
            info["redelivered"] = True
            queue = routing_key or info.get("routing_key") or exchange
            pipe.rpush(queue, json.dumps(payload))
            done = True

        self.broker.transaction(transaction, UNACKED)
        self.broker.delete(keys.owner(tag))
        return done



def count_delivery(store: redis.Redis, job_id: str, retries: int, ttl: int) -> int:
    """Count one more delivery of this job attempt (any broker); return the count."""
    with store.pipeline() as pipe:
        queue_count_delivery(pipe, job_id, retries, ttl)
        count, _ = pipe.execute()
    return int(count)


def queue_count_delivery(pipe: Any, job_id: str, retries: int, ttl: int) -> None:
    """:func:`count_delivery` as two commands on the caller's pipeline (results: the count, True)."""
    key = keys.deliveries(job_id, retries)
    pipe.incr(key)
    pipe.expire(key, ttl)
