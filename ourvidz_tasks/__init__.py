"""ourvidz_tasks: the GPU task cluster behind ourvidz (Celery, one queue per model family).

Public surface::

    from ourvidz_tasks import app, sdxl_generate, wan_generate, chat, enhance
    chain(enhance.s(job), sdxl_generate.s()).apply_async()

Task names, queues, payloads and callbacks are fixed by CONTRACT.md.
"""

from .app import app
from .chat import chat, enhance
from .errors import ConfigError, JobError, OurvidzError
from .sdxl import generate as sdxl_generate
from .settings import Settings, load_settings
from .wan import generate as wan_generate

__all__ = [
    "ConfigError", "JobError", "OurvidzError", "Settings", "app", "chat", "enhance",
    "load_settings", "sdxl_generate", "wan_generate",
]
