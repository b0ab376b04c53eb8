"""The per-GPU memory ledger: who holds how much of one device, shared through Redis.

Every pool on a GPU (``sdxl``, ``chat``, ``wan``; one solo worker each) asks
the ledger before it loads a model and tells it when it unloads. Nothing here
touches a model: the ledger only keeps the accounts and says who should make
room; the worker acts (between jobs, see :mod:`ourvidz_tasks.runtime.control`).

Keys: :func:`ourvidz_tasks.contract.keys.ledger` ``(host, device):*`` (device ``cuda:0``, ``cpu``...), so
many GPU hosts share one Redis. Every key has a TTL, renewed while in use.

Reserving (:meth:`Ledger.reserve`) is one Lua script: reclaim expired leases,
then grant if the reservation fits the budget *and* nobody waits ahead of it.
Otherwise the caller takes a ticket and polls; tickets are served strictly
first in, first out, so a large WAN load is never starved by small ones; a held
reservation growing for its running job (:meth:`~ourvidz_tasks.runtime.runtime.ModelSlot.hold`) goes
ahead of every load (its pool is busy, never asked to unload: a load ahead of it could wait for nothing
but its memory, and both would wait until they timed out).
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

Leases (:mod:`ourvidz_tasks.runtime.leases`): a reservation expires
``lease_seconds`` after its last refresh; a heartbeat thread refreshes it, and
an expired one (a killed worker) is reclaimed by the next ledger call. Sizes
(:mod:`ourvidz_tasks.runtime.estimates`): what to reserve for a model and a job
shape, from measured weights and working memory. The Redis scripts are the
``.lua`` files of :mod:`ourvidz_tasks.runtime.lua`.
"""

from __future__ import annotations

import json
import logging
import socket
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis

from ..contract import names
from ..contract.devices import canonical_device
from ..contract.errors import WorkerUnavailable
from ..contract.keys import ledger as ledger_key
from ..contract.names import FAMILIES
from ..contract.text import as_text
from ..services import fairness
from ..services.redis_client import register_script
from . import lua
from .estimates import MeasuredSizes
from .leases import Heartbeat, Reservation
from .memprobe import default_budget

if TYPE_CHECKING:
    import torch

    from ..contract.settings import Settings

log = logging.getLogger(__name__)

#: ``used / budget`` below each bound; above the last one: ``critical``
PRESSURE = ((0.6, "low"), (0.8, "medium"), (0.95, "high"))
STATE_TTL = 24 * 3600


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


