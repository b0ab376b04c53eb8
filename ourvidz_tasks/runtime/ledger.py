"""The per-GPU memory ledger: who holds how much of one device, shared through Redis.

Every pool on a GPU (``sdxl``, ``chat``, ``wan``; one solo worker each) asks
the ledger before it loads a model and tells it when it unloads. Nothing here
touches a model: the ledger only keeps the accounts and says who should make
room; the worker acts (between jobs, see :mod:`ourvidz_tasks.runtime.control`).

Keys: ``ourvidz:ledger:{host}:{device}:*`` (device ``cuda:0``, ``cpu``...), so
many GPU hosts share one Redis. Every key has a TTL, renewed while in use.

Reserving (:meth:`Ledger.reserve`) is one Lua script: reclaim expired leases,
then grant if the reservation fits the budget *and* nobody waits ahead of it.
Otherwise the caller takes a ticket and polls; tickets are served strictly
first in, first out, so a large WAN load is never starved by small ones.
After ``timeout`` the ticket is withdrawn and :class:`WorkerUnavailable`
(retryable) is raised.

Making room: for the waiter at the head of the queue the script addresses
unload requests to idle holders (never a busy one, never the waiter's own
pool) until the requests cover the shortfall, least needed first:

1. *need* of a pool = depth of its Celery queue + its waiting tickets + its
   live :meth:`~Ledger.want` registrations; fewer first (AI Horde style);
2. the preferred resident (``sdxl``, DECISIONS.md) last among equals;
3. then the longest idle first.

A holder whose pool has queued work is only asked once the waiter has waited
``patience`` seconds, so switches stay rare but nothing waits forever. The
plan is re-run on every ledger call (a pool going idle, a release, a poll),
so a holder that is busy now is asked as soon as it is idle. A request lives
as long as its reason (the ticket, the want); a release that answers one
counts as a *switch* (one unload plus the load it makes room for).

Leases: a reservation expires ``lease_seconds`` after its last refresh; a
:class:`Heartbeat` thread refreshes every reservation of the process. An
expired lease (a killed worker) is reclaimed by whichever ledger call comes
next. A live holder that was reclaimed anyway (stalled past its lease) is
reinstated at its next refresh, even over the budget: the memory is really
held, and the accounts say so.

Sizes (:meth:`~Ledger.estimate`): a reservation is the model's weights,
counted exactly at load (parameter and buffer bytes, :meth:`~Ledger.record_weights`),
plus the working memory of the job shape, plus allocator slack (``slack``,
a fraction). Working memory is measured around the model call only
(:mod:`ourvidz_tasks.runtime.memprobe`) and kept as the largest of the shape's last
``window`` measurements (:meth:`~Ledger.record_work`): a recent value that
goes down again, never an all-time maximum. Before the first measurement,
the first estimate computed from the model's config (:mod:`ourvidz_tasks.models.memplan`).
"""

from __future__ import annotations

import json
import logging
import math
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis

from ..contract.devices import canonical_device
from ..contract.errors import WorkerUnavailable
from ..models import memplan
from ._ledger_lua import OPS as _OPS
from ._ledger_lua import PRELUDE as _PRELUDE
from ._ledger_lua import RECENT_SCRIPT as _RECENT_SCRIPT
from ._ledger_lua import STATE as _STATE
from .memprobe import Measurement, default_budget, probe_for

if TYPE_CHECKING:
    import torch

    from ..contract.settings import Settings

log = logging.getLogger(__name__)

MB = 2**20
POOLS = ("sdxl", "chat", "wan")
#: first estimates (MB) before anything is measured: weights from the published configs plus the
#: working memory of each model's default job shape plus slack (:mod:`ourvidz_tasks.models.memplan`)
DEFAULT_ESTIMATES_MB: dict[str, int] = {m: memplan.estimate_mb(m) for m in ("sdxl", "qwen_instruct", "qwen_base", "wan")}
#: the first estimate of a tiny test model (MB, of it working memory): measured at its first load and job
TINY_FIRST_MB, TINY_FIRST_WORK_MB = 64, 48
#: ``used / budget`` below each bound; above the last one: ``critical``
PRESSURE = ((0.6, "low"), (0.8, "medium"), (0.95, "high"))
STATE_TTL = 24 * 3600
SIZES_TTL = 30 * 24 * 3600


