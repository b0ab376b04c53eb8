"""The worker's resources, built once at start and handed to every job.

``celeryd_after_setup`` (logging is configured, nothing is consumed yet)
builds the :class:`Runtime` of the pool's family, loads its model (warmup)
and attaches it to the app; ``worker_shutdown`` unloads and closes it. Tasks
reach it through :func:`runtime`. The family is the queue the worker
consumes (``bin/worker sdxl`` consumes ``sdxl``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

import httpx
import redis
from celery import Celery, signals

from ..contract import devices
from ..contract.errors import ConfigError, ModelLoadError, OutOfMemory, WorkerUnavailable
from ..contract.jobs import FAMILY_OF_TYPE, usable_id
from ..contract.settings import Settings, load_settings
from ..models import release_memory
from ..services import events, metrics
from ..services.delivery import Delivery
from ..services.fetch import ReferenceFetcher
from ..services.guard import DeadLetters, hooks
from ..services.outbox_store import Drainer, pool_callbacks
from ..services.policy import PromptPolicy, load_policy
from ..services.redact import install_log_filter
from ..services.redis_client import connect
from .faults import AttemptHook, load_failure, load_plugins
from .ledger import Heartbeat, Ledger, Reservation, first_estimate, mb_of
from .memprobe import CudaProbe, Measurement, Probe, configure_cuda_allocator, probe_for
from .recovery import Recovery

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

FAMILIES = ("sdxl", "chat", "wan")
#: serializes model loads of a pool whose tasks run in threads (chat)
_loading = threading.Lock()
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
                 default_mb: int = 0, default_work_mb: int = 0, wait: float = 600.0) -> None:
        self.name, self.pool = name, pool
        self._loader = loader
        self._on_load = on_load
        self.ledger, self.heartbeat = ledger, heartbeat
        #: the first estimate (MB) before anything is measured, ``default_work_mb`` of it working memory
        self.default_mb, self.default_work_mb, self.wait = default_mb, default_work_mb, wait
        self.reservation: Reservation | None = None
        self.model: Loaded | None = None
        self.loads = 0

    def get(self, wait: float | None = None) -> Any:
        if self.model is not None:
            return self.model
        if self.ledger is not None:
            mb = self.estimate()
            self.reservation = self.ledger.reserve(self.pool, self.name, mb, timeout=self.wait if wait is None else wait)
            if self.heartbeat is not None:  # from now: a load may take longer than the lease
                self.heartbeat.add(self.reservation)
        started = time.perf_counter()
        failure: Exception | None = None
        loaded: Loaded | None = None
        try:
            loaded = self._loader()
        except Exception as exc:  # a device fault exits here; OOM becomes OutOfMemory
            failure = load_failure(self.name, exc)
        if loaded is None:  # outside the except: the failed load's tensors went with its frames
            self._release()
            release_memory()
            raise failure or ModelLoadError(f"{self.name}: its loader returned nothing")
        self.model = loaded
        self.loads += 1
        seconds = time.perf_counter() - started
        self._on_load(self.name, seconds)
        nbytes = self.model.nbytes()
        events.model_loaded.send(sender=self.name, model=self.name, seconds=seconds, nbytes=nbytes)
        if self.ledger is not None and self.reservation is not None:
            self.ledger.record_weights(self.name, mb_of(nbytes))
            self.reservation.resize(self.estimate())  # weights measured, not guessed
        return self.model

    def estimate(self, shape: str | None = None) -> int:
        """What the ledger should hold for this model (running ``shape``, else its largest recent shape)."""
        if self.ledger is None:
            return self.default_mb
        return self.ledger.estimate(self.name, self.default_mb, shape, default_work_mb=self.default_work_mb)

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
    #: delivers the callback outbox while no `bin/worker outbox` does (outbox mode)
    drainer: Drainer | None = None
    ledger: Ledger | None = None
    heartbeat: Heartbeat | None = None
    models: dict[str, ModelSlot] = field(default_factory=dict)
    #: the models the current job used (peak memory is attributed to them)
    used: set[str] = field(default_factory=set)
    #: monotonic time the last job ended (drives the idle unload)
    last_job_ended: float = field(default_factory=time.monotonic)
    #: called before every model call that may step down on OOM (see :mod:`.faults`); plug-ins add them
    attempt_hooks: list[AttemptHook] = field(default_factory=list)
    #: this device kind's memory probe, and the measurement of the model call running now
    probe: Probe | None = None
    measurement: Measurement | None = None
    #: models loaded since their last measured call (that call measures what they keep resident)
    fresh: set[str] = field(default_factory=set)
    #: model calls measured in this process (the first one's leftovers are the process's own)
    measured_calls: int = 0

    @contextlib.contextmanager
    def measure(self) -> Iterator[Measurement | None]:
        """Measure the working memory of a job's model call; a load or an attempt restarts it."""
        if self.probe is None:
            yield None
            return
        with self.probe.measure() as m:
            self.measurement = m
            try:
                yield m
            finally:
                self.measurement = None

    def cap_memory(self) -> None:
        """``OURVIDZ_MEMORY_CAP``: on CUDA, this process may hold at most what its models reserve."""
        if self.settings.memory_cap and isinstance(self.probe, CudaProbe):
            held = sum(s.reservation.mb for s in self.models.values() if s.reservation is not None)
            if held:
                self.probe.cap(held)

    def restart_measurement(self, *_: object) -> None:
        """What came before (a load, an attempt that ran out of memory) is not working memory."""
        if self.measurement is not None:
            self.measurement.restart()

    def model(self, name: str) -> Any:
        self.used.add(name)
        slot = self.models[name]
        loaded = slot.model
        if loaded is not None:
            return loaded
        with _loading:  # the chat pool runs several task threads: one load at a time
            return slot.get()

    def record_load(self, name: str, seconds: float) -> None:
        self.restart_measurement()
        self.fresh.add(name)
        self.cap_memory()
        log.info("%s loaded in %.2fs on %s", name, seconds, self.device)
        key = f"ourvidz:loads:{self.worker_id}"
        with self.redis.pipeline() as pipe:
            pipe.hincrby(key, name, 1)
            pipe.expire(key, LOADS_TTL)
            pipe.execute()

    def close(self) -> None:
        if self.recovery is not None:
            self.recovery.stop()
        if self.drainer is not None:
            self.drainer.stop()
        for slot in self.models.values():
            slot.unload()
        if self.heartbeat is not None:
            self.heartbeat.stop()
        self.delivery.close()
        self.fetcher.close()


