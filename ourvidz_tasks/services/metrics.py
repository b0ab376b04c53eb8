"""Prometheus metrics: what each pool did, and what the cluster holds right now.

Two kinds of numbers, one exposition format:

- :class:`JobMetrics` counts what happens in *this* process: jobs by type
  and outcome, job durations split into model and delivery time, queue wait
  and GPU seconds per family (never per user: ``ourvidz usage``), model loads
  and unloads, callbacks that could not be delivered. It is fed by the
  signals of :mod:`ourvidz_tasks.services.events` (connected, never patched in).
- :class:`ClusterCollector` reads shared state at scrape time: queue depth
  per Celery queue (``LLEN`` on the broker Redis; Flower has none), the
  legacy raw lists, unacked messages, dead letters, the memory ledger and
  the callback backlog (ended jobs whose terminal callback is not delivered).

A worker serves both with :func:`start` (``OURVIDZ_METRICS_PORT`` plus the
role's offset: sdxl +0, chat +1, wan +2, outbox +3, and +4 per GPU index
above 0), so the processes of one host never fight over a port.
``ourvidz metrics`` (:func:`serve`) serves the cluster numbers alone, for
when no pool is up.
Cluster gauges therefore appear on several targets: aggregate them with
``max without (instance, job)``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from ..contract import keys
from ..contract.devices import device_index
from ..contract.jobs import FAMILY_OF_TYPE
from ..contract.names import OUTBOX, QUEUES, ROLES
from ..contract.settings import Settings
from ..contract.text import as_text
from . import events
from .autoscale import autoscale_metrics
from .delivery import ENDED_LIMIT
from .outbox_store import Outbox, consumer_health
from .redis_client import connect

log = logging.getLogger(__name__)

LEGACY_LISTS = ("sdxl_queue", "wan_queue")
#: kombu's Redis transport keeps unacked messages in this hash
UNACKED = "unacked"
#: how many of the most recently ended jobs (keys.JOBS_ENDED) the backlog looks at: all it keeps
BACKLOG_WINDOW = ENDED_LIMIT
#: kombu's Redis transport: list ``queue`` plus one list per priority step
PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")
JOB_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600)
WAIT_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400)
LOAD_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)


# -- what this process did -------------------------------------------------------
class JobMetrics:
    """Counters and histograms of one process, fed by :mod:`~ourvidz_tasks.services.events`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.jobs = Counter(
            "ourvidz_jobs", "Generation jobs ended, by job type and outcome (completed|failed) and error code",
            ["family", "type", "outcome", "code"], registry=registry,
        )
        self.duration = Histogram(
            "ourvidz_job_duration_seconds",
            "Job duration by phase: model (validation to last pipeline step), delivery (encode, upload), total",
            ["family", "phase"], buckets=JOB_BUCKETS, registry=registry,
        )
        self.queue_wait = Histogram(
            "ourvidz_queue_wait_seconds",
            "Seconds from a job's arrival on its family queue to the start of the attempt that ended it "
            "(jobs whose arrival the pools' intake recorded)", ["family"], buckets=WAIT_BUCKETS, registry=registry,
        )
        self.gpu_seconds = Counter(
            "ourvidz_gpu_seconds", "Model seconds of ended jobs on the pools (every attempt of each job)",
            ["family"], registry=registry,
        )
        self.load_seconds = Histogram(
            "ourvidz_model_load_seconds", "Model load time (the _count is the number of loads)",
            ["model"], buckets=LOAD_BUCKETS, registry=registry,
        )
        self.unloads = Counter("ourvidz_model_unloads", "Model unloads", ["model"], registry=registry)
        self.resident = Gauge("ourvidz_model_resident_bytes", "Bytes held by a loaded model (0: unloaded)",
                              ["model"], registry=registry)
        self.callback_failures = Counter(
            "ourvidz_callback_failures", "Terminal callbacks not delivered after every try (kept for replay)",
            ["status"], registry=registry,
        )

    def connect(self) -> None:
        """Receive the signals (idempotent: one receiver per signal per process)."""
        for signal, receiver in (
            (events.job_finished, self.on_job_finished),
            (events.model_loaded, self.on_model_loaded),
            (events.model_unloaded, self.on_model_unloaded),
            (events.callback_failed, self.on_callback_failed),
        ):
            signal.connect(receiver, weak=False, dispatch_uid=f"ourvidz.metrics.{signal.name}")

    def on_job_finished(self, sender: Any, status: str = "?", job_type: str = "?", code: str | None = None,
                        processing_time: float | None = None, model_time: float | None = None,
                        delivery_time: float | None = None, queue_wait: float | None = None,
                        gpu_seconds: float | None = None, **_: Any) -> None:
        family = str(sender)
        # the type comes from the payload: keep label values to the known set
        known = job_type if job_type in FAMILY_OF_TYPE else "other"
        self.jobs.labels(family, known, status, code or "").inc()
        for phase, seconds in (("total", processing_time), ("model", model_time), ("delivery", delivery_time)):
            if seconds is not None:
                self.duration.labels(family, phase).observe(seconds)
        if queue_wait is not None:
            self.queue_wait.labels(family).observe(queue_wait)
        if gpu_seconds:
            self.gpu_seconds.labels(family).inc(gpu_seconds)

    def on_model_loaded(self, sender: Any, model: str = "?", seconds: float = 0.0, nbytes: int = 0, **_: Any) -> None:
        self.load_seconds.labels(model).observe(seconds)
        self.resident.labels(model).set(nbytes)

    def on_model_unloaded(self, sender: Any, model: str = "?", **_: Any) -> None:
        self.unloads.labels(model).inc()
        self.resident.labels(model).set(0)

    def on_callback_failed(self, sender: Any, status: str | None = None, **_: Any) -> None:
        self.callback_failures.labels(status or "?").inc()