def first_estimate(model: str, *, tiny: bool = False, slack: float = memplan.SLACK) -> dict[str, int]:
    """``default_mb`` and ``default_work_mb`` of a model before anything is measured.

    A real model: weights from its published config plus its default job
    shape's working memory plus slack (:func:`ourvidz_tasks.models.memplan.estimate`).
    """
    if tiny or model not in memplan.sizes()["families"]:
        return {"default_mb": TINY_FIRST_MB, "default_work_mb": TINY_FIRST_WORK_MB}
    e = memplan.estimate(model, slack=slack)
    return {"default_mb": e.total_mb, "default_work_mb": e.work_mb}


def mb_of(nbytes: int) -> int:
    """Bytes as whole MB, rounded up."""
    return max(0, math.ceil(nbytes / MB))


def pressure_of(used_mb: float, budget_mb: float) -> str:
    """``low``/``medium``/``high``/``critical`` by ``used / budget`` (:data:`PRESSURE`)."""
    ratio = used_mb / budget_mb if budget_mb > 0 else 1.0
    for bound, level in PRESSURE:
        if ratio < bound:
            return level
    return "critical"


@dataclass(frozen=True)
class Request:
    """Something a pool is asked to do between jobs.

    ``action`` is ``unload`` or ``load``; ``reason`` is ``evict`` (a waiter
    needs the room), ``predict`` (queued work wants the room, :meth:`Ledger.want`),
    ``control`` or ``force`` (a remote-control command).
    """

    action: str
    pool: str
    model: str
    mb: int
    reason: str
    for_pool: str | None = None
    for_model: str | None = None
    at: float = 0.0

    @property
    def field(self) -> str:
        return f"{self.action}|{self.pool}/{self.model}"

    def as_dict(self) -> dict[str, Any]:
        return {"action": self.action, "pool": self.pool, "model": self.model, "mb": self.mb,
                "reason": self.reason, "for_pool": self.for_pool, "for_model": self.for_model, "at": self.at}

    @classmethod
    def parse(cls, raw: str | bytes) -> Request:
        r = json.loads(raw)
        return cls(action=r["action"], pool=r["pool"], model=r["model"], mb=int(r.get("mb") or 0),
                   reason=r.get("reason", "control"), for_pool=r.get("for_pool"), for_model=r.get("for_model"),
                   at=float(r.get("at", 0)) / 1000)


@dataclass(frozen=True)
class Wait:
    """What :meth:`Ledger.reserve` passes to ``on_wait`` at every poll while it waits."""

    pool: str
    model: str
    mb: int
    position: int
    free_mb: int
    waited: float


class Reservation:
    """MB of the budget held for one model of one pool; refresh its lease, release it once."""

    def __init__(self, ledger: Ledger, pool: str, model: str, mb: int, token: str, waited: float) -> None:
        self.ledger, self.pool, self.model, self.mb = ledger, pool, model, mb
        self.token, self.waited = token, waited
        self.released = False
        self._lock = threading.Lock()

    @property
    def member(self) -> str:
        return f"{self.pool}/{self.model}"

    def refresh(self) -> bool:
        """Renew the lease; False once released or when another holder took the slot."""
        with self._lock:
            if self.released:
                return False
            code = self.ledger._op("refresh", self.member, self.token, self.ledger.lease_ms, self.mb)
        if code == 2:
            log.warning("%s: lease had expired and was reclaimed; reinstated (%d MB)", self.member, self.mb)
        return bool(code)

    def resize(self, mb: int) -> bool:
        """Hold ``mb`` instead (grow only when it fits now, nobody waiting); True when done."""
        with self._lock:
            if self.released:
                return False
            status, *_ = self.ledger._reserve_once(self.pool, self.model, mb, "", self.token, enqueue=False)
            if status == "granted":
                self.mb = mb
                return True
            return False

    def release(self) -> int:
        """Give the MB back (idempotent); returns the MB released."""
        with self._lock:
            if self.released:
                return 0
            self.released = True
            return int(self.ledger._op("release", self.member, self.token))

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"Reservation({self.member!r}, {self.mb} MB{', released' if self.released else ''})"


