"""The worker's resources, built once at start and handed to every job.

``celeryd_after_setup`` (logging is configured, nothing is consumed yet)
builds the :class:`Runtime` of the pool's family, loads its model (warmup)
and attaches it to the app; ``worker_shutdown`` unloads and closes it. Tasks
reach it through :func:`runtime`. The family is the queue the worker
consumes (``bin/worker sdxl`` consumes ``sdxl``).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import redis
from celery import Celery, signals

from . import events, metrics
from .delivery import Delivery, OutboxCallbacks
from .errors import ConfigError, ModelLoadError, WorkerUnavailable
from .fetch import ReferenceFetcher
from .guard import DeadLetters, hooks
from .jobs import FAMILY_OF_TYPE, usable_id
from .memory import DEFAULT_ESTIMATES_MB, Heartbeat, Ledger, Reservation, mb_of
from .policy import PromptPolicy, load_policy
from .recovery import Recovery
from .redact import install_log_filter
from .settings import Settings, load_settings

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

FAMILIES = ("sdxl", "chat", "wan")
#: the ledger's first estimate of a tiny model (the real ones are measured after loading)
TINY_ESTIMATE_MB = 1
LOADS_TTL = 7 * 24 * 3600


class Loaded(Protocol):
    """What every family's model object offers."""

    def nbytes(self) -> int: ...
    def unload(self) -> int: ...


class ModelSlot:
    """One model of a pool: reserved in the GPU ledger, loaded, counted, unloadable.

    Loading first reserves the model's estimated memory in the per-GPU
    ledger (waiting in FIFO order, ``WORKER_UNAVAILABLE`` after ``wait``
    seconds); the reservation is kept alive by the pool's heartbeat and
    released when the model is unloaded.
    """

    def __init__(self, name: str, loader: Callable[[], Loaded], on_load: Callable[[str, float], None], *,
                 pool: str, ledger: Ledger | None = None, heartbeat: Heartbeat | None = None,
                 default_mb: int = 0, wait: float = 600.0) -> None:
        self.name, self.pool = name, pool
        self._loader = loader
        self._on_load = on_load
        self.ledger, self.heartbeat = ledger, heartbeat
        self.default_mb, self.wait = default_mb, wait
        self.reservation: Reservation | None = None
        self.model: Loaded | None = None
        self.loads = 0

    def get(self, wait: float | None = None) -> Any:
        if self.model is not None:
            return self.model
        if self.ledger is not None:
            mb = self.ledger.estimate(self.name, self.default_mb)
            self.reservation = self.ledger.reserve(self.pool, self.name, mb, timeout=self.wait if wait is None else wait)
        started = time.perf_counter()
        try:
            self.model = self._loader()
        except (ConfigError, ModelLoadError):
            self._release()
            raise
        except Exception as exc:
            self._release()
            raise ModelLoadError(f"{self.name} failed to load: {type(exc).__name__}") from exc
        self.loads += 1
        seconds = time.perf_counter() - started
        self._on_load(self.name, seconds)
        nbytes = self.model.nbytes()
        events.model_loaded.send(sender=self.name, model=self.name, seconds=seconds, nbytes=nbytes)
        if self.ledger is not None and self.reservation is not None:
            self.ledger.record_weights(self.name, mb_of(nbytes))
            self.reservation.resize(self.ledger.estimate(self.name, self.default_mb))  # measured, not guessed
            if self.heartbeat is not None:
                self.heartbeat.add(self.reservation)
        return self.model

    def unload(self) -> int:
        if self.model is None:
            return 0
        freed = self.model.unload()
        self.model = None
        self._release()
        events.model_unloaded.send(sender=self.name, model=self.name, freed_bytes=freed)
        log.info("%s unloaded, %.1f MB freed", self.name, freed / 2**20)
        return freed

    def _release(self) -> None:
        if self.reservation is not None:
            if self.heartbeat is not None:
                self.heartbeat.discard(self.reservation)
            self.reservation.release()
            self.reservation = None