def node_name(family: str, settings: Settings) -> str:
    """``{family}@{host}``, or ``{family}.gpuN@{host}`` / ``{family}.cpuN@{host}`` on ``cuda:N`` / ``cpu:N``
    with N > 0 (:func:`ourvidz_tasks.contract.devices.node_name`)."""
    return devices.node_name(family, settings.hostname or socket.gethostname(), settings.device)


def _loaders(family: str, settings: Settings, device: torch.device) -> dict[str, Callable[[], Loaded]]:
    if family == "sdxl":
        from ..models.sdxl import load_sdxl

        return {"sdxl": lambda: load_sdxl(settings, device)}
    if family == "wan":
        from ..models.wan import load_wan

        return {"wan": lambda: load_wan(settings, device)}
    if settings.chat_server_url:  # an external engine answers; nothing loads here
        from ..models.chat_remote import RemoteChat

        return {"qwen_instruct": lambda: RemoteChat(settings, "qwen_instruct"),
                "qwen_base": lambda: RemoteChat(settings, "qwen_base")}
    from ..models.chat_engine import load_chat_engine

    return {
        "qwen_instruct": lambda: load_chat_engine(settings, "qwen_instruct", device),
        "qwen_base": lambda: load_chat_engine(settings, "qwen_base", device),
    }


def warm_models(family: str, settings: Settings) -> list[str]:
    """The models a pool loads at start (the others load on first use)."""
    if family == "chat":
        return ["qwen_instruct", "qwen_base"] if settings.qwen_base_load == "start" else ["qwen_instruct"]
    return [family]


