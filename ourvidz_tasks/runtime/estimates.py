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


def first_estimate(model: str, *, tiny: bool = False, slack: float = memplan.SLACK) -> dict[str, int]:
    """``default_mb`` and ``default_work_mb`` of a model before anything is measured.

    A real model: weights from its published config plus its default job
    shape's working memory plus slack (:func:`ourvidz_tasks.models.memplan.estimate`).
    """
    if tiny or model not in memplan.sizes()["families"]:
        return {"default_mb": TINY_FIRST_MB, "default_work_mb": TINY_FIRST_WORK_MB}
    e = memplan.estimate(model, slack=slack)
    return {"default_mb": e.total_mb, "default_work_mb": e.work_mb}


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

    def estimate(self, model: str, default_mb: int, shape: str | None = None, *, default_work_mb: int = 0) -> int:
        """What to reserve for ``model``: weights (+ resident caches) + working memory of ``shape`` + slack (MB).

        Working memory: the shape's recent value; an unmeasured shape (or
        none given) takes the largest recent value of the model's shapes.
        Before anything is measured: ``default_mb`` (the first estimate,
        ``default_work_mb`` of it working memory); measured weights with no
        working memory yet never reserve less than that first estimate.
        """
        known = self.sizes(model)
        weights, works = known["weights"], known["work"]
        work = works.get(shape) if shape is not None and shape in works else max(works.values(), default=None)
        if weights is None and work is None:
            return default_mb
        w = (weights + known["resident"]) if weights is not None else max(0, default_mb - default_work_mb)
        total = w + (work if work is not None else default_work_mb)
        total += math.ceil(total * self.slack)
        return total if work is not None else max(default_mb, total)

    def _put(self, field: str, mb: int) -> None:
        with self.redis.pipeline() as pipe:
            pipe.hset(self.sizes_key, field, mb)
            pipe.expire(self.sizes_key, SIZES_TTL)
            pipe.execute()
