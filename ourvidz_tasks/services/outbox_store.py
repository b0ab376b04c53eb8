"""The durable callback outbox in Redis (``OURVIDZ_REDIS_URL``) and its drainer.

A pool delivers each callback at once (:class:`~ourvidz_tasks.services.delivery.OutboxCallbacks`);
only a body that could not be delivered is appended here, and so is every
later body of the same job (and, while this process is behind, every body),
so a job's callbacks keep their order. Keys:

- ``ourvidz:outbox``: a list of entries ``{"job_id", "body", "at"}``, oldest first;
  ``body`` is the exact string that is signed and posted;
- ``ourvidz:outbox:jobs``: a hash job id -> entries of that job in the list;
- ``ourvidz:outbox:lock``: the one drainer at a time (token, with a TTL), so
  the list is delivered from its head in order;
- ``ourvidz:outbox:consumer``: the heartbeat of a ``bin/worker outbox`` drain
  loop; while it lives, pools leave the draining to it;
- ``ourvidz:outbox:last``: ``{"at", "ok", "error"}`` of the last delivery try.

Every pool runs a :class:`Drainer` thread: it delivers the list whenever no
consumer heartbeat is alive, so the pools alone are a complete deployment.
A body is removed only after it was delivered (a crash in between re-sends
it with the same ``callback_id``); a body the edge refuses (4xx) becomes a
dead letter.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import redis

from ..contract import keys
from ..contract.errors import DeliveryError, DeliveryRefused
from ..contract.settings import Settings
from ..contract.text import as_text
from . import events
from .backoff import Backoff
from .delivery import HttpCallbacks, OutboxCallbacks, mark_delivered, refused
from .guard import DeadLetters
from .redis_client import register_script

log = logging.getLogger(__name__)

LIST, JOBS, LOCK = keys.OUTBOX, keys.OUTBOX_JOBS, keys.OUTBOX_LOCK
CONSUMER, LAST = keys.OUTBOX_CONSUMER, keys.OUTBOX_LAST
#: seconds between two looks at the outbox while it is empty or another drainer holds it
INTERVAL = 0.5
#: the longest pause between two tries while the edge is down
MAX_PAUSE = 10.0
#: an outbox whose oldest body waits longer than this with a live consumer: the consumer is stuck
STUCK_SECONDS = 60.0

# pop the delivered head (only if it is still the entry that was sent), count it off its
# job, note the try and keep the drainer's lock
_POP = """
if redis.call('LINDEX', KEYS[1], 0) ~= ARGV[1] then return 0 end
redis.call('LPOP', KEYS[1])
if redis.call('HINCRBY', KEYS[2], ARGV[2], -1) <= 0 then redis.call('HDEL', KEYS[2], ARGV[2]) end
redis.call('SET', KEYS[3], ARGV[3], 'EX', ARGV[4])
if redis.call('GET', KEYS[4]) == ARGV[5] then redis.call('PEXPIRE', KEYS[4], ARGV[6]) end
return 1
"""
_UNLOCK = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"

Send = Callable[[str, bytes], Any]


@dataclass
class OutboxState:
    """What the status command and metrics show."""

    depth: int
    oldest_age: float | None
    consumer: str | None
    last: dict[str, Any] | None

    def as_dict(self) -> dict[str, Any]:
        return {"depth": self.depth, "oldest_age_seconds": self.oldest_age, "consumer": self.consumer,
                "last_try": self.last}


def consumer_health(state: OutboxState, expected: bool) -> str:
    """``draining`` (a consumer is alive and keeping up), ``pools`` (none expected: the pools drain),
    ``missing`` (one is configured, none alive: the pools drain) or ``stuck`` (alive, but the oldest
    body has waited over :data:`STUCK_SECONDS`)."""
    if state.consumer is None:
        return "missing" if expected else "pools"
    return "stuck" if state.depth and (state.oldest_age or 0.0) > STUCK_SECONDS else "draining"


class Outbox:
    """The Redis side of the outbox (see the module docstring)."""

    def __init__(self, store: redis.Redis, *, ttl: int, lock_seconds: float, delivered_ttl: int | None = None) -> None:
        self.redis = store
        self.ttl = ttl
        self.delivered_ttl = delivered_ttl or ttl  # the job's delivered mark (``terminal_ttl``)
        self.lock_ms = int(lock_seconds * 1000)
        self._pop = register_script(store, _POP)
        self._unlock = register_script(store, _UNLOCK)

    @classmethod
    def for_settings(cls, store: redis.Redis, settings: Settings) -> Outbox:
        return cls(store, ttl=settings.idempotency_ttl, lock_seconds=settings.http_timeout + 30,
                   delivered_ttl=settings.terminal_ttl)

    # -- producers --------------------------------------------------------------
    def push(self, job_id: str, body: bytes) -> None:
        """Append one body (durable once this returns)."""
        entry = json.dumps({"job_id": job_id, "body": body.decode(), "at": time.time()})
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.rpush(LIST, entry)
            pipe.hincrby(JOBS, job_id, 1)
            pipe.execute()

    def holds(self, job_id: str) -> bool:
        """True while bodies of ``job_id`` wait in the outbox."""
        return bool(self.redis.hexists(JOBS, job_id))

    # -- the drainer ---------------------------------------------------------------
    def drain(self, send: Send, token: str, beat: Callable[[], None] | None = None) -> str:
        """Deliver from the head while it goes: ``empty``, ``busy`` (another drainer) or ``blocked``."""
        if not self.redis.set(LOCK, token, nx=True, px=self.lock_ms):
            return "busy"
        try:
            while True:
                raw = self.redis.lindex(LIST, 0)
                if raw is None:
                    return "empty"
                if beat is not None:
                    beat()
                if not self._deliver_head(raw, send, token):
                    return "blocked"
        finally:
            self._unlock(keys=[LOCK], args=[token])

    def _deliver_head(self, raw: bytes | str, send: Send, token: str) -> bool:
        try:
            entry = json.loads(raw)
            job_id, body = str(entry["job_id"]), str(entry["body"])
            status = json.loads(body).get("status")
        except (ValueError, KeyError, TypeError, AttributeError):
            DeadLetters(self.redis).push("outbox entry is not a callback", raw=raw, queue=LIST)
            self._pop_head(raw, "?", {"at": time.time(), "ok": False, "error": "malformed entry"}, token)
            return True
        try:
            send(job_id, body.encode())
        except DeliveryRefused as exc:
            refused(self.redis, job_id, body, exc, queue=LIST)
            events.callback_failed.send(sender="outbox", job_id=job_id, status=status)
            self._pop_head(raw, job_id, {"at": time.time(), "ok": False, "error": str(exc)}, token)
            return True
        except DeliveryError as exc:
            self.redis.set(LAST, json.dumps({"at": time.time(), "ok": False, "error": str(exc)}), ex=self.ttl)
            log.warning("outbox: job %s %s callback waits for the edge (%s)", job_id, status, exc)
            return False
        if status in ("completed", "failed"):  # before the pop: a crash in between re-sends, never loses
            mark_delivered(self.redis, job_id, self.delivered_ttl)
        self._pop_head(raw, job_id, {"at": time.time(), "ok": True, "error": None}, token)
        log.info("outbox: job %s %s callback delivered", job_id, status)
        return True

    def _pop_head(self, raw: bytes | str, job_id: str, last: dict[str, Any], token: str) -> None:
        self._pop(keys=[LIST, JOBS, LAST, LOCK], args=[raw, job_id, json.dumps(last), self.ttl, token, self.lock_ms])

    # -- consumer heartbeat and state ----------------------------------------------
    def beat(self, node: str, ttl: float) -> None:
        self.redis.set(CONSUMER, node, px=int(ttl * 1000))

    def look(self) -> tuple[int, bool]:
        """``(depth, a consumer is alive)`` in one round trip."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.llen(LIST)
            pipe.exists(CONSUMER)
            depth, alive = pipe.execute()
        return int(depth), bool(alive)

    def state(self) -> OutboxState:
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.llen(LIST)
            pipe.lindex(LIST, 0)
            pipe.get(CONSUMER)
            pipe.get(LAST)
            depth, head, consumer, last = pipe.execute()
        oldest = None
        if head is not None:
            try:
                oldest = round(max(0.0, time.time() - float(json.loads(head)["at"])), 3)
            except (ValueError, KeyError, TypeError):
                oldest = None
        return OutboxState(int(depth), oldest, as_text(consumer) if consumer else None,
                           json.loads(last) if last else None)


