"""One job's live previews: a small WEBP under one storage key, named in ``processing`` callbacks.

A family's step hook (:func:`~ourvidz_tasks.models.previews.latents_hook`) asks
:meth:`PreviewStream.due` after each denoising step and, when it is, decodes the
latents and hands the pixels to :meth:`PreviewStream.offer`. The encode, the upload
(one try: a preview is never worth a wait) and the ``processing`` callback naming it
run on the delivery's preview thread, so the next step never waits for them.

Order and bounds: at most one preview of a job is in flight; one falling due
while the last is still travelling waits for a later step (nothing is decoded
meanwhile), so previews are announced in step order and the key
(``workspace-temp/{user}/{job}/preview.webp``) always holds the newest. At most
``OURVIDZ_PREVIEW_MAX`` per job. :meth:`PreviewStream.close` is called before the
job's terminal callback is recorded: no preview is announced after it, and with
``OURVIDZ_PREVIEW_REMOVE`` the key is deleted (after an upload still in flight).

Nothing here fails or slows the job: an encode, upload or callback error is logged
with the job id alone and that preview is skipped. Previews are never assets.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..contract.settings import Settings

if TYPE_CHECKING:
    import numpy as np

    from .delivery import Delivery

log = logging.getLogger(__name__)

PREVIEW_NAME = "preview.webp"
#: with ``OURVIDZ_PREVIEW_EVERY=0``: about this many previews over a job's steps
DEFAULT_PREVIEWS = 5


def preview_path(bucket: str, user_id: str, job_id: str) -> str:
    """The one storage key of a job's previews: the job's folder, no prompt in it."""
    return f"{bucket}/{user_id}/{job_id}/{PREVIEW_NAME}"


def interval(every: int, total: int) -> int:
    """Steps between two previews: ``every``, or about every 20% of ``total`` when 0."""
    return every if every > 0 else max(1, round(total / DEFAULT_PREVIEWS))


class PreviewStream:
    """The previews of one attempt of one job; see the module docstring."""

    def __init__(self, delivery: Delivery, settings: Settings, user_id: str, job_id: str, attempt: int,
                 percent: Callable[[], int]) -> None:
        from .delivery import BUCKET

        self.delivery, self.job_id, self.attempt, self.percent = delivery, job_id, attempt, percent
        self.every, self.limit, self.remove = settings.preview_every, settings.preview_max, settings.preview_remove
        self.path = preview_path(BUCKET, user_id, job_id)
        self.sent = 0
        self._last = 0
        self._busy = self._closed = self._stored = False
        self._lock = threading.Lock()

    def due(self, step: int, total: int) -> bool:
        """Whether to decode a preview after ``step`` of ``total`` (never at the last step: the result is near)."""
        with self._lock:
            if step < self._last:  # a new run of the job (a stepped-down batch starts again at step 1)
                self._last = 0
            return (not self._closed and not self._busy and self.sent < self.limit and step < total
                    and step - self._last >= interval(self.every, total))

    def offer(self, step: int, total: int, pixels: np.ndarray, fps: int | None = None) -> None:
        """Encode, upload and announce ``pixels`` on the preview thread; returns at once."""
        with self._lock:
            if self._closed or self._busy:
                return
            self._busy, self._last = True, step
            self.sent += 1
            index = self.sent
        try:
            self.delivery.submit_preview(self._send, step, total, index, pixels, fps)
        except RuntimeError:  # the delivery is shutting down
            with self._lock:
                self._busy = False

    def stop(self) -> None:
        """No more previews for this job (a decode failed); what is in flight still lands."""
        with self._lock:
            self.limit = self.sent

    def close(self) -> None:
        """The job ends: nothing is announced after this; with ``preview_remove`` the key goes."""
        with self._lock:
            self._closed = True
            remove = self.remove and self._stored and not self._busy
        if remove:
            self._submit_removal()

    def _send(self, step: int, total: int, index: int, pixels: np.ndarray, fps: int | None) -> None:
        from .media import preview_webp

        stored = False
        try:
            data, width, height = preview_webp(pixels, fps)
            self.delivery.storage.upload(self.path, data, "image/webp", tries=1)
            stored = True
        except Exception as exc:
            log.warning("job %s: preview %d not stored (%s)", self.job_id, index, type(exc).__name__)
        with self._lock:  # under the lock: close() cannot slip the terminal callback in before this one
            if stored and not self._closed:
                preview: dict[str, Any] = {"url": self.path, "step": step, "total": total, "index": index,
                                           "width": width, "height": height}
                if pixels.ndim == 4:
                    preview["frames"] = int(pixels.shape[0])
                try:  # queued behind the job's earlier callbacks; the sender delivers it (best effort)
                    self.delivery.processing(self.job_id, self.attempt, {"progress": self.percent(), "preview": preview})
                except Exception as exc:
                    log.warning("job %s: preview %d not announced (%s)", self.job_id, index, type(exc).__name__)
            self._stored = self._stored or stored
            self._busy = False
            remove = self._closed and self.remove and self._stored
        if remove:
            self._remove()

    def _submit_removal(self) -> None:
        with contextlib.suppress(RuntimeError):  # the delivery is shutting down
            self.delivery.submit_preview(self._remove)

    def _remove(self) -> None:
        try:
            self.delivery.storage.remove(self.path)
        except Exception as exc:
            log.warning("job %s: preview not removed (%s)", self.job_id, type(exc).__name__)