@dataclass
class Runtime:
    """Resources of one worker process; built once, passed to every job."""

    settings: Settings
    family: str
    worker_id: str
    device: torch.device
    redis: redis.Redis
    delivery: Delivery
    fetcher: ReferenceFetcher
    policy: PromptPolicy
    dead: DeadLetters
    recovery: Recovery | None = None
    ledger: Ledger | None = None
    heartbeat: Heartbeat | None = None
    models: dict[str, ModelSlot] = field(default_factory=dict)
    #: the models the current job used (peak memory is attributed to them)
    used: set[str] = field(default_factory=set)
    #: monotonic time the last job ended (drives the idle unload)
    last_job_ended: float = field(default_factory=time.monotonic)

    def model(self, name: str) -> Any:
        self.used.add(name)
        return self.models[name].get()

    def record_load(self, name: str, seconds: float) -> None:
        log.info("%s loaded in %.2fs on %s", name, seconds, self.device)
        key = f"ourvidz:loads:{self.worker_id}"
        with self.redis.pipeline() as pipe:
            pipe.hincrby(key, name, 1)
            pipe.expire(key, LOADS_TTL)
            pipe.execute()

    def close(self) -> None:
        if self.recovery is not None:
            self.recovery.stop()
        for slot in self.models.values():
            slot.unload()
        if self.heartbeat is not None:
            self.heartbeat.stop()
        self.delivery.close()
        self.fetcher.close()


def node_name(family: str, settings: Settings) -> str:
    """``{family}@{host}``, or ``{family}.gpuN@{host}`` on ``cuda:N`` with N > 0."""
    host = settings.hostname or socket.gethostname()
    device = settings.device or ""
    index = int(device.split(":")[1]) if device.startswith("cuda:") else 0
    return f"{family}.gpu{index}@{host}" if index > 0 else f"{family}@{host}"


def _loaders(family: str, settings: Settings, device: torch.device) -> dict[str, Callable[[], Loaded]]:
    if family == "sdxl":
        from .models.sdxl import load_sdxl

        return {"sdxl": lambda: load_sdxl(settings, device)}
    if family == "wan":
        from .models.wan import load_wan

        return {"wan": lambda: load_wan(settings, device)}
    from .models.qwen import load_qwen

    return {
        "qwen_instruct": lambda: load_qwen(settings, "qwen_instruct", device),
        "qwen_base": lambda: load_qwen(settings, "qwen_base", device),
    }


def warm_models(family: str, settings: Settings) -> list[str]:
    """The models a pool loads at start (the others load on first use)."""
    if family == "chat":
        return ["qwen_instruct", "qwen_base"] if settings.qwen_base_load == "start" else ["qwen_instruct"]
    return [family]


