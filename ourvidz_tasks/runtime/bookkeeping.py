"""What a job leaves besides its callbacks: its queue wait, GPU seconds, measured duration, the
user's usage and its peak memory. Bookkeeping only helps: a Redis that is away or a key of the
wrong type skips it (logged), never fails or holds the job.

- :func:`queue_wait`, at an attempt's start: the broker's ``TIME`` minus the ``arrived`` the
  pools' intake wrote for the job (``keys.fair_job``); the first ``processing`` callback and the
  terminal one carry it as ``queue_wait_s`` (absent when no arrival was recorded).
- :func:`attempt_retried` keeps a retried attempt's model seconds (``keys.job_gpu``);
  :func:`gpu_seconds` adds them to the last attempt's: the terminal ``gpu_seconds``.
- :func:`job_ended`, once the terminal callback is recorded: the duration of a completed job
  (:class:`~ourvidz_tasks.services.durations.Durations`, the time it held the pool) and the user's
  usage of the day (:mod:`ourvidz_tasks.services.usage`), one round trip.
- :func:`fair_share`, when the job ends: its user's place in the fair order corrected by the time
  the job really held the pool (:func:`~ourvidz_tasks.services.fairness.finished`).
- :func:`remember_peak`: a job's measured working memory into the memory ledger.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis

from ..contract import keys
from ..contract.jobs import usable_id
from ..services import fairness
from ..services.durations import Durations, work_shape
from ..services.outage import OUTAGE_ERRORS
from ..services.usage import queue_usage
from .memprobe import Measurement
from .runtime import Runtime

log = logging.getLogger(__name__)

#: what bookkeeping skips: Redis away, or a key it did not write in its way
SKIPPED: tuple[type[BaseException], ...] = (*OUTAGE_ERRORS, redis.RedisError)
#: the same, and a value that is not a number
UNREADABLE: tuple[type[BaseException], ...] = (*SKIPPED, ValueError)


def _broker(rt: Runtime) -> redis.Redis:
    """The Redis the intake writes arrivals to: the broker on Redis brokers, else the store."""
    return rt.recovery.broker if rt.recovery is not None else rt.redis


def queue_wait(rt: Runtime, job_id: str) -> float | None:
    """Seconds from the job's arrival (``keys.fair_job``'s ``arrived``) to now, by the broker's
    clock; None when no arrival is recorded or Redis does not answer. One round trip; with the fair
    order on, the same round trip marks the job running (:func:`~ourvidz_tasks.services.fairness.started`)."""
    try:
        store = rt.fair_store
        if store is not None:
            waited = fairness.started(store, rt.fair_queue, job_id)
            return None if waited is None else round(waited, 3)
        with _broker(rt).pipeline(transaction=False) as pipe:
            pipe.time()
            pipe.hget(keys.fair_job(job_id), "arrived")
            (seconds, micros), arrived = pipe.execute()
        if arrived is None:
            return None
        return round(max(0.0, seconds + micros / 1e6 - float(arrived)), 3)
    except UNREADABLE as exc:
        log.warning("job %s: queue wait not read (%s)", job_id, type(exc).__name__)
        return None


def attempt_retried(rt: Runtime, job_id: str, model_seconds: float) -> None:
    """A retried attempt's model seconds, kept until the job's terminal callback sums them."""
    key = keys.job_gpu(job_id)
    try:
        with rt.redis.pipeline(transaction=False) as pipe:
            pipe.incrbyfloat(key, round(model_seconds, 3))
            pipe.expire(key, rt.settings.terminal_ttl)
            pipe.execute()
    except SKIPPED as exc:
        log.warning("job %s: GPU seconds of attempt not kept (%s)", job_id, type(exc).__name__)


def gpu_seconds(rt: Runtime, job_id: str, retries: int, model_seconds: float) -> float:
    """The job's model seconds on the pools: this attempt's plus its retried ones' (read only on a retry)."""
    earlier = 0.0
    if retries > 0:
        try:
            earlier = float(rt.redis.get(keys.job_gpu(job_id)) or 0.0)
        except UNREADABLE as exc:
            log.warning("job %s: GPU seconds of earlier attempts not read (%s)", job_id, type(exc).__name__)
    return round(earlier + model_seconds, 3)


def job_ended(rt: Runtime, payload: Any, body: dict[str, Any]) -> None:
    """The terminal callback is recorded: the job's duration (completed, computed here) and usage."""
    meta = body["metadata"]
    user = payload.get("user_id") if isinstance(payload, dict) else None
    try:
        with rt.redis.pipeline(transaction=False) as pipe:
            if int(meta.get("attempt") or 1) > 1:  # only a retried job kept its attempts' seconds
                pipe.delete(keys.job_gpu(body["job_id"]))
            seconds = meta.get("processing_time")
            if body["status"] == "completed" and not meta.get("resumed_from_spool") and seconds:
                shape, units = work_shape(rt.family, payload, rt.settings)
                Durations(rt.redis, rt.settings).record(rt.family, shape, units, float(seconds), pipe=pipe)
            if isinstance(user, str) and usable_id({"id": user}):
                queue_usage(pipe, user, float(meta.get("gpu_seconds") or 0.0), 1, time.time())
            pipe.execute()
    except SKIPPED as exc:
        log.warning("job %s: duration and usage not recorded (%s)", body["job_id"], type(exc).__name__)


def remember_peak(rt: Runtime, shape: str, peak: Measurement | None) -> None:
    """Record a job's measured working memory (a call that returned) and re-size what the models hold.

    Every device kind (the probe is chosen at start). The first call after a
    load also records what it left allocated (the model's caches) as resident;
    what the process's very first call leaves (libraries' one-time workspaces,
    kept whether a model is loaded or not) is the process's own, like its CUDA
    context: the per-pool allowance of the budget covers it, not the model.
    The reservation is settled after (:meth:`~ourvidz_tasks.runtime.runtime.Runtime.settle`).
    """
    if rt.ledger is None or peak is None:
        return
    try:
        _record_peak(rt, shape, peak)
    except OUTAGE_ERRORS as exc:  # bookkeeping that only helps: never a reason to fail the job
        log.warning("%s: peak memory of %s not recorded (%s)", rt.family, shape, type(exc).__name__)


def _record_peak(rt: Runtime, shape: str, peak: Measurement) -> None:
    assert rt.ledger is not None
    first_call = rt.measured_calls == 0
    rt.measured_calls += 1
    if first_call and peak.resident_mb:
        log.info("%s: the process's first model call kept %d MB (one-time, the process's own)",
                 rt.family, peak.resident_mb)
    for name in rt.used:
        if name in rt.fresh:
            rt.ledger.record_resident(name, 0 if first_call else peak.resident_mb)
            rt.fresh.discard(name)
        rt.ledger.record_work(name, shape, peak.mb)


def fair_share(rt: Runtime, body: dict[str, Any]) -> None:
    """The job ended: its user's finish in the fair order corrected by what it really cost (the time
    it held the pool, as its estimate was), its fair-order entries gone."""
    store = rt.fair_store
    if store is None:
        return
    try:
        held = float(body["metadata"].get("processing_time") or 0.0)
        fairness.finished(store, rt.fair_queue, body["job_id"], held)
    except UNREADABLE as exc:
        log.warning("job %s: fair share not corrected (%s)", body["job_id"], type(exc).__name__)
