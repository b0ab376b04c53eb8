"""The resources of one worker process, built once at start and handed to every job.

A pool's :class:`Runtime` holds its clients, its model slots (:class:`ModelSlot`: reserved in the
GPU ledger, loaded, unloadable) and the state of the process that its jobs and the between-jobs
upkeep share (:class:`JobGate`, the load lock): none of it lives in module globals. It is built by
:func:`~ourvidz_tasks.runtime.build.build_runtime`, attached to the app by
:mod:`~ourvidz_tasks.runtime.pool` once warm, and reached by tasks through :func:`runtime`.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import redis
from redis import Redis

from ..contract import devices, keys, names
from ..contract.errors import ModelLoadError, WorkerUnavailable
from ..contract.settings import Settings
from ..models import release_memory
from ..services import events
from ..services.delivery import Delivery
from ..services.fair_relay import Relay
from ..services.fairness import Intake
from ..services.guard import DeadLetters
from ..services.outage import OUTAGE_ERRORS
from ..services.outbox_store import Drainer
from ..services.policy import PromptPolicy
from .faults import AttemptHook, load_failure
from .leases import Heartbeat, Reservation
from .ledger import Ledger, Wait
from .memprobe import CudaProbe, Measurement, Probe, mb_of
from .recovery import Recovery

if TYPE_CHECKING:
    import torch

    from ..services.fetch import ReferenceFetcher  # PIL: built by a pool only (runtime.build)

log = logging.getLogger(__name__)

LOADS_TTL = 7 * 24 * 3600


class JobGate:
    """The jobs running in this process and whether between-jobs upkeep is in flight.

    The chat pool runs several jobs at once (task threads) and the idle timer may fire on a
    thread of its own: a job starts only while no upkeep runs (:meth:`enter`), and upkeep
    (:meth:`claim`) runs only while no job does and no other upkeep is in flight.
    """

    def __init__(self) -> None:
        self.cond = threading.Condition()
        #: jobs running now
        self.depth = 0
        #: an upkeep (serve requests, idle unload, predictive load) in flight
        self.serving = False

    def enter(self, first: Callable[[], object] | None = None) -> None:
        """A job starts (after any upkeep in flight); ``first()`` runs, under the lock, when no other job runs."""
        with self.cond:
            self.cond.wait_for(lambda: not self.serving)
            self.depth += 1
            if self.depth == 1 and first is not None:
                first()

    def leave(self, last: Callable[[], object] | None = None) -> bool:
        """A job ended; ``last()`` runs, under the lock, when it was the last one (whoever owns the
        upkeep now); True when this caller now owns the upkeep."""
        with self.cond:
            self.depth = max(0, self.depth - 1)
            if self.depth == 0 and last is not None:
                last()
            return self._claim()

    def claim(self) -> bool:
        """The idle timer: True when no job runs and this caller now owns the upkeep."""
        with self.cond:
            return self._claim()

    def _claim(self) -> bool:
        if self.depth or self.serving:
            return False
        self.serving = True
        return True

    def release(self) -> None:
        """The upkeep is done: waiting jobs may start."""
        with self.cond:
            self.serving = False
            self.cond.notify_all()

    def if_alone(self, then: Callable[[], object]) -> None:
        """``then()``, under the lock, when exactly one job runs (the first job of a busy period)."""
        with self.cond:
            if self.depth == 1:
                then()


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

    def estimate(self, shape: str | None = None, *, idle: bool = False) -> int:
        """What the ledger should hold for this model: running ``shape``, else its largest recent shape;
        ``idle``: loaded, between jobs (weights and resident caches only)."""
        if self.ledger is None:
            return self.default_mb
        return self.ledger.estimate(self.name, self.default_mb, shape, default_work_mb=self.default_work_mb,
                                    idle=idle)

    def hold(self, shape: str, wait: float | None = None) -> int:
        """Before a model call: hold what ``shape`` needs (weights + its working memory + slack), waiting
        in line and making room through the ledger as a load does; the MB held."""
        res = self.reservation
        if self.ledger is None or res is None:
            return 0
        need = self.estimate(shape)
        if need > res.mb:
            self.ledger.reserve(self.pool, self.name, need, timeout=self.wait if wait is None else wait,
                                token=res.token, on_wait=self._step_back)
            res.grown(need)
            log.info("%s: %d MB held for a %s job", self.name, need, shape)
        return res.mb

    def _step_back(self, wait: Wait) -> None:
        """Growing behind another pool's job that grows too: past the ledger's patience, this job steps
        back (``WORKER_UNAVAILABLE``, retried): a busy pool is never asked to unload, so two jobs each
        waiting for the other's memory would wait out their whole memory wait."""
        assert self.ledger is not None
        if wait.position >= 1 and wait.waited >= self.ledger.patience:
            raise WorkerUnavailable(f"{self.name}: {wait.mb} MB for its job waited {wait.waited:.0f}s behind "
                                    f"another job's; it steps back and is retried")

    def settle(self) -> None:
        """After a job: hold only what the loaded model keeps (the caller gave the memory back first)."""
        if self.reservation is not None and self.ledger is not None:
            idle = self.estimate(idle=True)
            if idle < self.reservation.mb:
                self.reservation.resize(idle)

    def unload(self) -> int:
        if self.model is None:
            return 0
        freed = self.model.unload()
        self.model = None
        release_memory()  # again, now that the slot's own reference is gone too
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
    #: takes the family queue's messages into its fair order (Redis brokers, ``fair_order``)
    intake: Intake | None = None
    #: on RabbitMQ: relays the family queue through the fair order to the ready queue (``fair_order``)
    relay: Relay | None = None
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
    #: the jobs running now and the between-jobs upkeep (:mod:`.between_jobs`)
    gate: JobGate = field(default_factory=JobGate)
    #: serializes model loads of a pool whose tasks run in threads (chat)
    loading: threading.Lock = field(default_factory=threading.Lock)

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

    def model(self, name: str, shape: str | None = None) -> Any:
        """The loaded model ``name``; with ``shape``, its reservation grown to that job shape's first
        (the job's model call then runs reserved; :meth:`settle` gives it back after)."""
        self.used.add(name)
        slot = self.models[name]
        loaded = slot.model
        if loaded is None:
            with self.loading:  # the chat pool runs several task threads: one load at a time
                loaded = slot.get()
        if shape is not None and slot.hold(shape) and self.settings.memory_cap:
            self.cap_memory()
        return loaded

    def settle(self) -> None:
        """A job's model calls are over: its working memory goes back to the card, then to the ledger."""
        if not self.used:
            return
        if self.probe is not None:
            self.probe.give_back()
        try:
            for name in self.used:
                self.models[name].settle()
        except OUTAGE_ERRORS as exc:  # Redis away: the ledger learns at the next job's hold
            log.warning("%s: reservation not settled (%s)", self.family, type(exc).__name__)
        self.cap_memory()

    @property
    def fair_store(self) -> Redis | None:
        """The Redis holding this pool's fair order (the broker, or the store on RabbitMQ); None: off."""
        if self.intake is not None:
            return self.intake.broker
        return self.relay.store if self.relay is not None else None

    @property
    def fair_queue(self) -> str:
        """The name of this pool's fair order (``keys.fair``)."""
        return names.fair_queue(self.family, self.relay is not None)

    def record_load(self, name: str, seconds: float) -> None:
        self.restart_measurement()
        self.fresh.add(name)
        self.cap_memory()
        log.info("%s loaded in %.2fs on %s", name, seconds, self.device)
        key = keys.loads(self.worker_id)
        with self.redis.pipeline() as pipe:
            pipe.hincrby(key, name, 1)
            pipe.expire(key, LOADS_TTL)
            pipe.execute()

    def close(self) -> None:
        if self.intake is not None:
            self.intake.stop()
        if self.relay is not None:
            self.relay.stop()
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


def warm_models(family: str, settings: Settings) -> list[str]:
    """The models a pool loads at start (the others load on first use)."""
    if family == "chat":
        return ["qwen_instruct", "qwen_base"] if settings.qwen_base_load == "start" else ["qwen_instruct"]
    return [family]


def node_name(family: str, settings: Settings) -> str:
    """``{family}@{host}``, or ``{family}.gpuN@{host}`` / ``{family}.cpuN@{host}`` on ``cuda:N`` / ``cpu:N``
    with N > 0 (:func:`ourvidz_tasks.contract.devices.node_name`)."""
    return devices.node_name(family, settings.hostname or socket.gethostname(), settings.device)


def runtime(app: Any) -> Runtime:
    """The running worker's :class:`Runtime`."""
    rt: Runtime | None = getattr(app, "ourvidz_runtime", None)
    if rt is None:
        raise WorkerUnavailable("this process is not a warmed-up ourvidz worker")
    return rt


def stop_pool(app: Any) -> None:
    """Unload the pool's models and close its clients (``worker_shutdown``)."""
    rt: Runtime | None = getattr(app, "ourvidz_runtime", None)
    if rt is not None:
        rt.close()
        app.ourvidz_runtime = None
