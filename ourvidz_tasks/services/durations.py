"""How long a job of a given shape takes on its family's pools: measured, kept in Redis (issue 26).

The one owner of that fact, for the queue's ETAs and the fair order's costs. A job's *shape*
(:func:`work_shape`) is what its time depends on, read from the raw job with the contract's own
rules (:mod:`ourvidz_tasks.contract.params`): SDXL ``1024x1024x6s15`` (width, height, images,
denoising steps that run), WAN ``480x832x81s25`` (frames), chat and enhance one fixed ``chat``.
Its *work units* scale with the work: megapixels × images (or frames) × steps, 1 for chat.

:class:`Durations` keeps, per family and shape, the seconds of the last ``duration_window``
jobs that completed (:meth:`~Durations.record`, called when a job ends), and per family the
seconds per work unit of its last jobs of any shape. :meth:`~Durations.estimate` is, in order:
the mean of the shape's own window; else the family's mean seconds per unit × the job's units
(a shape never run yet); else ``OURVIDZ_JOB_SECONDS`` (:data:`DEFAULT_JOB_SECONDS` under it), the
seconds of the family's default shape before anything was measured, scaled by units. Reads are
cached in-process for ``cache_seconds``: one round trip per shape at most that often.

Torch-free: the publishers' light install and the pools' intake use it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import redis

from ..contract import keys
from ..contract.jobs import FAMILY_OF_TYPE, Job, parse_job
from ..contract.names import FAMILIES
from ..contract.params import sdxl_params, wan_params
from ..contract.settings import Settings

log = logging.getLogger(__name__)

#: seconds of each family's default job shape before any job was measured (``OURVIDZ_JOB_SECONDS``
#: overrides per family): SDXL one 1024² image of 15 steps, WAN 480x832 83 frames (81 run) of 25
#: steps, one chat reply or enhancement
DEFAULT_JOB_SECONDS: dict[str, float] = {"sdxl": 5.0, "wan": 240.0, "chat": 5.0}
#: a family none of the above names (a new one before its default is set)
FALLBACK_JOB_SECONDS = 60.0
#: the job type whose defaults make each generation family's default shape
DEFAULT_TYPES = {FAMILY_OF_TYPE[t]: t for t in ("sdxl_image_fast", "video_fast")}
CHAT_SHAPE = "chat"
#: measured windows outlive a quiet month, then are measured again
DURATIONS_TTL = 30 * 24 * 3600
#: seconds an in-process read stays fresh
CACHE_SECONDS = 2.0
_MEGAPIXEL = 1024 * 1024

Shape = tuple[str, float]


def _generation_shape(family: str, job: Job, settings: Settings) -> Shape:
    if family == "sdxl":
        p = sdxl_params(job, settings)
        count, steps = p.num_images, p.steps_run
        width, height = p.width, p.height
    else:
        w = wan_params(job, settings)
        count, steps, width, height = w.frames, w.steps, w.width, w.height
    units = width * height / _MEGAPIXEL * count * steps
    return f"{width}x{height}x{count}s{steps}", units


def default_shape(family: str, settings: Settings) -> Shape:
    """The shape and work units of a job of ``family`` that sets nothing (its type's defaults)."""
    if family in DEFAULT_TYPES:
        return _generation_shape(family, Job(type=DEFAULT_TYPES[family]), settings)
    return CHAT_SHAPE, 1.0


def work_shape(family: str, job: Mapping[str, Any], settings: Settings) -> Shape:
    """``(shape, units)`` of a raw job of ``family``: what its time depends on, by the contract's rules.

    Never raises: a job that is not valid (it will fail at once) or not a mapping has the
    family's default shape (:func:`default_shape`). Chat and enhance requests are one ``chat``.
    """
    if family not in DEFAULT_TYPES:
        return CHAT_SHAPE, 1.0
    try:
        parsed = parse_job(dict(job), settings, family)
        return _generation_shape(family, parsed, settings)
    except Exception:  # untrusted input, any shape of wrong: never a reason to raise here
        return default_shape(family, settings)


def _mean(values: Sequence[bytes | str]) -> float | None:
    numbers = []
    for raw in values:
        try:
            numbers.append(float(raw))
        except (TypeError, ValueError):
            continue
    return sum(numbers) / len(numbers) if numbers else None


class Durations:
    """Measured durations per family and job shape in Redis (``keys.durations``, ``keys.duration_rate``).

    ``store``: the Redis of ``OURVIDZ_REDIS_URL`` (what the pools record into); ``cache_seconds``:
    how long an in-process read stays fresh; ``clock``: monotonic seconds (tests).
    """

    def __init__(self, store: redis.Redis, settings: Settings, *, cache_seconds: float = CACHE_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.redis, self.settings = store, settings
        self.window = settings.duration_window
        self.defaults = {**DEFAULT_JOB_SECONDS, **settings.job_seconds}
        self._default_units: dict[str, float] = {family: default_shape(family, settings)[1] for family in FAMILIES}
        self.cache_seconds, self.clock = cache_seconds, clock
        #: (family, shape) -> (read at, the shape's mean seconds, the family's mean seconds per unit)
        self._cache: dict[tuple[str, str], tuple[float, float | None, float | None]] = {}
        self._lock = threading.Lock()

    def record(self, family: str, shape: str, units: float, seconds: float, *, pipe: Any = None) -> None:
        """One more job of ``shape`` (``units`` of work) took ``seconds`` on a ``family`` pool.

        ``pipe``: queue the commands on the caller's pipeline (executed by the caller) instead of
        sending them at once. Raises what Redis raises (callers that only keep books catch it).
        """
        if not seconds >= 0:  # NaN too
            return
        own = pipe if pipe is not None else self.redis.pipeline(transaction=False)
        shape_key = keys.durations(family, shape)
        own.lpush(shape_key, f"{seconds:.4f}")
        own.ltrim(shape_key, 0, self.window - 1)
        own.expire(shape_key, DURATIONS_TTL)
        if units > 0:
            rate_key = keys.duration_rate(family)
            own.lpush(rate_key, f"{seconds / units:.6g}")
            own.ltrim(rate_key, 0, self.window - 1)
            own.expire(rate_key, DURATIONS_TTL)
        if pipe is None:
            own.execute()
        with self._lock:  # this process sees its own record at once (the family's rate moved too)
            self._cache = {key: found for key, found in self._cache.items() if key[0] != family}

    def seconds(self, family: str, shape: str, units: float) -> float:
        """Seconds a job of ``shape`` (``units`` of work) takes on a ``family`` pool: the shape's
        measured mean, else the family's measured seconds per unit × ``units``, else the default."""
        measured, rate = self._read(family, shape)
        if measured is not None:
            return measured
        if rate is not None:
            return rate * units
        base = self.defaults.get(family, FALLBACK_JOB_SECONDS)
        return base * units / self._default_units.get(family, 1.0)

    def estimate(self, family: str, job: Mapping[str, Any]) -> float:
        """Seconds a raw job of ``family`` will take (:func:`work_shape`, then :meth:`seconds`).

        Never raises for the job; raises what Redis raises on a cache miss.
        """
        shape, units = work_shape(family, job, self.settings)
        return self.seconds(family, shape, units)

    def _read(self, family: str, shape: str) -> tuple[float | None, float | None]:
        now = self.clock()
        with self._lock:
            cached = self._cache.get((family, shape))
        if cached is not None and now - cached[0] < self.cache_seconds:
            return cached[1], cached[2]
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.lrange(keys.durations(family, shape), 0, self.window - 1)
            pipe.lrange(keys.duration_rate(family), 0, self.window - 1)
            own, rates = pipe.execute()
        found = (now, _mean(own), _mean(rates))
        with self._lock:
            if len(self._cache) > 4096:  # shapes come from untrusted jobs: keep the cache bounded
                self._cache.clear()
            self._cache[(family, shape)] = found
        return found[1], found[2]

