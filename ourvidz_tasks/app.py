"""The Celery application: configured by the top-level ``celeryconfig``."""

from __future__ import annotations

from celery import Celery

from .control import install as install_memory_control

app = Celery(
    "ourvidz_tasks",
    include=["ourvidz_tasks.sdxl", "ourvidz_tasks.chat", "ourvidz_tasks.wan", "ourvidz_tasks.worker",
             "ourvidz_tasks.outbox"],
)
app.config_from_object("celeryconfig")
install_memory_control(app)