# -- what the cluster holds ------------------------------------------------------
@dataclass(frozen=True)
class LedgerRow:
    host: str
    device: str
    reserved_mb: float
    budget_mb: float


def ledger_rows(store: redis.Redis) -> list[LedgerRow]:
    """Reserved and budget MB of every device's memory ledger, read defensively.

    TODO(memory.py): read through a public function of the ledger module once
    it has one. Until then this follows its key layout: per device the hash
    ``{keys.ledger(host, device)}:meta`` (field ``budget``) and the hash
    ``...:held`` (``pool/model`` -> MB). Anything unreadable counts as 0; no
    ledger at all (before the first reservation) is no row.
    """
    rows = []
    for key in sorted(store.scan_iter(match=keys.LEDGER_META_PATTERN, count=1000)):
        prefix = as_text(key).removesuffix(":meta")
        host, _, device = prefix.removeprefix(keys.LEDGER_PREFIX).partition(":")  # device: cpu, cuda:0
        try:
            budget = _number(store.hget(key, "budget"))
            reserved = sum(_number(v) for v in store.hvals(f"{prefix}:held"))
        except redis.ResponseError:  # a key of another type: not a ledger
            continue
        rows.append(LedgerRow(host, device, reserved, budget))
    return rows


def _number(raw: object) -> float:
    try:
        return float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0.0


def callback_backlog(store: redis.Redis, window: int = BACKLOG_WINDOW) -> int:
    """Ended jobs (of the last ``window``) whose terminal callback is recorded but not delivered.

    Reads the keys :mod:`~ourvidz_tasks.services.delivery` writes: ``keys.job_final(id)``
    without ``keys.job_delivered(id)`` (set once the terminal callback was delivered).
    Unlike the depth of the ``outbox`` queue, this counts terminal callbacks only,
    and also those an inline sender gave up on.
    """
    ids = list(dict.fromkeys(store.lrange(keys.JOBS_ENDED, -window, -1)))
    if not ids:
        return 0
    with store.pipeline(transaction=False) as pipe:
        for raw in ids:
            job_id = as_text(raw)
            pipe.exists(keys.job_final(job_id))
            pipe.exists(keys.job_delivered(job_id))
        found = pipe.execute()
    return sum(1 for final, delivered in zip(found[::2], found[1::2], strict=True) if final and not delivered)