class Ledger(MeasuredSizes):
    """The accounts of one device's memory, shared by every pool on it through Redis.

    ``budget_mb``: what the pools may hold together (``OURVIDZ_VRAM_BUDGET_MB``).
    ``lease_seconds``: a reservation not refreshed for this long is reclaimed.
    ``preferred``: the pool kept resident among equals (DECISIONS.md: ``sdxl``).
    ``patience``: seconds a waiter waits before holders with queued work are asked.
    ``poll``: seconds between two tries of a waiting :meth:`reserve`.
    ``queue_depth(pool)``: jobs queued for a pool; default: the length of the
    Celery queue ``pool`` in ``store`` (the broker, when it is that Redis).
    ``slack``, ``window``: how estimates are made (:class:`~ourvidz_tasks.runtime.estimates.MeasuredSizes`).
    """

    def __init__(
        self, store: redis.Redis, host: str, device: str, budget_mb: int, *,
        lease_seconds: float = 15, pools: Sequence[str] = FAMILIES, preferred: str | None = "sdxl",
        patience: float = 30.0, poll: float = 0.05, queue_depth: Callable[[str], int] | None = None,
        slack: float = 0.0, window: int = 5,
    ) -> None:
        if budget_mb <= 0:
            raise ValueError(f"`budget_mb` must be positive, got {budget_mb}")
        if lease_seconds <= 0:
            raise ValueError(f"`lease_seconds` must be positive, got {lease_seconds}")
        self.prefix = ledger_key(host, device)
        super().__init__(store, f"{self.prefix}:sizes", slack=slack, window=window)
        self.host, self.device, self.budget_mb = host, device, int(budget_mb)
        self.lease_seconds, self.pools, self.preferred = lease_seconds, tuple(pools), preferred or ""
        self.patience, self.poll = patience, poll
        self.keys = [f"{self.prefix}:{part}" for part in lua.STATE]
        self.key = dict(zip(lua.STATE, self.keys, strict=True))
        self._queue_depth = queue_depth or self._broker_depth
        self._scripts = {name: register_script(store, lua.operation(name)) for name in lua.OPERATIONS}

    @classmethod
    def for_settings(cls, store: redis.Redis, settings: Settings, device: torch.device | str,
                     **options: Any) -> Ledger:
        """The ledger of ``device`` on this host, budget from settings (else
        :func:`~ourvidz_tasks.runtime.memprobe.default_budget`).

        Keyed by ``OURVIDZ_DEVICE`` in its one spelling (``cpu:1``, ``cuda:1``: the host's card, even
        where the process sees it renumbered), else by ``device``.
        """
        # the node's host part: pools that share a GPU share it (compose sets one OURVIDZ_HOSTNAME)
        host = settings.hostname or socket.gethostname()
        budget = settings.vram_budget_mb or default_budget(
            device, pools=len(options.get("pools", FAMILIES)), context_mb=settings.cuda_context_mb,
            margin_mb=settings.memory_margin_mb).budget_mb
        options.setdefault("lease_seconds", settings.lease_seconds)
        if settings.fair_order:  # queued work waits in the fair order too
            options.setdefault("queue_depth", lambda pool: fairness.depth(
                store, pool, names.fair_queue(pool, settings.fair_relay)))
        options.setdefault("patience", settings.memory_patience)
        options.setdefault("slack", settings.memory_slack)
        options.setdefault("window", settings.memory_window)
        return cls(store, host, canonical_device(settings.device or str(device)), budget, **options)

    @property
    def lease_ms(self) -> int:
        return int(self.lease_seconds * 1000)

    # -- reserving -------------------------------------------------------------

    def reserve(self, pool: str, model: str, mb: int, *, timeout: float,
                on_wait: Callable[[Wait], None] | None = None, token: str | None = None) -> Reservation:
        """Hold ``mb`` MB for ``model`` of ``pool``, waiting in line up to ``timeout`` seconds.

        Raises :class:`WorkerUnavailable` (retryable) when it does not fit in
        time; ``timeout=0`` tries once without queueing. ``on_wait`` is called
        at every poll while waiting (it may raise to give up). ``token``: the
        reservation it holds already, to grow (in line like any other, its own MB counted as held).
        """
        if mb < 0:
            raise ValueError(f"`mb` must be >= 0, got {mb}")
        token, ticket = token or uuid.uuid4().hex, ""
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
        return as_text(status), as_text(ticket_out), int(free), int(position or 0)

    # -- leases (what a Reservation asks) ---------------------------------------

    def refresh_lease(self, member: str, token: str, mb: int) -> int:
        """Renew ``member``'s lease: 1 renewed, 2 reinstated (it had been reclaimed), 0 held by another."""
        return int(self._op("refresh", member, token, self.lease_ms, mb))

    def release_lease(self, member: str, token: str) -> int:
        """Drop ``member``'s reservation if ``token`` still holds it; the MB released."""
        return int(self._op("release", member, token))

    def regrant(self, pool: str, model: str, mb: int, token: str) -> bool:
        """Hold ``mb`` for ``token``'s reservation instead, only if it fits now with nobody waiting."""
        return self._reserve_once(pool, model, mb, "", token, enqueue=False)[0] == "granted"

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
        return any(as_text(f).split("|", 1)[1].startswith(f"{pool}/") for f in self.redis.hkeys(self.key["requests"]))

    def done(self, request: Request) -> None:
        """Forget a request that was carried out (a release answers unloads by itself)."""
        self._op("done", request.field)

    def holders(self, pool: str | None = None) -> dict[str, int]:
        """``{"pool/model": MB}`` of live reservations (of ``pool`` only, if given)."""
        held = self._snapshot()["held"]
        return {m: mb for m, mb in held.items() if pool is None or m.split("/", 1)[0] == pool}

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


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}  # cjson writes an empty table as {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []
