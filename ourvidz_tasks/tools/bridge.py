"""``bin/bridge``: raw jobs from the legacy lists into Celery tasks, none lost, none run twice.

The deployed edge function RPUSHes raw job JSON onto ``sdxl_queue`` and
``wan_queue`` on ``OURVIDZ_LEGACY_REDIS_URL`` (CONTRACT.md section 1). For
each list, one thread moves jobs, oldest first (the old workers RPOPped, so
the newest ran first; this is FIFO):

1. ``BLMOVE {list} ourvidz:bridge:processing:{list} LEFT RIGHT``: the job is
   atomically in the processing list, never only in this process's memory;
2. claim its id: ``SET ourvidz:bridge:job:{id} publishing NX EX ttl`` on
   ``OURVIDZ_REDIS_URL`` (a record already there: a duplicate, dropped);
3. publish: routed by ``type``, never by the list (WAN image types arrive on
   ``sdxl_queue`` too); ``*_enhanced`` WAN types not yet enhanced become the
   chain ``ourvidz.chat.enhance → ourvidz.wan.generate``. Task ids derive from
   the job id (:func:`task_ids`), so the result backend can tell later whether
   a publish happened;
4. record ``published``; 5. ``LREM`` the job from the processing list.

On start (and after a lost connection) what is left in a processing list goes
through 2-5 again: a job recorded ``published`` is only removed; one caught
between 2 and 4 is published again unless the result backend already knows
one of its tasks. (A crash after the broker took the message but before the
record, while the message still waits in its queue, publishes it twice; the
workers' terminal record by job id then keeps it from running twice once the
first copy ended.)

Items that cannot become a task (not JSON, no usable id, unknown type) go to
the dead-letter list ``ourvidz:dead`` with the reason; invalid jobs that can
be routed are published, and their worker sends the ``INVALID_JOB`` callback.
One bridge runs at a time (a lock key on the legacy Redis); every key it
writes expires. SIGTERM/SIGINT: the job in hand is finished, then it exits 0.
Logs name job ids, never prompts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import redis

from ..contract.errors import ConfigError
from ..contract.jobs import FAMILY_OF_TYPE, usable_id
from ..contract.settings import load_settings
from ..services.guard import DeadLetters
from ..services.redis_client import connect

log = logging.getLogger("ourvidz_tasks.tools.bridge")

LISTS = ("sdxl_queue", "wan_queue")
PROCESSING = "ourvidz:bridge:processing:{list}"
RECORD = "ourvidz:bridge:job:{job_id}"
LOCK = "ourvidz:bridge:lock"
#: a processing list outlives any outage of the bridge; refreshed on every move
PROCESSING_TTL = 30 * 24 * 3600
PUBLISHING, PUBLISHED = "publishing", "published"
#: namespace of the task ids derived from job ids
TASK_NAMESPACE = uuid.UUID("5b0b4c1e-0d8f-4c52-9f5e-6f1f1d7a2b10")
ENHANCE = "ourvidz.chat.enhance"
#: test hook: ``move``, ``claim`` or ``publish``: os._exit(70) right after that step
CRASH_ENV = "OURVIDZ_BRIDGE_CRASH_AT"
CRASH_POINTS = ("move", "claim", "publish")

_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"
_REFRESH = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end"
)


@dataclass(frozen=True)
class Route:
    """Where a raw job goes: the generate task, after enhancement or not."""

    job_id: str
    job_type: str
    family: str
    enhance: bool

    @property
    def task(self) -> str:
        return f"ourvidz.{self.family}.generate"

    def task_ids(self) -> list[str]:
        """The ids of the tasks published for this job, in chain order."""
        return task_ids(self.job_id, self.enhance)


def task_ids(job_id: str, enhance: bool) -> list[str]:
    """Task ids derived from the job id: ``[enhance id,] generate id``."""
    steps = ["enhance", "generate"] if enhance else ["generate"]
    return [str(uuid.uuid5(TASK_NAMESPACE, f"{job_id}/{step}")) for step in steps]


class Unroutable(ValueError):
    """A raw item that cannot become a task; the message is the dead letter's reason."""


