"""Memory upkeep between jobs: the ledger's busy/idle marks, requests served, idle unloads, predictive loads.

A pool is busy from ``task_prerun`` (:func:`job_entered`; a job task marks itself busy right
after its ``processing`` callback, :func:`mark_busy`) to ``task_postrun`` (:func:`job_left`), and
only idle holders are asked to unload. Requests recorded by the remote-control commands
(:mod:`.control`) are carried out here, between jobs: after every job, and on the idle timer
(:func:`serve_idle`, every quarter second). The runtime's :class:`~.runtime.JobGate` keeps the
two apart: a job starts only while no upkeep runs, and upkeep waits for no job.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

from ..contract.errors import ConfigError, ModelLoadError, OutOfMemory, WorkerUnavailable
from .ledger import Ledger
from .runtime import warm_models

log = logging.getLogger(__name__)

#: seconds a load/unload request waits for its pool before it lapses
REQUEST_TTL = 600.0


class Slot(Protocol):
    """What :func:`serve_requests` needs of a model slot (:class:`~.runtime.ModelSlot`)."""

    model: Any

    def get(self, wait: float | None = None) -> Any: ...
    def unload(self) -> int: ...


def upkept(app: Any) -> Any:
    """The runtime of ``app``'s worker if it keeps a memory ledger (else None: nothing to upkeep)."""
    rt = getattr(app, "ourvidz_runtime", None)
    return rt if getattr(rt, "ledger", None) is not None else None


def job_entered(rt: Any, marks_own_start: bool) -> None:
    """``task_prerun``: wait for upkeep in flight, count the job; the first job marks the pool busy
    unless it does so itself (:func:`mark_busy`)."""
    rt.gate.enter(None if marks_own_start else lambda: _quietly(rt.ledger.set_busy, rt.family, True))


def mark_busy(rt: Any) -> None:
    """A job task's busy mark, set by the job itself right after its ``processing`` callback (the
    ledger's look at every queue is no part of dispatch); before any model work, as ever."""
    if getattr(rt, "ledger", None) is not None:
        rt.gate.if_alone(lambda: _quietly(rt.ledger.set_busy, rt.family, True))


def job_left(rt: Any) -> None:
    """``task_postrun``: the last running job ended: idle mark, requests served, predictive load."""
    rt.last_job_ended = time.monotonic()
    # the idle mark goes with the last job even while the idle timer's upkeep runs: a pool marked busy
    # is never asked to unload, and a pool growing for its job could wait on it for good
    if not rt.gate.leave(lambda: _quietly(rt.ledger.set_busy, rt.family, False)):
        return
    try:
        if _quietly(rt.ledger.has_requests, rt.family):  # one HKEYS; the full look only when asked
            _quietly(serve_requests, rt)
        if _quietly(predict, rt):  # cold with its work waiting: load now, between jobs
            _quietly(serve_requests, rt)
    finally:
        rt.gate.release()


def serve_idle(app: Any) -> None:
    """The idle timer's tick: serve requests, or release an idle on-demand model, unless a job runs."""
    rt = upkept(app)
    if rt is None or not rt.gate.claim():
        return
    try:
        if _quietly(rt.ledger.has_requests, rt.family):
            _quietly(serve_requests, rt)
        release_idle(rt)
        _quietly(predict, rt)
    finally:
        rt.gate.release()


def serve_requests(rt: Any) -> list[dict[str, Any]]:
    """Carry out the ledger's requests for this pool; call only between jobs.

    Unloads go first (they free room); a load that does not fit yet stays
    pending until it fits or lapses. Returns the requests carried out.
    """
    ledger: Ledger | None = getattr(rt, "ledger", None)
    if ledger is None:
        return []
    served = []
    for req in ledger.pending_requests(rt.family):
        slot: Slot | None = rt.models.get(req.model)
        if slot is None:
            log.warning("ledger asks %s to %s unknown model %r; dropped", rt.family, req.action, req.model)
            ledger.done(req)
            continue
        if req.action == "unload":
            log.info("unloading %s for %s (%s)", req.model, req.for_pool or "control", req.reason)
            slot.unload()
        elif slot.model is None:
            try:
                slot.get(wait=0.0)
            except WorkerUnavailable:
                continue  # not yet: the request stays until it fits or lapses
            except (ConfigError, ModelLoadError, OutOfMemory) as exc:  # OOM: it loads on first use
                log.error("requested load of %s failed: %s", req.model, exc)
        ledger.done(req)
        served.append(req.as_dict())
    return served


def predict(rt: Any) -> list[str]:
    """Predictive load, run at the end of every job and on the idle tick: a model this pool
    keeps warm is cold while work of its family waits (its queue, or a waiter of its family in
    the ledger), so ask the ledger for room now and load it between jobs once it fits (a
    ``load`` request with reason ``predict``, carried out by :func:`serve_requests`).

    Costs no Redis round trip while the pool's models are warm. Returns the models asked for.
    """
    if rt.ledger is None:
        return []
    cold = [name for name in warm_models(rt.family, rt.settings) if rt.models[name].model is None]
    if not cold or not (rt.ledger.queue_depth(rt.family) or _family_waits(rt.ledger, rt.family)):
        return []
    for name in cold:
        mb = rt.ledger.estimate(name, rt.models[name].default_mb)
        rt.ledger.want(rt.family, name, mb, ttl=REQUEST_TTL)
        rt.ledger.request("load", rt.family, name, mb, reason="predict", ttl=REQUEST_TTL)
        log.info("predictive load of %s on %s: its work waits while it is cold", name, rt.family)
    return cold


def _family_waits(ledger: Ledger, family: str) -> bool:
    """A ticket of ``family`` waits in the ledger for memory."""
    return any(t["pool"] == family for t in ledger.status().get("waiters", []))


def release_idle(rt: Any) -> int:
    """Unload the pool's models after ``idle_unload_seconds`` without a job (WAN only by default)."""
    limit = rt.settings.idle_unload_seconds.get(rt.family)
    if not limit or time.monotonic() - rt.last_job_ended < limit:
        return 0
    freed = 0
    for slot in rt.models.values():
        if slot.model is not None:
            log.info("%s idle for %ss: unloading %s", rt.family, limit, slot.name)
            freed += slot.unload()
    return freed


def _quietly(fn: Any, *args: Any) -> Any:
    """Ledger upkeep around jobs must never fail a job (Redis down: log and go on)."""
    try:
        return fn(*args)
    except Exception:
        log.exception("memory ledger upkeep (%s) failed", getattr(fn, "__name__", fn))
        return None
