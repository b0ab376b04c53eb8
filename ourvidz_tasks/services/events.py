"""Signals for cross-cutting concerns (metrics, audit): connect, don't patch.

Every signal is sent with ``sender`` = the family name (``"sdxl"``, ``"chat"``,
``"wan"``) and keyword arguments only; receivers must be quick and must not
raise (Celery's dispatcher logs and swallows receiver errors).
"""

from __future__ import annotations

from celery.utils.dispatch import Signal

#: A generation job ended: ``job_id, job_type, status ("completed"|"failed"),
#: code (error code or None), processing_time, model_time, delivery_time, queue_wait, gpu_seconds``
#: (seconds, or None; ``gpu_seconds``: the model time of every attempt of the job).
job_finished = Signal(name="ourvidz.job_finished")

#: A model was loaded: ``model, seconds, nbytes``.
model_loaded = Signal(name="ourvidz.model_loaded")

#: A model was unloaded: ``model, freed_bytes``.
model_unloaded = Signal(name="ourvidz.model_unloaded")

#: A callback could not be delivered after every try: ``job_id, status``.
callback_failed = Signal(name="ourvidz.callback_failed")

#: A job's model call finished denoising step ``step`` of ``total``: ``job_id, step, total``
#: (observers and test fault seams; sent before the step's progress callback).
job_step = Signal(name="ourvidz.job_step")

#: Every file of a job is in storage; its terminal callback comes next: ``job_id``.
job_uploaded = Signal(name="ourvidz.job_uploaded")
