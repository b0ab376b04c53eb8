"""A job's live previews, from its family's work: :func:`live_previews`.

The pieces are elsewhere: the tiny decoders and the step hook in
:mod:`ourvidz_tasks.models.previews`, the encode, upload and callback in
:mod:`ourvidz_tasks.services.previews`. This joins them for one attempt of one job
and closes the stream when the work returns or raises, so that no preview is
announced after the job's terminal callback.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

from ..contract.jobs import Job
from ..models.previews import LatentsHook, latents_hook
from ..services.previews import PreviewStream
from .lifecycle import Progress
from .runtime import Runtime

if TYPE_CHECKING:
    import numpy as np


@contextmanager
def live_previews(rt: Runtime, job: Job, progress: Progress, decoder: Any,
                  decode: Callable[[Any, Any], np.ndarray], fps: int | None = None) -> Iterator[LatentsHook | None]:
    """The latents hook of this job's previews, or None when they are off (no decoder, ``OURVIDZ_PREVIEWS=0``)."""
    if decoder is None or not rt.settings.previews:
        yield None
        return
    stream = PreviewStream(rt.delivery, rt.settings, job.user_id or "", progress.job_id, progress.attempt,
                           lambda: progress.percent)
    try:
        yield latents_hook(stream, partial(decode, decoder), fps)
    finally:
        stream.close()