def build_runtime(app: Celery, family: str, worker_id: str, settings: Settings | None = None) -> Runtime:
    """Everything a pool needs, built once: clients, policy, model slots."""
    import torch

    from .models import resolve_device

    settings = settings or load_settings()
    threads = settings.torch_threads or max(1, (os.cpu_count() or 1) // len(FAMILIES))
    torch.set_num_threads(threads)
    device = resolve_device(settings.device)
    store = redis.Redis.from_url(settings.redis)
    dead = DeadLetters(store)
    runtime = Runtime(
        settings=settings, family=family, worker_id=worker_id, device=device, redis=store,
        delivery=Delivery(settings, worker_id, store,
                          transport=OutboxCallbacks(app) if settings.callbacks == "outbox" else None),
        fetcher=ReferenceFetcher(settings),
        policy=load_policy(settings.prompt_policy), dead=dead,
    )
    if settings.broker_is_redis:
        runtime.recovery = Recovery(
            redis.Redis.from_url(settings.broker_url), worker_id,
            lease_seconds=settings.lease_seconds, owner_ttl=settings.visibility_timeout,
        )
    runtime.ledger = Ledger.for_settings(store, settings, device)
    runtime.heartbeat = runtime.ledger.keepalive()

    def default_mb(name: str) -> int:
        return TINY_ESTIMATE_MB if settings.model_source == "tiny" else DEFAULT_ESTIMATES_MB[name]

    runtime.models = {
        name: ModelSlot(name, loader, runtime.record_load, pool=family, ledger=runtime.ledger,
                        heartbeat=runtime.heartbeat, default_mb=default_mb(name), wait=settings.memory_wait)
        for name, loader in _loaders(family, settings, device).items()
    }
    hooks.dead = dead
    hooks.raw_job = lambda job: republish_raw(app, job)
    return runtime


def republish_raw(app: Celery, job: dict[str, Any]) -> bool:
    """Publish a raw job (legacy format) as its proper task; False if it can't be routed."""
    job_id = usable_id(job)
    family = FAMILY_OF_TYPE.get(str(job.get("type") or job.get("job_type")))
    if job_id is None or family is None:
        return False
    app.send_task(f"ourvidz.{family}.generate", args=[job], argsrepr=f"({job_id!r},)", kwargsrepr="{}")
    return True


def runtime(app: Celery) -> Runtime:
    """The running worker's :class:`Runtime`."""
    rt: Runtime | None = getattr(app, "ourvidz_runtime", None)
    if rt is None:
        raise WorkerUnavailable("this process is not a warmed-up ourvidz worker")
    return rt


@signals.celeryd_after_setup.connect
def _warmup(sender: str, instance: Any, **_: Any) -> None:
    app: Celery = instance.app
    install_log_filter()
    queues = sorted(app.amqp.queues.consume_from or {})
    families = [q for q in queues if q in FAMILIES]
    if len(families) != 1:
        if queues != ["outbox"]:
                log.warning("worker %s consumes %s: no model family to warm up", sender, queues)
        return
    family = families[0]
    rt = build_runtime(app, family, sender)
    metrics.start(rt.settings, family)  # before the warm loads, so they are counted
    try:
        for name in warm_models(family, rt.settings):
            try:  # SDXL waits to be resident; the others load now only if they fit
                rt.models[name].get(wait=None if family == "sdxl" else 0.0)
            except WorkerUnavailable:
                log.info("%s: no GPU memory free at start; it loads on first use", name)
    except (ConfigError, ModelLoadError) as exc:
        log.critical("warmup failed: %s", exc)
        raise SystemExit(3) from None
    app.ourvidz_runtime = rt  # type: ignore[attr-defined]
    if rt.recovery is not None:
        rt.recovery.start()
    log.info("%s ready: %s on %s", sender, ", ".join(warm_models(family, rt.settings)), rt.device)


@signals.task_received.connect
def _received(sender: Any = None, request: Any = None, **_: Any) -> None:
    """Own every message this worker holds, so a crash hands it back quickly (pools and the outbox)."""
    app = getattr(sender, "app", None)
    rt = getattr(app, "ourvidz_runtime", None) or getattr(app, "ourvidz_outbox", None)
    # Celery's request.delivery_info has no delivery_tag; the kombu message has it
    tag = getattr(getattr(request, "message", None), "delivery_tag", None)
    if rt is not None and rt.recovery is not None and tag:
        rt.recovery.own(str(tag))
        _held[getattr(request, "id", None)] = str(tag)


#: task id -> delivery tag of the messages this worker holds
_held: dict[Any, str] = {}


@signals.task_postrun.connect
def _ran(sender: Any = None, task_id: Any = None, **_: Any) -> None:
    """The task ended: its message is acked next. If that ack is lost (broker outage), the
    owner record expires after the grace and recovery hands the message back."""
    tag = _held.pop(task_id, None)
    app = getattr(sender, "app", None)
    rt = getattr(app, "ourvidz_runtime", None) or getattr(app, "ourvidz_outbox", None)
    if tag and rt is not None and rt.recovery is not None:
        try:
            rt.recovery.release(tag)
        except redis.RedisError as exc:
            log.warning("recovery: could not release %s: %s", tag, type(exc).__name__)


@signals.worker_ready.connect
def _keep_consumer(sender: Any, **_: Any) -> None:
    sender.app.ourvidz_consumer = sender  # its event dispatcher changes on reconnect: looked up each time


@signals.task_prerun.connect
def _flush_task_events(sender: Any = None, **_: Any) -> None:
    """Send task-received/task-started now: a solo pool flushes buffered task events only
    between jobs, so Flower would see a running job only once it ended."""
    consumer = getattr(getattr(sender, "app", None), "ourvidz_consumer", None)
    dispatcher = getattr(consumer, "event_dispatcher", None)
    if dispatcher is not None:
        dispatcher.flush()


@signals.task_revoked.connect
def _revoked(sender: Any = None, request: Any = None, expired: bool = False, **_: Any) -> None:
    """A generation job revoked or expired before it ran still gets its one terminal callback."""
    from .delivery import callback_body
    from .errors import Cancelled, JobTimeout

    rt: Runtime | None = getattr(getattr(sender, "app", None), "ourvidz_runtime", None)
    name = getattr(sender, "name", "")  # the sender is the task
    if rt is None or not str(name).endswith(".generate"):
        return
    args = getattr(request, "args", None) or [None]
    job_id = usable_id(args[0])
    if job_id is None:
        return
    from .lifecycle import end_job

    error = JobTimeout("the job arrived after its expiry time") if expired else Cancelled("the job was revoked")
    log.info("job %s: %s", job_id, error.code)
    body = callback_body(job_id, rt.worker_id, "failed", attempt=1, metadata={}, error=error.as_dict())
    end_job(rt, args[0], body)


@signals.worker_shutdown.connect
def _shutdown(sender: Any, **_: Any) -> None:
    rt: Runtime | None = getattr(sender.app, "ourvidz_runtime", None)
    if rt is not None:
        rt.close()
        sender.app.ourvidz_runtime = None
