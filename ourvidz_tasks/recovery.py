"""Crash recovery on Redis without waiting for ``visibility_timeout``.

kombu keeps a delivered, unacknowledged message in the ``unacked`` hash and
hands it back only after ``visibility_timeout`` (hours here, since it must
exceed the longest job). So each worker proves it is alive instead:

- a heartbeat key ``ourvidz:alive:{node}`` (TTL ``lease_seconds``), refreshed
  every ``lease_seconds / 3`` by a daemon thread;
- an owner record ``ourvidz:owner:{delivery_tag}`` written when the worker
  receives a message (``task_received``), ETA-held retries included;
- every worker scans ``unacked`` on the same period: a message whose owner's
  heartbeat is gone (the worker was killed) or that has no owner after a
  grace period goes back to the head of its queue, under kombu's own mutex,
  in one transaction, as kombu itself restores messages.

The poison guard counts deliveries per job attempt in Redis
(:func:`count_delivery`, on every broker), so a job that kills its worker every time is
given up after ``max_deliveries`` with a ``failed`` callback.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

import redis
from kombu.transport.redis import Mutex, MutexHeld

log = logging.getLogger(__name__)

UNACKED, UNACKED_INDEX, UNACKED_MUTEX = "unacked", "unacked_index", "unacked_mutex"


class Recovery:
    """Heartbeat, owner records and the unacked scanner of one worker."""

    def __init__(self, broker: redis.Redis, node: str, *, lease_seconds: float,
                 owner_ttl: int, scan: bool = True) -> None:
        self.broker, self.node = broker, node
        self.lease = lease_seconds
        self.owner_ttl = owner_ttl
        self.scan_enabled = scan
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="recovery", daemon=True)

    # -- liveness ------------------------------------------------------------------
    def start(self) -> None:
        self.beat()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.broker.delete(self._alive(self.node))

    def beat(self) -> None:
        self.broker.set(self._alive(self.node), str(time.time()), px=int(self.lease * 1000))

    def own(self, delivery_tag: str) -> None:
        """Record that this worker holds ``delivery_tag`` (called on receipt)."""
        self.broker.set(f"ourvidz:owner:{delivery_tag}", self.node, ex=self.owner_ttl)

    def release(self, delivery_tag: str) -> None:
        """The task of ``delivery_tag`` ended: keep the record only for the grace period."""
        self.broker.expire(f"ourvidz:owner:{delivery_tag}", max(1, int(self.lease * 2)))

    def _loop(self) -> None:
        period = self.lease / 3
        while not self._stop.wait(period):
            try:
                self.beat()
                if self.scan_enabled:
                    self.scan()
            except redis.RedisError as exc:
                log.warning("recovery: %s", type(exc).__name__)

    @staticmethod
    def _alive(node: str) -> str:
        return f"ourvidz:alive:{node}"

    # -- the scanner ---------------------------------------------------------------
    def scan(self) -> int:
        """Restore messages whose owner is dead; return how many."""
        grace = self.lease * 2
        cutoff = time.time() - grace
        candidates = self.broker.zrangebyscore(UNACKED_INDEX, 0, cutoff)
        restored = 0
        for raw_tag in candidates:
            tag = raw_tag.decode() if isinstance(raw_tag, bytes) else str(raw_tag)
            raw_owner = self.broker.get(f"ourvidz:owner:{tag}")
            owner = raw_owner.decode() if isinstance(raw_owner, bytes) else raw_owner
            if owner is not None and self.broker.exists(self._alive(owner)):
                continue
            try:
                with Mutex(self.broker, UNACKED_MUTEX, 30):
                    if self._restore(tag):
                        restored += 1
                        log.warning("recovery: message %s of dead worker %s requeued", tag, owner or "?")
            except MutexHeld:
                break
        return restored

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
        self.broker.delete(f"ourvidz:owner:{tag}")
        return done



def count_delivery(store: redis.Redis, job_id: str, retries: int, ttl: int) -> int:
    """Count one more delivery of this job attempt (any broker); return the count."""
    key = f"ourvidz:deliveries:{job_id}:{retries}"
    with store.pipeline() as pipe:
        pipe.incr(key)
        pipe.expire(key, ttl)
        count, _ = pipe.execute()
    return int(count)
