"""The Celery application, configured by :mod:`ourvidz_tasks.celeryconfig`.

Importing it loads Celery and the configuration only (publishers, Flower, the CLI). A worker
imports its role's task module (``include``; ``bin/worker`` narrows it to the role's own),
and that module registers the worker side: :mod:`ourvidz_tasks.runtime.signals`.
"""

from __future__ import annotations

from celery import Celery

from .services.tracing import setup as setup_tracing

app = Celery(
    "ourvidz_tasks",
    include=["ourvidz_tasks.sdxl", "ourvidz_tasks.chat", "ourvidz_tasks.wan", "ourvidz_tasks.outbox"],
    # messages of our tasks name the job id, never a prompt, whoever sends them
    amqp="ourvidz_tasks.services.redact:QuietAMQP",
)
app.config_from_object("ourvidz_tasks.celeryconfig")
# one trace per job when OTEL_EXPORTER_OTLP_ENDPOINT is set (services/tracing.py); nothing otherwise
setup_tracing("ourvidz")