def route(payload: object) -> Route:
    """The route of a raw job, by its ``type`` (never by the list it came from)."""
    if not isinstance(payload, dict):
        raise Unroutable(f"a job must be a JSON object, got {type(payload).__name__}")
    job_id = usable_id(payload)
    if job_id is None:
        raise Unroutable("no usable job id (`id` must be 1-128 characters of [A-Za-z0-9_-])")
    job_type = payload.get("type") or payload.get("job_type")
    family = FAMILY_OF_TYPE.get(job_type) if isinstance(job_type, str) else None
    if family is None:
        shown = repr(job_type)[:60] if job_type is not None else "none"
        raise Unroutable(f"unknown job type {shown}")
    metadata = payload.get("metadata")
    enhanced = isinstance(metadata, dict) and (
        metadata.get("enhanced_prompt") is not None or metadata.get("enhancement_error") is not None
    )
    enhance = family == "wan" and str(job_type).endswith("_enhanced") and not enhanced
    return Route(job_id, str(job_type), family, enhance)


class Publisher(Protocol):
    """Publishes a routed job; tells whether a task id already reached a worker."""

    def publish(self, job: dict[str, Any], route: Route) -> None: ...

    def known(self, task_ids: Sequence[str]) -> bool: ...


class CeleryPublisher:
    """Publishes through a Celery app (by task name), job id only in ``argsrepr``."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def publish(self, job: dict[str, Any], route: Route) -> None:
        from celery import chain

        ids = route.task_ids()
        if route.enhance:
            signature = chain(
                self.app.signature(ENHANCE, args=[job]).set(task_id=ids[0]),
                self.app.signature(route.task).set(task_id=ids[1]),
            )
        else:
            signature = self.app.signature(route.task, args=[job]).set(task_id=ids[0])
        signature.apply_async(argsrepr=f"({route.job_id!r},)", kwargsrepr="{}")

    def known(self, task_ids: Sequence[str]) -> bool:
        """True when the result backend has any state for one of the tasks (started or later)."""
        return any(self.app.AsyncResult(task_id).state != "PENDING" for task_id in task_ids)


class Bridge:
    """Moves raw jobs from the legacy lists into Celery tasks; see the module docstring."""

    def __init__(
        self,
        legacy: redis.Redis,
        store: redis.Redis,
        publisher: Publisher,
        *,
        lists: Sequence[str] = LISTS,
        record_ttl: int = 7 * 24 * 3600,
        block: float = 1.0,
        crash_at: str | None = None,
    ) -> None:
        self.legacy, self.store, self.publisher = legacy, store, publisher
        self.lists = tuple(lists)
        self.record_ttl = record_ttl
        self.block = block
        self.crash_at = crash_at
        self.dead = DeadLetters(store)
        self.stop = threading.Event()
        self.moved = 0

    # -- one job ------------------------------------------------------------------
    def handle(self, item: bytes, source: str, *, fresh: bool) -> None:
        """Publish (or dead-letter) one item of ``source``'s processing list, then remove it.

        ``fresh``: it was just moved (a record already there means a duplicate);
        otherwise it is a leftover of a crash or of a failed publish. An
        exception (broker or Redis down) leaves the item in the processing list.
        """
        processing = PROCESSING.format(list=source)
        try:
            payload = json.loads(item)
            where = route(payload)
        except (ValueError, UnicodeDecodeError) as exc:
            reason = str(exc) if isinstance(exc, Unroutable) else f"not JSON: {_short(exc)}"
            self.dead.push(reason, raw=item, queue=source, job_id=usable_id(_maybe_json(item)))
            self._remove(processing, item)
            return
        record = RECORD.format(job_id=where.job_id)
        claimed = self.store.set(record, PUBLISHING, nx=True, ex=self.record_ttl)
        state = None if claimed else _text(self.store.get(record))
        if state is not None:
            if state == PUBLISHED or fresh:
                why = "already published" if state == PUBLISHED else "being published"
                log.info("job %s from %s: %s, duplicate removed", where.job_id, source, why)
                self._remove(processing, item)
                return
            if state == PUBLISHING and self.publisher.known(where.task_ids()):
                self._published(where, record, processing, item, source, "found at the workers")
                return
            self.store.set(record, PUBLISHING, ex=self.record_ttl)
        self._crash("claim")
        self.publisher.publish(payload, where)
        self._crash("publish")
        self._published(where, record, processing, item, source, f"published as {_chain_name(where)}")

    def _published(self, where: Route, record: str, processing: str, item: bytes, source: str, how: str) -> None:
        self.store.set(record, PUBLISHED, ex=self.record_ttl)
        self._remove(processing, item)
        log.info("job %s (%s) from %s %s", where.job_id, where.job_type, source, how)

    def _remove(self, processing: str, item: bytes) -> None:
        self.legacy.lrem(processing, 1, item)  # type: ignore[arg-type]  # redis-py types values as str

    def _crash(self, point: str) -> None:
        if self.crash_at == point:
            log.warning("test hook %s=%s: exiting now", CRASH_ENV, point)
            logging.shutdown()
            os._exit(70)

    # -- the lists ----------------------------------------------------------------
    def recover(self, source: str) -> int:
        """Re-handle what is left in ``source``'s processing list; the number handled."""
        processing = PROCESSING.format(list=source)
        handled = 0
        for item in cast("list[bytes]", self.legacy.lrange(processing, 0, -1)):
            self.handle(item, source, fresh=False)
            handled += 1
        if handled:
            log.info("%s: %d job(s) left by an earlier run handled", source, handled)
        return handled

    def move(self, source: str, *, block: bool = True) -> bytes | None:
        """Move the oldest job of ``source`` into its processing list (None when empty)."""
        processing = PROCESSING.format(list=source)
        if block:
            # a float timeout needs Redis >= 6 (BLMOVE itself needs 6.2)
            item = self.legacy.blmove(source, processing, self.block, "LEFT", "RIGHT")  # type: ignore[arg-type]
        else:
            item = self.legacy.lmove(source, processing, "LEFT", "RIGHT")
        if item is not None:
            self.legacy.expire(processing, PROCESSING_TTL)
            self._crash("move")
        return cast("bytes | None", item)

    def step(self, source: str, *, block: bool = True) -> bool:
        """Move and handle one job of ``source``; False when there was none."""
        item = self.move(source, block=block)
        if item is None:
            return False
        self.handle(item, source, fresh=True)
        self.moved += 1
        return True

    def drain(self) -> int:
        """Recover, then move every job now waiting, without blocking; the number moved."""
        before = self.moved
        for source in self.lists:
            self.recover(source)
            while self.step(source, block=False):
                pass
        return self.moved - before

    def serve(self, source: str) -> None:
        """One list's loop until :attr:`stop`: errors are logged and retried, never fatal."""
        delay, dirty = 0.0, True
        while not self.stop.is_set():
            try:
                if dirty:
                    self.legacy.expire(PROCESSING.format(list=source), PROCESSING_TTL)
                    self.recover(source)
                    dirty = False
                self.step(source)
                delay = 0.0
            except Exception as exc:
                # the job in hand (if any) stays in the processing list: handled again next round
                dirty = True
                delay = min(30.0, max(0.5, delay * 2))
                log.warning("%s: %s (%s); retrying in %.1fs", source, type(exc).__name__, _short(exc), delay)
                self.stop.wait(delay)


