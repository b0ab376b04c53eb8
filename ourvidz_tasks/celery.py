"""The Celery application, configured by :mod:`ourvidz_tasks.celeryconfig`."""

from __future__ import annotations

from celery import Celery

from .runtime.control import install as install_memory_control

app = Celery(
    "ourvidz_tasks",
    include=["ourvidz_tasks.sdxl", "ourvidz_tasks.chat", "ourvidz_tasks.wan", "ourvidz_tasks.runtime.worker",
             "ourvidz_tasks.outbox"],
)
app.config_from_object("ourvidz_tasks.celeryconfig")
install_memory_control(app)
