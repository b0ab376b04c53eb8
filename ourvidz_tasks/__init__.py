"""ourvidz_tasks: the GPU task cluster behind ourvidz (Celery, one queue per model family).

Publishing (``pip install .``, no torch)::

    from ourvidz_tasks import app, enhance, sdxl_generate, wan_generate
    chain(enhance.s(job), sdxl_generate.s()).apply_async()

Those names, and ``chat``, are :mod:`ourvidz_tasks.publish`'s references by task name;
import ``chat`` from there (``ourvidz_tasks.chat`` is the chat pool's task module).
Task names, queues, payloads and callbacks are fixed by CONTRACT.md. Importing the
package loads nothing: each name below is imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "app": ("ourvidz_tasks.publish", "app"),
    "enhance": ("ourvidz_tasks.publish", "enhance"),
    "sdxl_generate": ("ourvidz_tasks.publish", "sdxl_generate"),
    "wan_generate": ("ourvidz_tasks.publish", "wan_generate"),
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