class ClusterCollector(Collector):
    """Queue depth, ledger and backlog, read from Redis at every scrape."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.broker = connect(settings.broker_url, settings) if settings.broker_is_redis else None
        self.store = connect(settings.redis, settings)
        self.legacy = connect(settings.legacy_redis, settings)
        self._lock = threading.Lock()
        if self.broker is None:
            log.warning("queue depth needs a Redis broker; on RabbitMQ use its own Prometheus plugin")

    def describe(self) -> list[Metric]:
        return []  # names vary with the ledger; nothing to read at registration

    def collect(self) -> Iterator[Metric]:
        with self._lock:  # concurrent scrapes share the clients
            yield from self._collect()

    def _collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("ourvidz_redis_up", "1 when the last scrape could read Redis")
        try:
            families = list(self._read())
        except redis.RedisError as exc:
            log.warning("metrics scrape could not read Redis: %s", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _read(self) -> Iterator[Metric]:
        if self.broker is not None:
            depth = GaugeMetricFamily("ourvidz_queue_depth", "Messages waiting in a Celery queue", labels=["queue"])
            with self.broker.pipeline(transaction=False) as pipe:
                for queue in QUEUES:  # not taken in yet, then in the queue's fair order
                    for suffix in PRIORITY_SUFFIXES:
                        pipe.llen(queue + suffix)
                    pipe.zcard(keys.fair(queue, "waiting"))
                pipe.hlen(UNACKED)
                *lengths, unacked = pipe.execute()
            steps = len(PRIORITY_SUFFIXES) + 1
            waiting = {queue: sum(lengths[i * steps:(i + 1) * steps]) for i, queue in enumerate(QUEUES)}
            for queue, count in waiting.items():
                depth.add_metric([queue], count)
            yield depth
            yield _gauge("ourvidz_unacked_messages", "Messages taken by a worker and not yet acknowledged", unacked)
            lists = {queue: [queue + suffix for suffix in PRIORITY_SUFFIXES] for queue in QUEUES}
            yield from autoscale_metrics(self.broker, self.store, lists, waiting)
        legacy = GaugeMetricFamily("ourvidz_legacy_queue_depth", "Raw jobs waiting in the edge function's lists",
                                   labels=["list"])
        with self.legacy.pipeline(transaction=False) as pipe:
            for name in LEGACY_LISTS:
                pipe.llen(name)
            for name, length in zip(LEGACY_LISTS, pipe.execute(), strict=True):
                legacy.add_metric([name], length)
        yield legacy
        yield _gauge("ourvidz_dead_letters", "Entries in the dead-letter list", self.store.llen(keys.DEAD_LETTERS))
        yield _gauge("ourvidz_callback_backlog", "Ended jobs whose terminal callback is not delivered yet",
                     callback_backlog(self.store))
        yield from outbox_metrics(self.store, self.settings)
        reserved = GaugeMetricFamily("ourvidz_ledger_reserved_mb", "GPU memory reserved in the ledger, MB",
                                     labels=["host", "device"])
        budget = GaugeMetricFamily("ourvidz_ledger_budget_mb", "GPU memory budget of the ledger, MB",
                                   labels=["host", "device"])
        for row in ledger_rows(self.store):
            reserved.add_metric([row.host, row.device], row.reserved_mb)
            budget.add_metric([row.host, row.device], row.budget_mb)
        yield reserved
        yield budget


def outbox_metrics(store: redis.Redis, settings: Settings) -> Iterator[Metric]:
    """The callback outbox: bodies waiting, the oldest one's age, and its consumer's health."""
    state = Outbox.for_settings(store, settings).state()
    yield _gauge("ourvidz_outbox_depth", "Callbacks waiting in the outbox (failed deliveries and those behind them)",
                 state.depth)
    yield _gauge("ourvidz_outbox_oldest_seconds", "Age of the oldest callback in the outbox (0 when empty)",
                 state.oldest_age or 0.0)
    health = consumer_health(state, settings.outbox_consumer)
    consumer = GaugeMetricFamily("ourvidz_outbox_consumer", "1 for the outbox consumer's current health",
                                 labels=["health"])
    for name in ("draining", "pools", "missing", "stuck"):
        consumer.add_metric([name], 1 if name == health else 0)
    yield consumer


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation)
    family.add_metric([], value)
    return family


# -- serving ----------------------------------------------------------------------
def port_for(base: int, role: str, device: str | None) -> int:
    """The metrics port of a process: ``base`` + role offset (``names.ROLES``) + 4 per device index above 0."""
    gpu = device_index(device) if role != OUTBOX else 0
    return base + ROLES.index(role) + len(ROLES) * gpu


@dataclass
class Exporter:
    """A running metrics endpoint."""

    registry: CollectorRegistry
    port: int
    jobs: JobMetrics | None = None
    _server: Any = None

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _listen(registry: CollectorRegistry, port: int, address: str) -> tuple[Any, int]:
    server, _thread = start_http_server(port, addr=address, registry=registry)
    return server, int(server.server_address[1])


def start(settings: Settings, role: str) -> Exporter | None:
    """Serve this worker's metrics if ``OURVIDZ_METRICS_PORT`` is set (called once at worker start).

    ``role``: ``sdxl``, ``chat``, ``wan`` or ``outbox`` (its port offset). Port 0 picks a free port.
    """
    base = settings.metrics_port
    if base is None:
        return None
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    jobs = JobMetrics(registry)
    jobs.connect()
    registry.register(ClusterCollector(settings))
    port = port_for(base, role, settings.device) if base else 0
    server, bound = _listen(registry, port, settings.metrics_address)
    log.info("metrics on http://%s:%d/metrics", settings.metrics_address, bound)
    return Exporter(registry, bound, jobs, server)


def serve(settings: Settings, port: int, address: str) -> Exporter:
    """The cluster numbers alone (``ourvidz metrics``): no pool needed."""
    registry = CollectorRegistry()
    registry.register(ClusterCollector(settings))
    server, bound = _listen(registry, port, address)
    return Exporter(registry, bound, None, server)
