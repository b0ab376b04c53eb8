"""ourvidz_tasks: the GPU task cluster behind ourvidz (Celery, one queue per model family).

Public surface::

    from ourvidz_tasks import app, sdxl_generate, wan_generate, chat, enhance
    chain(enhance.s(job), sdxl_generate.s()).apply_async()

Task names, queues, payloads and callbacks are fixed by CONTRACT.md. Importing the
package loads nothing: each name is imported on first use, so a publisher that only
needs :mod:`ourvidz_tasks.contract` (or ``app.send_task`` by name) never loads the
worker side.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "app": ("ourvidz_tasks.celery", "app"),
    "chat": ("ourvidz_tasks.chat", "chat"),
    "enhance": ("ourvidz_tasks.chat", "enhance"),
    "sdxl_generate": ("ourvidz_tasks.sdxl", "generate"),
    "wan_generate": ("ourvidz_tasks.wan", "generate"),
    "ConfigError": ("ourvidz_tasks.contract.errors", "ConfigError"),
    "JobError": ("ourvidz_tasks.contract.errors", "JobError"),
    "OurvidzError": ("ourvidz_tasks.contract.errors", "OurvidzError"),
    "Settings": ("ourvidz_tasks.contract.settings", "Settings"),
    "load_settings": ("ourvidz_tasks.contract.settings", "load_settings"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ourvidz_tasks' has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value