class Lock:
    """One bridge at a time: a key on the legacy Redis, refreshed while held."""

    def __init__(self, client: redis.Redis, ttl: float, key: str = LOCK) -> None:
        self.client, self.key = client, key
        self.ttl_ms = max(1000, int(ttl * 1000))
        self.token = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    def acquire(self, stop: threading.Event) -> bool:
        waiting = False
        while not stop.is_set():
            try:
                if self.client.set(self.key, self.token, nx=True, px=self.ttl_ms):
                    return True
            except redis.RedisError as exc:
                log.warning("legacy Redis: %s (%s); retrying", type(exc).__name__, _short(exc))
            if not waiting:
                log.info("another bridge holds %s; waiting for it", self.key)
                waiting = True
            stop.wait(1.0)
        return False

    def refresh(self) -> bool:
        return bool(self.client.eval(_REFRESH, 1, self.key, self.token, self.ttl_ms))

    def release(self) -> None:
        with contextlib.suppress(redis.RedisError):  # else it expires
            self.client.eval(_RELEASE, 1, self.key, self.token)


def run(bridge: Bridge, lock: Lock) -> int:
    """Serve every list until stopped; 0 on a clean stop, 1 when the lock was lost."""
    if not lock.acquire(bridge.stop):
        return 0
    threads = [
        threading.Thread(target=bridge.serve, args=(source,), name=f"bridge-{source}", daemon=True)
        for source in bridge.lists
    ]
    for thread in threads:
        thread.start()
    log.info("bridge ready: %s", ", ".join(bridge.lists))
    status = 0
    interval = lock.ttl_ms / 3000
    while not bridge.stop.wait(interval):
        try:
            if not lock.refresh():
                log.error("the bridge lock %s was lost (another bridge took it); stopping", lock.key)
                status = 1
                bridge.stop.set()
        except redis.RedisError as exc:
            log.warning("legacy Redis: %s (%s) while refreshing the lock", type(exc).__name__, _short(exc))
    for thread in threads:
        thread.join()
    lock.release()
    log.info("bridge stopped")
    return status