def build_runtime(app: Celery, family: str, worker_id: str, settings: Settings | None = None) -> Runtime:
    """Everything a pool needs, built once: clients, policy, model slots."""
    configure_cuda_allocator()  # before the first CUDA allocation
    import torch

    from ..models import resolve_device

    settings = settings or load_settings()
    threads = settings.torch_threads or max(1, (os.cpu_count() or 1) // len(FAMILIES))
    torch.set_num_threads(threads)
    device = resolve_device(settings.device)
    store = connect(settings.redis, settings)
    dead = DeadLetters(store)
    client = httpx.Client(timeout=settings.http_timeout, follow_redirects=False)
    transport, drainer = pool_callbacks(settings, store, client, worker_id) if settings.callbacks == "outbox" \
        else (None, None)
    runtime = Runtime(
        settings=settings, family=family, worker_id=worker_id, device=device, redis=store,
        delivery=Delivery(settings, worker_id, store, client=client, transport=transport),
        fetcher=ReferenceFetcher(settings),
        policy=load_policy(settings.prompt_policy), dead=dead, drainer=drainer,
    )
    if settings.broker_is_redis:
        runtime.recovery = Recovery(
            connect(settings.broker_url, settings), worker_id,
            lease_seconds=settings.lease_seconds, owner_ttl=settings.visibility_timeout,
        )
    runtime.ledger = Ledger.for_settings(store, settings, device)
    runtime.heartbeat = runtime.ledger.keepalive()

    runtime.probe = probe_for(device)
    runtime.attempt_hooks.append(runtime.restart_measurement)
    runtime.models = {
        name: ModelSlot(name, loader, runtime.record_load, pool=family, ledger=runtime.ledger,
                        heartbeat=runtime.heartbeat, wait=settings.memory_wait,
                        **first_estimate(name, tiny=settings.model_source == "tiny", slack=settings.memory_slack))
        for name, loader in _loaders(family, settings, device).items()
    }
    hooks.dead = dead
    hooks.raw_job = lambda job: republish_raw(app, job)
    load_plugins(settings.runtime_plugins, runtime)
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


#: exit status of a pool whose Redis did not answer within ``OURVIDZ_STARTUP_WAIT`` (its supervisor restarts it)
EXIT_NOT_READY = 69


def exit_before_consuming(status: int) -> NoReturn:
    """End a pool that never consumed: Celery would turn a SystemExit raised here into status 0."""
    logging.shutdown()
    os._exit(status)


def _warm(rt: Runtime) -> None:
    """Load the pool's start models; Redis must answer (the ledger and the load counts live there)."""
    rt.redis.ping()
    if rt.recovery is not None:
        rt.recovery.broker.ping()
    for name in warm_models(rt.family, rt.settings):
        try:  # SDXL waits to be resident; the others load now only if they fit
            rt.models[name].get(wait=None if rt.family == "sdxl" else 0.0)
        except (WorkerUnavailable, OutOfMemory):
            log.info("%s: no GPU memory free at start; it loads on first use", name)


def warm_up(rt: Runtime, sender: str) -> None:
    """Warm up once Redis answers, again from scratch after every Redis error (a restart mid-warmup).

    Celery starts consuming only after ``celeryd_after_setup`` returns, so a pool never takes
    a job before it is ready. After ``startup_wait`` seconds without Redis the process exits
    with :data:`EXIT_NOT_READY` and its supervisor restarts it.
    """
    deadline = time.monotonic() + rt.settings.startup_wait
    pause = 0.5
    while True:
        try:
            _warm(rt)
            return
        except redis.RedisError as exc:
            for slot in rt.models.values():  # a load's bookkeeping may be half done: start over
                with contextlib.suppress(redis.RedisError):
                    slot.unload()
                if slot.reservation is not None and rt.heartbeat is not None:
                    rt.heartbeat.discard(slot.reservation)
                slot.model, slot.reservation = None, None
            left = deadline - time.monotonic()
            if left <= 0:
                log.critical("%s: Redis did not answer within %gs (%s); exiting so that the supervisor restarts it",
                             sender, rt.settings.startup_wait, type(exc).__name__)
                exit_before_consuming(EXIT_NOT_READY)
            log.warning("%s not ready: Redis does not answer (%s); warmup again in %.1fs", sender,
                        type(exc).__name__, min(pause, left))
            time.sleep(min(pause, left))
            pause = min(pause * 2, 5.0)


@signals.celeryd_after_setup.connect
def _warmup(sender: str, instance: Any, **_: Any) -> None:
    app: Celery = instance.app
    install_log_filter()
    queues = sorted(app.amqp.queues.consume_from or {})
    families = [q for q in queues if q in FAMILIES]
    if len(families) > 1:  # it would take jobs of families it has no model for
        log.critical("worker %s consumes %s: one model family per pool (bin/worker sdxl|chat|wan)", sender, queues)
        exit_before_consuming(2)
    if not families:
        if queues != ["outbox"]:
            log.warning("worker %s consumes %s: no model family to warm up", sender, queues)
        return
    family = families[0]
    rt = build_runtime(app, family, sender)
    metrics.start(rt.settings, family)  # before the warm loads, so they are counted
    log.info("%s warming up", sender)
    try:
        warm_up(rt, sender)
    except (ConfigError, ModelLoadError) as exc:
        log.critical("warmup failed: %s", exc)
        exit_before_consuming(3)
    app.ourvidz_runtime = rt  # type: ignore[attr-defined]
    if rt.recovery is not None:
        rt.recovery.start()  # hands back at once what an earlier process of this name held
    if rt.drainer is not None:
        rt.drainer.start()
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
    between jobs, so Flower would see a running job only once it ended. A job task does it
    itself right after its ``processing`` callback is on its way (off the dispatch path)."""
    if getattr(sender, "marks_own_start", False):
        return
    mark = getattr(sender, "mark_started", None)
    if mark is not None:
        mark()
    else:
        flush_task_events(getattr(sender, "app", None))


def flush_task_events(app: Any) -> None:
    """Publish the task events the worker buffered (Flower sees them at once)."""
    consumer = getattr(app, "ourvidz_consumer", None)
    dispatcher = getattr(consumer, "event_dispatcher", None)
    if dispatcher is not None:
        dispatcher.flush()


@signals.task_revoked.connect
def _revoked(sender: Any = None, request: Any = None, expired: bool = False, **_: Any) -> None:
    """A generation job revoked or expired before it ran still gets its one terminal callback."""
    from ..contract.errors import Cancelled, JobTimeout
    from ..services.delivery import callback_body

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
