"""Fault injection through the prompt-policy seam (``OURVIDZ_PROMPT_POLICY``), for tests only."""

from __future__ import annotations

import os
import signal

from ourvidz_tasks.policy import default_policy

MARKER = "POISON-KILLS-WORKER"


def kill_on_marker(prompt: str) -> None:
    """SIGKILL this worker when the prompt carries the marker; else the default policy."""
    if MARKER in prompt:
        os.kill(os.getpid(), signal.SIGKILL)
    default_policy(prompt)