def _maybe_json(item: bytes) -> object:
    try:
        return json.loads(item)
    except ValueError:
        return None


def _text(value: Any) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def _short(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else ""


def _chain_name(where: Route) -> str:
    return f"{ENHANCE} -> {where.task}" if where.enhance else where.task


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bin/bridge", description=__doc__.split("\n")[0])
    parser.add_argument("--lists", default=",".join(LISTS), help="comma-separated legacy lists (default: %(default)s)")
    parser.add_argument("--block", type=float, default=1.0, help="seconds one BLMOVE waits (default: %(default)s)")
    parser.add_argument("--lock-ttl", type=float, default=30.0, help="seconds the bridge lock lives unrefreshed")
    parser.add_argument("--drain", action="store_true", help="move what waits now, then exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s: %(levelname)s/bridge] %(message)s")
    crash_at = os.environ.get(CRASH_ENV) or None
    lists = [name.strip() for name in args.lists.split(",") if name.strip()]
    try:
        settings = load_settings()
        if crash_at is not None and crash_at not in CRASH_POINTS:
            raise ConfigError(f"{CRASH_ENV} must be one of {', '.join(CRASH_POINTS)}; got {crash_at!r}")
        if not lists or args.block <= 0 or args.lock_ttl <= 0:
            raise ConfigError("--lists must name a list; --block and --lock-ttl must be positive")
    except ConfigError as exc:
        print(f"bin/bridge: {exc}", file=sys.stderr)
        return 2
    from ..celery import app

    legacy = connect(settings.legacy_redis, settings, socket_timeout=args.block + 30, socket_connect_timeout=10)
    store = connect(settings.redis, settings, socket_timeout=30, socket_connect_timeout=10)
    bridge = Bridge(
        legacy, store, CeleryPublisher(app), lists=lists, record_ttl=settings.idempotency_ttl,
        block=args.block, crash_at=crash_at,
    )
    lock = Lock(legacy, args.lock_ttl)

    def _stop(signum: int, _frame: object) -> None:
        log.info("%s: finishing the job in hand, then stopping", signal.Signals(signum).name)
        bridge.stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    if args.drain:
        if not lock.acquire(bridge.stop):
            return 0
        try:
            moved = bridge.drain()
        except Exception as exc:
            log.error("drain stopped: %s (%s); what was in hand stays in the processing list", type(exc).__name__, _short(exc))
            return 1
        finally:
            lock.release()
        log.info("drained: %d job(s) moved", moved)
        return 0
    return run(bridge, lock)


if __name__ == "__main__":
    raise SystemExit(main())