class Drainer:
    """A daemon thread that delivers the outbox (see the module docstring).

    ``consumer=True`` (``bin/worker outbox``): drains always and keeps the
    consumer heartbeat. A pool (``consumer=False``) drains only while no
    consumer heartbeat is alive; with ``expect_consumer`` it logs when the
    configured consumer is missing or stuck.
    """

    def __init__(self, outbox: Outbox, send: Send, node: str, *, consumer: bool = False,
                 expect_consumer: bool = False, on_empty: Callable[[], None] | None = None,
                 interval: float = INTERVAL, max_pause: float = MAX_PAUSE) -> None:
        self.outbox, self.send, self.node = outbox, send, node
        self.consumer, self.expect_consumer = consumer, expect_consumer
        self.on_empty = on_empty  # the pool's sender may deliver directly again
        self.interval, self.max_pause = interval, max_pause
        self.token = f"{node}:{uuid.uuid4().hex}"
        self.pauses = Backoff(2 * interval, max_pause)  # while the edge refuses to take the head
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="outbox", daemon=True)
        self._warned = "draining"

    def start(self) -> Drainer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)

    def wake(self) -> None:
        """Look now (a body was just handed over), unless backing off from a failing edge."""
        if not self.pauses.backing_off:
            self._wake.set()

    def _beat(self) -> None:
        # outlives the longest pause between two tries: a consumer waiting out an outage stays alive
        self.outbox.beat(self.node, ttl=self.max_pause + max(5.0, 4 * self.interval))

    def _loop(self) -> None:
        wait = self.interval
        while not self._stop.is_set():
            self._wake.wait(wait)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                wait = self.tick()
            except redis.RedisError as exc:
                log.warning("outbox: %s", type(exc).__name__)
                wait = self.max_pause

    def tick(self) -> float:
        """One look (and drain when it is ours to do); the seconds until the next look."""
        if self.consumer:
            self._beat()
        else:
            depth, alive = self.outbox.look()
            self._report(depth, alive)
            if depth == 0:
                self._empty()
                return self.interval
            if alive:
                return self.interval
        result = self.outbox.drain(self.send, self.token, self._beat if self.consumer else None)
        if result == "empty":
            self._empty()
        if result == "blocked":
            return max(self.interval, self.pauses.next())
        self.pauses.reset()
        return self.interval

    def _empty(self) -> None:
        if self.on_empty is not None:
            self.on_empty()

    def _report(self, depth: int, alive: bool) -> None:
        """Log once per change when a configured consumer is missing (or alive but not draining)."""
        if not self.expect_consumer:
            return
        state = "missing" if not alive else consumer_health(self.outbox.state(), True) if depth else "draining"
        if state != self._warned:
            if state == "missing":
                log.warning("outbox: no live `bin/worker outbox` consumer (OURVIDZ_OUTBOX_CONSUMER is set); "
                            "%s drains the outbox", self.node)
            elif state == "stuck":
                log.warning("outbox: the consumer is alive but the oldest callback has waited over %.0fs",
                            STUCK_SECONDS)
            else:
                log.info("outbox: a consumer is draining again")
            self._warned = state


def pool_callbacks(settings: Settings, store: redis.Redis, client: httpx.Client,
                   node: str) -> tuple[OutboxCallbacks, Drainer]:
    """A pool's transport (at once, failures to the outbox) and its drainer (not started)."""
    outbox = Outbox.for_settings(store, settings)
    drainer = Drainer(outbox, HttpCallbacks(settings, client, tries=1).send, node,
                      expect_consumer=settings.outbox_consumer, max_pause=settings.outbox_max_pause)
    transport = OutboxCallbacks(HttpCallbacks(settings, client, tries=1, timeout=settings.callback_timeout),
                                outbox, drainer.wake)
    drainer.on_empty = transport.caught_up
    return transport, drainer