class Ledger:
    """The accounts of one device's memory, shared by every pool on it through Redis.

    ``budget_mb``: what the pools may hold together (``OURVIDZ_VRAM_BUDGET_MB``).
    ``lease_seconds``: a reservation not refreshed for this long is reclaimed.
    ``preferred``: the pool kept resident among equals (DECISIONS.md: ``sdxl``).
    ``patience``: seconds a waiter waits before holders with queued work are asked.
    ``poll``: seconds between two tries of a waiting :meth:`reserve`.
    ``queue_depth(pool)``: jobs queued for a pool; default: the length of the
    Celery queue ``pool`` in ``store`` (the broker, when it is that Redis).
    """

    def __init__(
        self, store: redis.Redis, host: str, device: str, budget_mb: int, *,
        lease_seconds: float = 15, pools: Sequence[str] = POOLS, preferred: str | None = "sdxl",
        patience: float = 30.0, poll: float = 0.05, queue_depth: Callable[[str], int] | None = None,
        slack: float = 0.0, window: int = 5,
    ) -> None:
        if budget_mb <= 0:
            raise ValueError(f"`budget_mb` must be positive, got {budget_mb}")
        if lease_seconds <= 0:
            raise ValueError(f"`lease_seconds` must be positive, got {lease_seconds}")
        self.redis, self.host, self.device, self.budget_mb = store, host, device, int(budget_mb)
        self.lease_seconds, self.pools, self.preferred = lease_seconds, tuple(pools), preferred or ""
        self.patience, self.poll = patience, poll
        self.slack, self.window = slack, max(1, int(window))
        self.prefix = f"ourvidz:ledger:{host}:{device}"
        self.keys = [f"{self.prefix}:{name}" for name in _STATE]
        self.key = dict(zip(_STATE, self.keys, strict=True))
        self.sizes_key = f"{self.prefix}:sizes"
        self._queue_depth = queue_depth or self._broker_depth
        self._scripts = {name: store.register_script(_PRELUDE + body) for name, body in _OPS.items()}
        self._recent = store.register_script(_RECENT_SCRIPT)

    @classmethod
    def for_settings(cls, store: redis.Redis, settings: Settings, device: torch.device | str,
                     **options: Any) -> Ledger:
        """The ledger of ``device`` on this host, budget from settings (else :func:`default_budget_mb`).

        Keyed by ``OURVIDZ_DEVICE`` in its one spelling (``cpu:1``, ``cuda:1``: the host's card, even
        where the process sees it renumbered), else by ``device``.
        """
        # the node's host part: pools that share a GPU share it (compose sets one OURVIDZ_HOSTNAME)
        host = settings.hostname or socket.gethostname()
        budget = settings.vram_budget_mb or default_budget_mb(
            device, pools=len(options.get("pools", POOLS)), context_mb=settings.cuda_context_mb,
            margin_mb=settings.memory_margin_mb)
        options.setdefault("lease_seconds", settings.lease_seconds)
        options.setdefault("slack", settings.memory_slack)
        options.setdefault("window", settings.memory_window)
        return cls(store, host, canonical_device(settings.device or str(device)), budget, **options)

    @property
    def lease_ms(self) -> int:
        return int(self.lease_seconds * 1000)

    # -- reserving -------------------------------------------------------------

    def reserve(self, pool: str, model: str, mb: int, *, timeout: float,
                on_wait: Callable[[Wait], None] | None = None) -> Reservation:
        """Hold ``mb`` MB for ``model`` of ``pool``, waiting in line up to ``timeout`` seconds.

        Raises :class:`WorkerUnavailable` (retryable) when it does not fit in
        time; ``timeout=0`` tries once without queueing. ``on_wait`` is called
        at every poll while waiting (it may raise to give up).
        """
        if mb < 0:
            raise ValueError(f"`mb` must be >= 0, got {mb}")
        token, ticket = uuid.uuid4().hex, ""
        started = time.monotonic()
        try:
            while True:
                status, ticket, free, position = self._reserve_once(pool, model, mb, ticket, token,
                                                                    enqueue=timeout > 0)
                waited = time.monotonic() - started
                if status == "granted":
                    ticket = ""
                    if waited > self.poll:
                        log.info("%s/%s: %d MB granted after %.1fs", pool, model, mb, waited)
                    return Reservation(self, pool, model, mb, token, waited)
                if status == "busy" or waited >= timeout:
                    raise WorkerUnavailable(
                        f"{pool}: {mb} MB for {model} did not fit the {self.budget_mb} MB budget of "
                        f"{self.host} {self.device} within {timeout:g}s ({free} MB free, {position} waiting ahead)")
                if on_wait is not None:
                    on_wait(Wait(pool, model, mb, position, free, waited))
                time.sleep(max(0.0, min(self.poll, timeout - waited)))
        finally:
            if ticket:
                self._op("cancel", ticket, int(time.monotonic() - started >= timeout))

    def _reserve_once(self, pool: str, model: str, mb: int, ticket: str, token: str,
                      *, enqueue: bool) -> tuple[str, str, int, int]:
        status, ticket_out, free, position = self._op(
            "reserve", pool, model, int(mb), ticket, token, self.lease_ms, int(enqueue))
        return _s(status), _s(ticket_out), int(free), int(position or 0)

    def keepalive(self, interval: float | None = None,
                  on_lost: Callable[[Reservation], None] | None = None) -> Heartbeat:
        """A started :class:`Heartbeat` (default: refresh every third of the lease)."""
        return Heartbeat(interval or self.lease_seconds / 3, on_lost).start()

    # -- who does what -----------------------------------------------------------

    def set_busy(self, pool: str, busy: bool) -> None:
        """Mark ``pool`` busy (in a job: never asked to unload) or idle (since now)."""
        self._op("set_busy", pool, "busy" if busy else "idle")

    def want(self, pool: str, model: str, mb: int, *, ttl: float = 60.0) -> list[Request]:
        """Queued work will need ``model`` of ``pool``: ask idle holders nobody needs to make room.

        Lasts ``ttl`` seconds (call again to extend); returns the unload
        requests standing for it.
        """
        self._op("want", pool, model, int(mb), int(ttl * 1000))
        return [r for r in self.requests() if r.reason == "predict" and (r.for_pool, r.for_model) == (pool, model)]

    def request(self, action: str, pool: str, model: str, mb: int = 0, *,
                reason: str = "control", ttl: float = 600.0) -> bool:
        """Ask ``pool`` to ``load`` or ``unload`` ``model`` between jobs; False when already so."""
        if action not in ("load", "unload"):
            raise ValueError(f"`action` must be 'load' or 'unload', got {action!r}")
        return bool(self._op("request", action, pool, model, int(mb), reason, int(ttl * 1000)))

    def requests(self) -> list[Request]:
        """Every live request on this device."""
        return self._snapshot()["requests"]

    def pending_requests(self, pool: str) -> list[Request]:
        """What ``pool`` is asked to do, unloads first; act between jobs, then :meth:`done`."""
        mine = [r for r in self.requests() if r.pool == pool]
        return sorted(mine, key=lambda r: (r.action != "unload", r.at))

    def has_requests(self, pool: str) -> bool:
        """A cheap look (one HKEYS, no script): might ``pool`` have requests? Then :meth:`pending_requests`."""
        return any(_s(f).split("|", 1)[1].startswith(f"{pool}/") for f in self.redis.hkeys(self.key["requests"]))

    def done(self, request: Request) -> None:
        """Forget a request that was carried out (a release answers unloads by itself)."""
        self._op("done", request.field)

    def holders(self, pool: str | None = None) -> dict[str, int]:
        """``{"pool/model": MB}`` of live reservations (of ``pool`` only, if given)."""
        held = self._snapshot()["held"]
        return {m: mb for m, mb in held.items() if pool is None or m.split("/", 1)[0] == pool}

    # -- sizes -------------------------------------------------------------------

    def record_work(self, model: str, shape_key: str, mb: int) -> int:
        """One measurement of a job shape's working memory (MB above the weights).

        Returns the shape's recent value: the largest of its last ``window``
        measurements (one bad sample ages out; the value can go down).
        """
        return int(self._recent(keys=[self.sizes_key],
                                args=[f"work:{model}:{shape_key}", int(mb), self.window, SIZES_TTL]))

    record_peak = record_work  # the first name of it

    def record_resident(self, model: str, mb: int) -> None:
        """What the first call after a load left allocated (the model's caches; MB): held with the weights.

        Measured again at every load, replacing the last value.
        """
        with self.redis.pipeline() as pipe:
            pipe.hset(self.sizes_key, f"resident:{model}", max(0, int(mb)))
            pipe.expire(self.sizes_key, SIZES_TTL)
            pipe.execute()

    def record_weights(self, model: str, mb: int) -> None:
        """The model's weights as loaded (MB): parameter and buffer bytes, exact; replaces the last."""
        with self.redis.pipeline() as pipe:
            pipe.hset(self.sizes_key, f"weights:{model}", int(mb))
            pipe.expire(self.sizes_key, SIZES_TTL)
            pipe.execute()

    def sizes(self, model: str) -> dict[str, Any]:
        """What is known of ``model``: ``weights`` (MB or None), ``work`` (recent MB per shape),
        ``first`` (the first measurement per shape), ``samples`` (the last ones, newest first)."""
        raw = {_s(k): _s(v) for k, v in self.redis.hgetall(self.sizes_key).items()}
        out: dict[str, Any] = {"weights": None, "resident": 0, "work": {}, "first": {}, "samples": {}}
        if f"weights:{model}" in raw:
            out["weights"] = int(raw[f"weights:{model}"])
        out["resident"] = int(raw.get(f"resident:{model}", 0))
        for key, value in raw.items():
            kind, _, rest = key.partition(":")
            name, _, shape = rest.partition(":")
            if name != model or not shape:
                continue
            try:
                if kind == "work":
                    samples = [int(v) for v in json.loads(value)]
                    out["samples"][shape] = samples
                    out["work"][shape] = max(samples) if samples else 0
                elif kind == "first":
                    out["first"][shape] = int(value)
            except (ValueError, TypeError):  # a value another version wrote: not ours to trust
                log.warning("ledger sizes: unreadable %s, ignored", key)
        return out

    def estimate(self, model: str, default_mb: int, shape: str | None = None, *, default_work_mb: int = 0) -> int:
        """What to reserve for ``model``: weights (+ resident caches) + working memory of ``shape`` + slack (MB).

        Working memory: the shape's recent value; an unmeasured shape (or
        none given) takes the largest recent value of the model's shapes.
        Before anything is measured: ``default_mb`` (the first estimate,
        ``default_work_mb`` of it working memory); measured weights with no
        working memory yet never reserve less than that first estimate.
        """
        known = self.sizes(model)
        weights, works = known["weights"], known["work"]
        work = works.get(shape) if shape is not None and shape in works else max(works.values(), default=None)
        if weights is None and work is None:
            return default_mb
        w = (weights + known["resident"]) if weights is not None else max(0, default_mb - default_work_mb)
        total = w + (work if work is not None else default_work_mb)
        total += math.ceil(total * self.slack)
        return total if work is not None else max(default_mb, total)

    # -- reading -----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The device at a glance: pools, reserved, free, pressure, waiters, switches."""
        snap = self._snapshot()
        used = sum(snap["held"].values())
        pools: dict[str, dict[str, Any]] = {}
        for name in dict.fromkeys([*self.pools, *(m.split("/", 1)[0] for m in snap["held"])]):
            models = {m.split("/", 1)[1]: mb for m, mb in snap["held"].items() if m.split("/", 1)[0] == name}
            state = snap["pools"].get(name)
            pools[name] = {
                "loaded": bool(models), "reserved_mb": sum(models.values()), "models": models,
                "busy": state == "busy", "queue_depth": snap["depths"].get(name, 0),
                "idle_seconds": round((snap["now"] - float(state)) / 1000, 1) if state not in (None, "busy") else None,
            }
        return {
            "host": self.host, "device": self.device, "budget_mb": self.budget_mb, "reserved_mb": used,
            "free_mb": self.budget_mb - used, "pressure": pressure_of(used, self.budget_mb), "pools": pools,
            "waiters": snap["tickets"], "pending_waiters": len(snap["tickets"]),
            "wants": snap["wants"], "requests": [r.as_dict() for r in snap["requests"]],
            "switches_last_hour": snap["switches"], "counters": snap["stats"],
        }

    def report(self) -> dict[str, Any]:
        """The seeds' memory report: pressure, available MB, per-pool status, recommendations."""
        st = self.status()
        recs: list[str] = []
        for req in st["requests"]:
            if req["action"] == "unload" and req["for_pool"]:
                recs.append(f"unload_{req['pool']}_for_{req['for_pool']}")
        for name, pool in st["pools"].items():
            waiting = any(w["pool"] == name for w in st["waiters"])
            if not pool["loaded"] and pool["queue_depth"] and not waiting:
                recs.append(f"load_{name}")
        if st["pressure"] in ("medium", "high"):
            recs.append("monitor_pressure")
        elif st["pressure"] == "critical":
            recs.append("free_memory")
        if st["pending_waiters"]:
            recs.append("memory_waiters")
        return {
            "pressure_level": st["pressure"], "available_vram": st["free_mb"], "budget_mb": st["budget_mb"],
            "worker_status": {name: {"loaded": p["loaded"], "memory": p["reserved_mb"]} for name, p in st["pools"].items()},
            "recommendations": list(dict.fromkeys(recs)),
        }

    def counters(self) -> dict[str, int]:
        """Totals kept in Redis: grants, releases, waits, timeouts, switches, reclaimed..."""
        return self._snapshot()["stats"]

    def clear(self) -> None:
        """Delete every key of this device's ledger (tests, benches)."""
        self.redis.delete(*self.keys, self.sizes_key)

    # -- plumbing ----------------------------------------------------------------

    def queue_depth(self, pool: str) -> int:
        """Jobs waiting in ``pool``'s queue (0 when it can't be read)."""
        try:
            return int(self._queue_depth(pool))
        except Exception:
            return 0

    def _depths(self) -> dict[str, int]:
        out = {}
        for pool in self.pools:
            try:
                out[pool] = int(self._queue_depth(pool))
            except Exception as exc:  # a broker hiccup must not stop the accounts
                log.warning("queue depth of %s unavailable: %s", pool, type(exc).__name__)
                out[pool] = 0
        return out

    def _broker_depth(self, pool: str) -> int:
        # kombu's Redis transport: list ``pool``, plus ``pool\\x06\\x16N`` per priority step
        with self.redis.pipeline(transaction=False) as pipe:
            for suffix in ("", "\x06\x163", "\x06\x166", "\x06\x169"):
                pipe.llen(pool + suffix)
            return sum(pipe.execute())

    def _op(self, name: str, *args: Any, depths: Mapping[str, int] | None = None) -> Any:
        if depths is None:
            depths = {} if name in ("refresh", "done", "request") else self._depths()
        common: list[Any] = [self.budget_mb, self.preferred, json.dumps(depths), int(self.patience * 1000), STATE_TTL]
        return self._scripts[name](keys=self.keys, args=[*common, *args])

    def _snapshot(self) -> dict[str, Any]:
        depths = self._depths()
        snap = json.loads(self._op("snapshot", depths=depths))
        return {
            "now": snap["now"], "depths": depths,
            "held": {m: int(mb) for m, mb in _obj(snap["held"]).items()},
            "pools": _obj(snap["pools"]),
            "tickets": [{"pool": t["pool"], "model": t["model"], "mb": t["mb"], "position": i,
                         "waited_seconds": round((snap["now"] - t["at"]) / 1000, 1)}
                        for i, t in enumerate(_list(snap["tickets"]))],
            "wants": {m: int(mb) for m, mb in _obj(snap["wants"]).items()},
            "requests": sorted((Request.parse(v) for v in _obj(snap["requests"]).values()), key=lambda r: r.at),
            "stats": {k: int(v) for k, v in _obj(snap["stats"]).items()},
            "switches": int(snap["switches"]),
        }


