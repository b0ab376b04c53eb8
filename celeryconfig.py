"""Celery's conventional ``celeryconfig`` module: the cluster's configuration lives in
:mod:`ourvidz_tasks.celeryconfig`; this file re-exports it for ``celery --config``
and ``app.config_from_object("celeryconfig")`` run from a checkout. It is not installed."""

from ourvidz_tasks.celeryconfig import *  # noqa: F403
