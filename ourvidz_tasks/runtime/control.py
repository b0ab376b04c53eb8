"""Remote control of GPU memory: ``celery -A ourvidz_tasks inspect memory_status``.

Commands (``-d chat@host`` names one worker; without it every worker answers
for its own GPU)::

    inspect memory_status                     the GPU's ledger: pools, reserved/free MB, pressure,
                                              waiters, pending requests, switches (+ this worker's slots)
    inspect pressure_check                    pressure level and recommendations (the seeds' report)
    control model_load [model]                this pool: load ``model`` (default its first) when it fits
    control model_unload [model]              this pool: unload ``model`` (default all it holds)
    control force_unload <pool> [model]       any pool on this GPU: unload, queued work or not
    control predictive_load <pool> [model]    ask idle, unneeded holders to make room for a cold
                                              model now, and have ``pool`` load it when it fits

Why requests: a solo worker (``--pool solo``) runs remote-control commands
in the thread that runs its jobs, so only between jobs; a command that
loaded a model itself would hold its reply far past the caller's timeout,
and one pool cannot touch another pool's models at all. So the commands
that change memory only record a request in the ledger (Redis) and reply at
once with ``{"ok": ..., "requests": [...]}``. The pool the request names
carries it out between jobs (:func:`serve_requests`: after every job, and
every quarter second while idle), and ``memory_status`` lists it as pending until
then. ``memory_status`` and ``pressure_check`` answer from the ledger, so
any idle pool of a GPU reports for all of it; a worker in the middle of a
long job answers only when the job ends (ask another pool of that GPU, or
raise ``-t``).

The same hooks keep the ledger's busy/idle marks: a pool is busy from
``task_prerun`` to ``task_postrun``, and only idle holders are asked to
unload. :func:`install` adds the idle timer to an app.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from celery import Celery, bootsteps, signals
from celery.worker.control import control_command, inspect_command

from ..contract.errors import ConfigError, ModelLoadError, OutOfMemory, WorkerUnavailable
from .ledger import DEFAULT_ESTIMATES_MB, Ledger, Request
from .worker import runtime, warm_models

log = logging.getLogger(__name__)

#: the model a pool loads when none is named (the pool's first, warm model)
DEFAULT_MODEL = {"sdxl": "sdxl", "chat": "qwen_instruct", "wan": "wan"}
#: seconds a load/unload request waits for its pool before it lapses
REQUEST_TTL = 600.0
#: seconds between two looks at the ledger while the worker is idle
SERVE_INTERVAL = 0.25


class Slot(Protocol):
    """What :func:`serve_requests` needs of a model slot (``worker.ModelSlot``)."""

    model: Any

    def get(self, wait: float | None = None) -> Any: ...
    def unload(self) -> int: ...


# -- the commands ------------------------------------------------------------------


@inspect_command()
def memory_status(state: Any) -> dict[str, Any]:
    """The GPU's memory ledger: pools, reserved and free MB, pressure, waiters, requests."""
    rt, ledger = _context(state)
    if ledger is None:
        return {"error": rt}
    st = ledger.status()
    st["vram_usage"] = {"total": st["budget_mb"], "used": st["reserved_mb"], "free": st["free_mb"],
                        "pressure": st["pressure"]}
    st["workers"] = {f"{name}_worker": "loaded" if p["loaded"] else "unloaded" for name, p in st["pools"].items()}
    st["worker"] = {"node": rt.worker_id, "pool": rt.family,
                    "models": {name: slot.model is not None for name, slot in rt.models.items()}}
    return st


@inspect_command()
def pressure_check(state: Any) -> dict[str, Any]:
    """Pressure level, available MB and recommendations (e.g. ``unload_chat_for_wan``)."""
    rt, ledger = _context(state)
    return {"error": rt} if ledger is None else ledger.report()


@control_command(args=[("model", str)], signature="[model]")
def model_load(state: Any, model: str | None = None) -> dict[str, Any]:
    """Ask this pool to load a model (default its first) between jobs, when it fits."""
    rt, ledger = _context(state)
    if ledger is None:
        return {"error": rt}
    model = model or next(iter(rt.models))
    if model not in rt.models:
        return {"error": f"`model` must be one of {', '.join(rt.models)} on {rt.family}, got {model!r}"}
    if rt.models[model].model is not None:
        return {"ok": f"{model} is already loaded"}
    mb = _estimate(ledger, rt, model)
    ledger.request("load", rt.family, model, mb, ttl=REQUEST_TTL)
    return _requested(ledger, f"load of {model} ({mb} MB) requested", lambda r: r.pool == rt.family)


