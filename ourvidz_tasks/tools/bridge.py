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
   ``sdxl_queue`` too); see :mod:`.routing`;
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

Plug-ins (``OURVIDZ_BRIDGE_PLUGINS``, ``module:callable``) are called once
with the :class:`Bridge` at start; they may append :data:`StepHook` callables
to :attr:`Bridge.step_hooks`, called after each of the steps ``move``,
``claim`` and ``publish`` (a tracer; the tests' crash between steps).
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
from collections.abc import Callable, Sequence
from typing import cast

import redis

from ..contract import keys
from ..contract.errors import ConfigError
from ..contract.jobs import usable_id
from ..contract.settings import load_settings
from ..contract.text import as_text
from ..services.backoff import Backoff
from ..services.guard import DeadLetters
from ..services.plugins import import_callable
from ..services.redis_client import connect
from .routing import CeleryPublisher, Publisher, Route, Unroutable, route

log = logging.getLogger("ourvidz_tasks.tools.bridge")

LISTS = ("sdxl_queue", "wan_queue")
#: a processing list outlives any outage of the bridge; refreshed on every move
PROCESSING_TTL = 30 * 24 * 3600
PUBLISHING, PUBLISHED = "publishing", "published"
#: the steps after which :attr:`Bridge.step_hooks` are called, in order
STEPS = ("move", "claim", "publish")
#: called with the step just done (one of :data:`STEPS`); may raise or end the process
StepHook = Callable[[str], None]

_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"
_REFRESH = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end"
)


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
        step_hooks: Sequence[StepHook] = (),
    ) -> None:
        self.legacy, self.store, self.publisher = legacy, store, publisher
        self.lists = tuple(lists)
        self.record_ttl = record_ttl
        self.block = block
        #: see :data:`StepHook`; plug-ins append to it
        self.step_hooks: list[StepHook] = list(step_hooks)
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
        processing = keys.bridge_processing(source)
        try:
            payload = json.loads(item)
            where = route(payload)
        except (ValueError, UnicodeDecodeError) as exc:
            reason = str(exc) if isinstance(exc, Unroutable) else f"not JSON: {_short(exc)}"
            self.dead.push(reason, raw=item, queue=source, job_id=usable_id(_maybe_json(item)))
            self._remove(processing, item)
            return
        record = keys.bridge_record(where.job_id)
        claimed = self.store.set(record, PUBLISHING, nx=True, ex=self.record_ttl)
        found = None if claimed else self.store.get(record)
        state = None if found is None else as_text(found)
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
        self._stepped("claim")
        self.publisher.publish(payload, where)
        self._stepped("publish")
        self._published(where, record, processing, item, source, f"published as {where.chain_name()}")

    def _published(self, where: Route, record: str, processing: str, item: bytes, source: str, how: str) -> None:
        self.store.set(record, PUBLISHED, ex=self.record_ttl)
        self._remove(processing, item)
        log.info("job %s (%s) from %s %s", where.job_id, where.job_type, source, how)

    def _remove(self, processing: str, item: bytes) -> None:
        self.legacy.lrem(processing, 1, item)  # type: ignore[arg-type]  # redis-py types values as str

    def _stepped(self, step: str) -> None:
        for hook in self.step_hooks:
            hook(step)

    # -- the lists ----------------------------------------------------------------
    def recover(self, source: str) -> int:
        """Re-handle what is left in ``source``'s processing list; the number handled."""
        processing = keys.bridge_processing(source)
        handled = 0
        for item in cast("list[bytes]", self.legacy.lrange(processing, 0, -1)):
            self.handle(item, source, fresh=False)
            handled += 1
        if handled:
            log.info("%s: %d job(s) left by an earlier run handled", source, handled)
        return handled

    def move(self, source: str, *, block: bool = True) -> bytes | None:
        """Move the oldest job of ``source`` into its processing list (None when empty)."""
        processing = keys.bridge_processing(source)
        if block:
            # a float timeout needs Redis >= 6 (BLMOVE itself needs 6.2)
            item = self.legacy.blmove(source, processing, self.block, "LEFT", "RIGHT")  # type: ignore[arg-type]
        else:
            item = self.legacy.lmove(source, processing, "LEFT", "RIGHT")
        if item is not None:
            self.legacy.expire(processing, PROCESSING_TTL)
            self._stepped("move")
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
        pauses, dirty = Backoff(0.5, 30.0), True
        while not self.stop.is_set():
            try:
                if dirty:
                    self.legacy.expire(keys.bridge_processing(source), PROCESSING_TTL)
                    self.recover(source)
                    dirty = False
                self.step(source)
                pauses.reset()
            except Exception as exc:
                # the job in hand (if any) stays in the processing list: handled again next round
                dirty = True
                delay = pauses.next()
                log.warning("%s: %s (%s); retrying in %.1fs", source, type(exc).__name__, _short(exc), delay)
                self.stop.wait(delay)


class Lock:
    """One bridge at a time: a key on the legacy Redis, refreshed while held."""

    def __init__(self, client: redis.Redis, ttl: float, key: str = keys.BRIDGE_LOCK) -> None:
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


def drain(bridge: Bridge, lock: Lock) -> int:
    """``--drain``: move what waits now under the lock, then exit (0, or 1 when a move failed)."""
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


def load_plugins(paths: Sequence[str], bridge: Bridge) -> None:
    """Call each ``module:callable`` of ``OURVIDZ_BRIDGE_PLUGINS`` with the bridge (a bad path: ConfigError)."""
    for path in paths:
        import_callable(path, "OURVIDZ_BRIDGE_PLUGINS")(bridge)


def _maybe_json(item: bytes) -> object:
    try:
        return json.loads(item)
    except ValueError:
        return None


def _short(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bin/bridge", description=__doc__.split("\n")[0])
    parser.add_argument("--lists", default=",".join(LISTS), help="comma-separated legacy lists (default: %(default)s)")
    parser.add_argument("--block", type=float, default=1.0, help="seconds one BLMOVE waits (default: %(default)s)")
    parser.add_argument("--lock-ttl", type=float, default=30.0, help="seconds the bridge lock lives unrefreshed")
    parser.add_argument("--drain", action="store_true", help="move what waits now, then exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s: %(levelname)s/bridge] %(message)s")
    lists = [name.strip() for name in args.lists.split(",") if name.strip()]
    try:
        settings = load_settings()
        if not lists or args.block <= 0 or args.lock_ttl <= 0:
            raise ConfigError("--lists must name a list; --block and --lock-ttl must be positive")
        from ..celery import app

        legacy = connect(settings.legacy_redis, settings, socket_timeout=args.block + 30, socket_connect_timeout=10)
        store = connect(settings.redis, settings, socket_timeout=30, socket_connect_timeout=10)
        bridge = Bridge(legacy, store, CeleryPublisher(app), lists=lists, record_ttl=settings.idempotency_ttl,
                        block=args.block)
        load_plugins(settings.bridge_plugins, bridge)
    except ConfigError as exc:
        print(f"bin/bridge: {exc}", file=sys.stderr)
        return 2
    lock = Lock(legacy, args.lock_ttl)

    def _stop(signum: int, _frame: object) -> None:
        log.info("%s: finishing the job in hand, then stopping", signal.Signals(signum).name)
        bridge.stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    return drain(bridge, lock) if args.drain else run(bridge, lock)


if __name__ == "__main__":
    raise SystemExit(main())
