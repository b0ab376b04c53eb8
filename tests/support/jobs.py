"""Job ids, a tiny SDXL job, and the terminal callbacks the sink received."""

from __future__ import annotations

import uuid
from collections import Counter
from typing import TYPE_CHECKING, Any

from ourvidz_tasks.contract.names import SDXL_GENERATE

from .process import wait_for

if TYPE_CHECKING:
    from devtools.sink import Sink

#: the task the tiny jobs go to
TASK = SDXL_GENERATE


def new_id() -> str:
    return uuid.uuid4().hex


def tiny_job(steps: int = 2, size: str = "256x256", prompt: str = "a tiny harbour at dusk") -> dict[str, Any]:
    """An SDXL job small enough for the tiny model on a CPU."""
    return {"id": new_id(), "type": "sdxl_image_fast", "user_id": "user_123", "prompt": prompt,
            "config": {"resolution": size, "num_inference_steps": steps, "seed": 5}}


def terminal(sink: Sink, job_id: str, timeout: float = 180) -> dict[str, Any]:
    """The job's terminal callback body (waits for it)."""
    def find() -> dict[str, Any] | None:
        for call in sink.callbacks(job_id):
            if call["body"]["status"] in ("completed", "failed"):
                return call["body"]
        return None

    return wait_for(find, timeout, what=f"terminal callback of {job_id}")


def terminal_counts(sink: Sink, ids: list[str]) -> Counter[str]:
    """How many terminal callbacks each job got (exactly one is right)."""
    counts: Counter[str] = Counter({job_id: 0 for job_id in ids})
    for job_id in ids:
        counts[job_id] += sum(c["body"]["status"] in ("completed", "failed") for c in sink.callbacks(job_id))
    return counts