@control_command(args=[("model", str)], signature="[model]")
def model_unload(state: Any, model: str | None = None) -> dict[str, Any]:
    """Ask this pool to unload a model (default all it holds) between jobs."""
    rt, ledger = _context(state)
    if ledger is None:
        return {"error": rt}
    if model is not None and model not in rt.models:
        return {"error": f"`model` must be one of {', '.join(rt.models)} on {rt.family}, got {model!r}"}
    return _unload(ledger, rt.family, model, "control")


@control_command(args=[("target", str), ("model", str)], signature="<pool> [model]")
def force_unload(state: Any, target: str | None = None, model: str | None = None) -> dict[str, Any]:
    """Ask any pool on this GPU (default this one) to unload, queued work or not."""
    rt, ledger = _context(state)
    if ledger is None:
        return {"error": rt}
    return _unload(ledger, _pool(target) or rt.family, model, "force")


@control_command(args=[("target", str), ("model", str), ("mb", int)], signature="<pool> [model] [mb]")
def predictive_load(state: Any, target: str | None = None, model: str | None = None,
                    mb: int | None = None) -> dict[str, Any]:
    """Make room ahead of queued work for a cold model; its pool loads it between jobs."""
    rt, ledger = _context(state)
    if ledger is None:
        return {"error": rt}
    pool = _pool(target) or rt.family
    if model is None:
        model = next(iter(rt.models)) if pool == rt.family else DEFAULT_MODEL.get(pool)
    if model is None:
        return {"error": f"`model` is needed for pool {pool!r} (known pools: {', '.join(DEFAULT_MODEL)})"}
    if f"{pool}/{model}" in ledger.holders(pool):
        return {"ok": f"{model} of {pool} is already loaded"}
    mb = int(mb) if mb is not None else _estimate(ledger, rt, model)
    ledger.want(pool, model, mb, ttl=REQUEST_TTL)
    ledger.request("load", pool, model, mb, reason="predict", ttl=REQUEST_TTL)
    return _requested(ledger, f"room for {model} of {pool} ({mb} MB) requested; {pool} loads it when it fits",
                      lambda r: r.pool == pool or (r.for_pool, r.for_model) == (pool, model))


# -- carrying requests out between jobs -----------------------------------------------


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


#: jobs running in this process (the chat pool runs several at once, in threads) and whether a
#: serve_requests is in flight; a job starts only when none is, and serving waits for no job
_jobs = threading.Condition()
_depth = 0
_serving = False


@signals.task_prerun.connect
def _job_started(sender: Any = None, **_: Any) -> None:
    global _depth
    rt = _runtime_of(sender)
    if rt is None:
        return
    with _jobs:
        _jobs.wait_for(lambda: not _serving)  # a serve_requests in flight on a timer thread
        _depth += 1
        if _depth == 1 and not getattr(sender, "marks_own_start", False):
            _quietly(rt.ledger.set_busy, rt.family, True)


def job_started(app: Any) -> None:
    """A job task's busy mark, set by the job itself right after its ``processing`` callback (the
    ledger's look at every queue is no part of dispatch); before any model work, as ever."""
    rt = getattr(app, "ourvidz_runtime", None)
    if rt is not None and getattr(rt, "ledger", None) is not None:
        with _jobs:
            if _depth == 1:
                _quietly(rt.ledger.set_busy, rt.family, True)


@signals.task_postrun.connect
def _job_ended(sender: Any = None, **_: Any) -> None:
    global _depth
    rt = _runtime_of(sender)
    if rt is None:
        return
    with _jobs:
        _depth = max(0, _depth - 1)
        rt.last_job_ended = time.monotonic()
        if _depth or not _claim_serving():
            return
    try:
        _quietly(rt.ledger.set_busy, rt.family, False)
        if _quietly(rt.ledger.has_requests, rt.family):  # one HKEYS; the full look only when asked
            _quietly(serve_requests, rt)
        if _quietly(predict, rt):  # cold with its work waiting: load now, between jobs
            _quietly(serve_requests, rt)
    finally:
        _end_serving()


