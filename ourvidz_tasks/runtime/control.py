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
carries it out between jobs (:func:`~.between_jobs.serve_requests`: after every job, and
every quarter second while idle, :mod:`.between_jobs`), and ``memory_status`` lists it as pending until
then. ``memory_status`` and ``pressure_check`` answer from the ledger, so
any idle pool of a GPU reports for all of it; a worker in the middle of a
long job answers only when the job ends (ask another pool of that GPU, or
raise ``-t``).

Their names, arguments and help are :data:`~ourvidz_tasks.services.commands.COMMANDS`, declared
wherever the app is loaded (Celery's CLI checks a name in the caller's process); :func:`command`
registers each implementation here, in the worker.

The busy/idle marks and the serving itself are :mod:`.between_jobs`; :func:`install` adds the
idle timer (:class:`ServeRequests`) to an app's workers (:mod:`.signals` does it at ``worker_init``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import Celery, bootsteps

from ..contract.errors import WorkerUnavailable
from ..services.commands import command
from .between_jobs import REQUEST_TTL, serve_idle
from .estimates import DEFAULT_ESTIMATES_MB
from .ledger import Ledger, Request
from .runtime import runtime

#: the model a pool loads when none is named (the pool's first, warm model)
DEFAULT_MODEL = {"sdxl": "sdxl", "chat": "qwen_instruct", "wan": "wan"}
#: seconds between two looks at the ledger while the worker is idle
SERVE_INTERVAL = 0.25


# -- the commands ------------------------------------------------------------------


@command("memory_status")
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


@command("pressure_check")
def pressure_check(state: Any) -> dict[str, Any]:
    """Pressure level, available MB and recommendations (e.g. ``unload_chat_for_wan``)."""
    rt, ledger = _context(state)
    return {"error": rt} if ledger is None else ledger.report()


@command("model_load")
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


@command("model_unload")
def model_unload(state: Any, model: str | None = None) -> dict[str, Any]:
    """Ask this pool to unload a model (default all it holds) between jobs."""
    rt, ledger = _context(state)
    if ledger is None:
        return {"error": rt}
    if model is not None and model not in rt.models:
        return {"error": f"`model` must be one of {', '.join(rt.models)} on {rt.family}, got {model!r}"}
    return _unload(ledger, rt.family, model, "control")


@command("force_unload")
def force_unload(state: Any, target: str | None = None, model: str | None = None) -> dict[str, Any]:
    """Ask any pool on this GPU (default this one) to unload, queued work or not."""
    rt, ledger = _context(state)
    if ledger is None:
        return {"error": rt}
    return _unload(ledger, _pool(target) or rt.family, model, "force")


@command("predictive_load")
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


# -- the idle timer -----------------------------------------------------------------------


class ServeRequests(bootsteps.StartStopStep):
    """Consumer step: :func:`serve_idle` every :data:`SERVE_INTERVAL` s on the worker's timer.

    With an event loop (Redis, AMQP) the timer fires in the thread that runs
    solo jobs, so only between them; a threaded timer (and the chat pool's task threads) is
    held off by the runtime's :class:`~.runtime.JobGate`: it serves only while no job runs.
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
    """Add the idle timer to ``app``'s workers (the commands need only this import)."""
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
