"""The Celery application, configured by :mod:`ourvidz_tasks.celeryconfig`.

Importing it loads Celery and the configuration only (publishers, Flower, the CLI). A worker
imports its role's task module (``include``; ``bin/worker`` narrows it to the role's own),
and that module registers the worker side: :mod:`ourvidz_tasks.runtime.signals`. The pools'
remote-control commands are known here by name only (:mod:`ourvidz_tasks.services.commands`), so
``celery -A ourvidz_tasks inspect memory_status`` is recognized; a pool implements them.
"""

from __future__ import annotations

from celery import Celery

from .services.commands import declare
from .services.tracing import setup as setup_tracing

app = Celery(
    "ourvidz_tasks",
    include=["ourvidz_tasks.sdxl", "ourvidz_tasks.chat", "ourvidz_tasks.wan", "ourvidz_tasks.outbox"],
    # messages of our tasks name the job id, never a prompt, whoever sends them
    amqp="ourvidz_tasks.services.redact:QuietAMQP",
)
app.config_from_object("ourvidz_tasks.celeryconfig")
# the pools' remote-control commands by name: Celery's CLI checks them in the caller's process
declare()
# one trace per job when OTEL_EXPORTER_OTLP_ENDPOINT is set (services/tracing.py); nothing otherwise
setup_tracing("ourvidz")
