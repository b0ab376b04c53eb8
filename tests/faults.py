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

DEVICE_FAULT = "DEVICE-FAULT-ONCE"


def cuda_fault_once(prompt: str) -> None:
    """Raise what a broken CUDA context raises, once per job id seen (tracked in a file by the test)."""
    flag = os.environ.get("OURVIDZ_TEST_FAULT_FLAG")
    if DEVICE_FAULT in prompt and flag and not os.path.exists(flag):
        open(flag, "w").close()
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    default_policy(prompt)