class Heartbeat:
    """Refreshes the leases of the reservations it holds, from a daemon thread.

    ``on_lost(reservation)`` is called when a reservation's slot was taken by
    another holder (its refresh returned False while not released).
    """

    def __init__(self, interval: float, on_lost: Callable[[Reservation], None] | None = None) -> None:
        if interval <= 0:
            raise ValueError(f"`interval` must be positive, got {interval}")
        self.interval, self.on_lost = interval, on_lost
        self._held: set[Reservation] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, reservation: Reservation) -> None:
        with self._lock:
            self._held.add(reservation)

    def discard(self, reservation: Reservation) -> None:
        with self._lock:
            self._held.discard(reservation)

    def beat(self) -> None:
        """One round of refreshes (the thread calls it every ``interval``)."""
        with self._lock:
            held = list(self._held)
        for res in held:
            try:
                ok = res.refresh()
            except redis.RedisError as exc:
                log.warning("lease refresh of %s failed: %s", res.member, type(exc).__name__)
                continue
            if res.released:
                self.discard(res)
            elif not ok:
                log.error("%s: reservation lost to another holder", res.member)
                self.discard(res)
                if self.on_lost is not None:
                    self.on_lost(res)

    def start(self) -> Heartbeat:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ledger-heartbeat", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat()


# -- measuring -------------------------------------------------------------------


@contextmanager
def measure_peak(device: torch.device | str | None = None) -> Iterator[Measurement]:
    """Working memory of the block with the probe of ``device``'s kind (:mod:`ourvidz_tasks.runtime.memprobe`)."""
    with probe_for(device if device is not None else "cpu").measure() as measurement:
        yield measurement


def default_budget_mb(device: torch.device | str, *, pools: int = len(POOLS), context_mb: int = 768,
                      margin_mb: int = 1024) -> int:
    """No ``OURVIDZ_VRAM_BUDGET_MB``: the card minus one CUDA context per pool and a safety margin
    (on CPU: the machine's RAM minus the margin)."""
    return default_budget(device, pools=pools, context_mb=context_mb, margin_mb=margin_mb).budget_mb


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}  # cjson writes an empty table as {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []
