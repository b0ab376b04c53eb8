"""A running job's progress as one line of text, for the operator tools (``ourvidz submit``, Flower).

While a job runs, its Celery task is in the :data:`PROGRESS` state, whose
result is the progress meta the workers send (``job_id, percent, step,
total, stage``); :func:`progress_text` draws it as a bar.
"""

from __future__ import annotations

from typing import Any

#: the Celery state of a running job's task; its result is the progress meta
PROGRESS = "PROGRESS"
#: blocks in the bar
BAR_WIDTH = 10


def progress_text(meta: dict[str, Any]) -> str:
    """``[██████░░░░] 60% · step 9/15 · generating`` for a PROGRESS meta."""
    try:
        percent = max(0, min(100, int(meta.get("percent") or 0)))
    except (TypeError, ValueError):
        percent = 0
    # any progress shows a block, only 100% a full bar
    if 0 < percent < 100:
        filled = min(max(round(BAR_WIDTH * percent / 100), 1), BAR_WIDTH - 1)
    else:
        filled = BAR_WIDTH if percent == 100 else 0
    parts = [f"[{'█' * filled}{'░' * (BAR_WIDTH - filled)}] {percent}%"]
    if meta.get("total"):
        parts.append(f"step {meta.get('step')}/{meta.get('total')}")
    if meta.get("stage"):
        parts.append(str(meta["stage"]))
    return " · ".join(parts)