def _claim_serving() -> bool:
    """With ``_jobs`` held: mark a serve in flight (False if one already is)."""
    global _serving
    if _serving:
        return False
    _serving = True
    return True


def _end_serving() -> None:
    global _serving
    with _jobs:
        _serving = False
        _jobs.notify_all()


def serve_idle(app: Celery) -> None:
    """The idle timer's tick: serve requests, or release an idle on-demand model, unless a job runs."""
    rt: Any = getattr(app, "ourvidz_runtime", None)
    ledger = _own_ledger(app)
    if ledger is None:
        return
    with _jobs:
        if _depth or not _claim_serving():
            return
    try:
        if _quietly(ledger.has_requests, rt.family):
            _quietly(serve_requests, rt)
        release_idle(rt)
        _quietly(predict, rt)
    finally:
        _end_serving()


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


class ServeRequests(bootsteps.StartStopStep):
    """Consumer step: :func:`serve_idle` every :data:`SERVE_INTERVAL` s on the worker's timer.

    With an event loop (Redis, AMQP) the timer fires in the thread that runs
    solo jobs, so only between them; a threaded timer (and the chat pool's task threads) is
    held off by ``_jobs``: it serves only while no job runs.
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.tref: Any = None

    def start(self, parent: Any) -> None:
        self.tref = parent.timer.call_repeatedly(SERVE_INTERVAL, serve_idle, (parent.app,), priority=10)

    def stop(self, parent: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None

    shutdown = stop


def install(app: Celery) -> None:
    """Add the idle timer to ``app``'s workers (the commands and hooks need only this import)."""
    app.steps["consumer"].add(ServeRequests)


# -- helpers ---------------------------------------------------------------------------


def _context(state: Any) -> tuple[Any, Ledger | None]:
    """``(runtime, ledger)``, or ``(reason, None)`` when this worker has none."""
    try:
        rt = runtime(state.consumer.app)
    except WorkerUnavailable as exc:
        return exc.message, None
    ledger = getattr(rt, "ledger", None)
    if ledger is None:
        return f"{rt.worker_id} keeps no memory ledger", None
    return rt, ledger


def _own_ledger(app: Any) -> Ledger | None:
    return getattr(getattr(app, "ourvidz_runtime", None), "ledger", None)


def _runtime_of(task: Any) -> Any:
    """The runtime of the worker running ``task``, if it keeps a ledger."""
    rt = getattr(getattr(task, "app", None), "ourvidz_runtime", None)
    return rt if getattr(rt, "ledger", None) is not None else None


def _pool(target: str | None) -> str | None:
    return target.removesuffix("_worker") if target else None


def _estimate(ledger: Ledger, rt: Any, model: str) -> int:
    slot = rt.models.get(model)
    default = getattr(slot, "default_mb", None) or DEFAULT_ESTIMATES_MB.get(model, 0)
    return ledger.estimate(model, default)


def _unload(ledger: Ledger, pool: str, model: str | None, reason: str) -> dict[str, Any]:
    held = [m.split("/", 1)[1] for m in ledger.holders(pool)]
    models = [model] if model is not None else held
    asked = [m for m in models if ledger.request("unload", pool, m, reason=reason, ttl=REQUEST_TTL)]
    if not asked:
        return {"ok": f"nothing to unload: {pool} holds {', '.join(held) or 'nothing'}"}
    return _requested(ledger, f"unload of {', '.join(asked)} on {pool} requested", lambda r: r.pool == pool)


def _requested(ledger: Ledger, what: str, keep: Callable[[Request], bool]) -> dict[str, Any]:
    reqs = [r.as_dict() for r in ledger.requests() if keep(r)]
    return {"ok": f"{what}; carried out between jobs", "requests": reqs}


def _quietly(fn: Any, *args: Any) -> Any:
    """Ledger upkeep around jobs must never fail a job (Redis down: log and go on)."""
    try:
        return fn(*args)
    except Exception:
        log.exception("memory ledger upkeep (%s) failed", getattr(fn, "__name__", fn))
        return None
