"""What the memory ledger reserves for a model: sizes measured on one device, kept in Redis.

A reservation is the model's weights, counted exactly at load (parameter and
buffer bytes, :meth:`~MeasuredSizes.record_weights`), plus the working memory
of the job shape, plus allocator slack (``slack``, a fraction). Working memory
is measured around the model call only (:mod:`ourvidz_tasks.runtime.memprobe`)
and kept as the largest of the shape's last ``window`` measurements
(:meth:`~MeasuredSizes.record_work`): a recent value that goes down again,
never an all-time maximum. Before the first measurement, the first estimate
computed from the model's config (:mod:`ourvidz_tasks.models.memplan`).
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import redis

from ..contract.text import as_text
from ..models import memplan
from ..services.redis_client import register_script
from . import lua

log = logging.getLogger(__name__)

#: first estimates (MB) before anything is measured: weights from the published configs plus the
#: working memory of each model's default job shape plus slack (:mod:`ourvidz_tasks.models.memplan`)
DEFAULT_ESTIMATES_MB: dict[str, int] = {m: memplan.estimate_mb(m) for m in ("sdxl", "qwen_instruct", "qwen_base", "wan")}
#: the first estimate of a tiny test model (MB, of it working memory): measured at its first load and job
TINY_FIRST_MB, TINY_FIRST_WORK_MB = 64, 48
SIZES_TTL = 30 * 24 * 3600


def shape_ratio(model: str, shape: str, known: str) -> float | None:
    """How many times the working memory of ``known`` the shape model gives ``shape`` (None: no model of them).

    The shape model is the first-estimate formula of the real model (:func:`ourvidz_tasks.models.memplan.work_bytes`:
    activations by pixels and batch, latents by frames, KV cache by tokens); a measured shape's
    working memory times this ratio is the first figure of a shape never run on this device.
    """
    try:
        want, have = memplan.work_bytes(model, shape), memplan.work_bytes(model, known)
    except (ValueError, KeyError, IndexError):
        return None
    return want / have if have > 0 else None


def first_estimate(model: str, *, tiny: bool = False, slack: float = memplan.SLACK,
                   shape: str | None = None) -> dict[str, int]:
    """``default_mb`` and ``default_work_mb`` of a model before anything is measured.

    A real model: weights from its published config plus the working memory
    of ``shape`` (default: the model's default shape; a chat pool passes
    ``tokens:OURVIDZ_CHAT_CACHE_TOKENS``, the cache it will allocate) plus
    slack (:func:`ourvidz_tasks.models.memplan.estimate`).
    What the model preallocates at load (the chat KV cache) is in its measured
    weights then, so it is not working memory: ``default_work_mb`` leaves it out.
    """
    if tiny or model not in memplan.sizes()["families"]:
        return {"default_mb": TINY_FIRST_MB, "default_work_mb": TINY_FIRST_WORK_MB}
    e = memplan.estimate(model, shape, slack=slack)
    return {"default_mb": e.total_mb, "default_work_mb": e.work_mb - e.held_mb}


class MeasuredSizes:
    """The sizes measured on one device (the hash ``sizes_key``), and the estimates made from them.

    ``slack``: the allocator's share added to an estimate (a fraction);
    ``window``: how many recent measurements of a job shape count.
    """

    def __init__(self, store: redis.Redis, sizes_key: str, *, slack: float = 0.0, window: int = 5) -> None:
        self.redis, self.sizes_key = store, sizes_key
        self.slack, self.window = slack, max(1, int(window))
        self._recent = register_script(store, lua.source("recent"))

    def record_work(self, model: str, shape_key: str, mb: int) -> int:
        """One measurement of a job shape's working memory (MB above the weights).

        Returns the shape's recent value: the largest of its last ``window``
        measurements (one bad sample ages out; the value can go down).
        """
        return int(self._recent(keys=[self.sizes_key],
                                args=[f"work:{model}:{shape_key}", int(mb), self.window, SIZES_TTL]))

    record_peak = record_work  # the first name of it

    def record_resident(self, model: str, mb: int) -> None:
        """What the first call after a load left allocated (the model's caches; MB): held with the weights.

        Measured again at every load, replacing the last value.
        """
        self._put(f"resident:{model}", max(0, int(mb)))

    def record_weights(self, model: str, mb: int) -> None:
        """The model's weights as loaded (MB): parameter and buffer bytes, exact; replaces the last."""
        self._put(f"weights:{model}", int(mb))

    def sizes(self, model: str) -> dict[str, Any]:
        """What is known of ``model``: ``weights`` (MB or None), ``work`` (recent MB per shape),
        ``first`` (the first measurement per shape), ``samples`` (the last ones, newest first)."""
        raw = {as_text(k): as_text(v) for k, v in self.redis.hgetall(self.sizes_key).items()}
        out: dict[str, Any] = {"weights": None, "resident": 0, "work": {}, "first": {}, "samples": {}}
        if f"weights:{model}" in raw:
            out["weights"] = int(raw[f"weights:{model}"])
        out["resident"] = int(raw.get(f"resident:{model}", 0))
        for key, value in raw.items():
            kind, _, rest = key.partition(":")
            name, _, shape = rest.partition(":")
            if name != model or not shape:
                continue
            try:
                if kind == "work":
                    samples = [int(v) for v in json.loads(value)]
                    out["samples"][shape] = samples
                    out["work"][shape] = max(samples) if samples else 0
                elif kind == "first":
                    out["first"][shape] = int(value)
            except (ValueError, TypeError):  # a value another version wrote: not ours to trust
                log.warning("ledger sizes: unreadable %s, ignored", key)
        return out

    def estimate(self, model: str, default_mb: int, shape: str | None = None, *, default_work_mb: int = 0,
                 idle: bool = False) -> int:
        """What to reserve for ``model``: weights (+ resident caches) + working memory of ``shape`` + slack (MB).

        Working memory: the shape's recent value; an unmeasured shape scaled by the shape model
        (:func:`shape_ratio`) from the measured shapes (the largest such figure), or from the first
        estimate before anything is measured; with no shape (a load), the largest recent value of the
        model's shapes. ``idle``: no working memory (what a loaded model holds between jobs).
        Before anything is measured: ``default_mb`` (the first estimate, ``default_work_mb`` of it
        working memory); measured weights with no working memory yet never reserve less than that.
        """
        known = self.sizes(model)
        weights, works = known["weights"], known["work"]
        scaled = None if idle or shape is None or shape in works else self._scaled(model, shape, works, default_work_mb)
        if idle:
            work: int | None = 0
        elif shape is not None and shape in works:
            work = works[shape]
        elif scaled is not None:
            work = scaled
        else:
            work = max(works.values(), default=None)
        if weights is None and not works:  # the first estimate, its working memory scaled to the shape
            return default_mb - default_work_mb + (work if work is not None else default_work_mb)
        w = (weights + known["resident"]) if weights is not None else max(0, default_mb - default_work_mb)
        total = w + (work if work is not None else default_work_mb)
        total += math.ceil(total * self.slack)
        return total if works or idle else max(default_mb, total)

    def _scaled(self, model: str, shape: str, works: dict[str, int], default_work_mb: int) -> int | None:
        """The working memory of an unmeasured ``shape``: each measured shape scaled by the shape model
        (the largest figure), or the first estimate's scaled from the model's default shape."""
        figures = [mb * ratio for known, mb in works.items() if (ratio := shape_ratio(model, shape, known))]
        if not figures and not works and model in memplan.SHAPES:
            ratio = shape_ratio(model, shape, memplan.SHAPES[model][0])
            figures = [default_work_mb * ratio] if ratio else []
        return math.ceil(max(figures)) if figures else None

    def _put(self, field: str, mb: int) -> None:
        with self.redis.pipeline() as pipe:
            pipe.hset(self.sizes_key, field, mb)
            pipe.expire(self.sizes_key, SIZES_TTL)
            pipe.execute()
