"""Fault injection for tests: the prompt-policy seam (`OURVIDZ_PROMPT_POLICY`), runtime plug-ins
(`OURVIDZ_RUNTIME_PLUGINS`) and bridge plug-ins (`OURVIDZ_BRIDGE_PLUGINS`)."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ourvidz_tasks.services.policy import default_policy

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


# -- attempt hooks (OURVIDZ_RUNTIME_PLUGINS=tests.faults:inject) --------------------------------------

#: the rules file the test writes; read by the hook at each attempt (test code only)
RULES_ENV = "OURVIDZ_TEST_FAULT_RULES"


def inject(rt: Any) -> None:
    """A runtime plug-in: raise what the rules in ``$OURVIDZ_TEST_FAULT_RULES`` (a JSON list) say.

    A rule ``{"stage": "txt2img", "remedies": ["batch"], "min_batch": 2, "error": "oom", "times": 1}``
    matches attempts of that stage (``"*"``: any) whose remedy is listed (absent: any) and whose batch
    is at least ``min_batch``; ``error`` is ``oom`` (``torch.OutOfMemoryError``), ``cuda`` (a
    ``RuntimeError("CUDA error: ...")`` wrapped in another exception, as a library would) or
    ``accelerator`` (``torch.AcceleratorError``). ``times`` (absent: always) counts down in the file,
    so a requeued job runs clean on the next worker. Every firing is appended to ``<rules>.log``.
    """
    path = os.environ.get(RULES_ENV)
    if path:
        rt.attempt_hooks.append(lambda attempt: _fire(Path(path), attempt))


def fail_loads(rt: Any) -> None:
    """A runtime plug-in: every model load of this worker hits a CUDA error (wrapped as a load error)."""
    for slot in rt.models.values():
        def broken() -> Any:
            try:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            except RuntimeError as exc:
                raise ValueError("could not move the weights") from exc
        slot._loader = broken


def _fire(path: Path, attempt: Any) -> None:
    import torch

    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rules = json.loads(path.read_text()) if path.exists() else []
        for rule in rules:
            if rule.get("stage", "*") not in ("*", attempt.stage):
                continue
            if "remedies" in rule and attempt.remedy not in rule["remedies"]:
                continue
            if attempt.batch < rule.get("min_batch", 0) or rule.get("times", 1) <= 0:
                continue
            if "times" in rule:
                rule["times"] -= 1
                path.write_text(json.dumps(rules))
            with open(path.with_suffix(".log"), "a") as log:
                log.write(json.dumps({**asdict(attempt), "error": rule["error"]}) + "\n")
            break
        else:
            return
    if rule["error"] == "oom":
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
    if rule["error"] == "accelerator":
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
    try:
        raise RuntimeError("CUDA error: device-side assert triggered")
    except RuntimeError as exc:
        raise ValueError("the pipeline failed") from exc  # found by following __cause__


def fired(path: Path) -> list[dict[str, Any]]:
    """The attempts the hook raised on, in order."""
    log = path.with_suffix(".log")
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def set_rules(path: Path, *rules: dict[str, Any]) -> None:
    """Replace the rules (none: no fault) and forget what fired."""
    path.write_text(json.dumps(list(rules)))
    path.with_suffix(".log").unlink(missing_ok=True)


def fault_env(broker: str, rules: Path, **extra: str) -> dict[str, str]:
    """Worker settings for a pool on ``broker`` with the fault plug-in reading ``rules``.

    The lease is short, so a crashed worker's job comes back within seconds, but not so short
    that a busy 2-core machine (each OOM remedy runs a full ``gc.collect``) lets a live
    worker's heartbeat lapse and its held retries get redelivered.
    """
    return {"OURVIDZ_BROKER_URL": broker, "OURVIDZ_RUNTIME_PLUGINS": "tests.faults:inject",
            RULES_ENV: str(rules), "OURVIDZ_LEASE_SECONDS": "6", **extra}


# -- bridge step hooks (OURVIDZ_BRIDGE_PLUGINS=tests.faults:crash_bridge) -----------------------------

#: the step of ``bin/bridge`` after which it dies: ``move``, ``claim`` or ``publish``
CRASH_AT_ENV = "OURVIDZ_TEST_BRIDGE_CRASH_AT"
#: the status it dies with
CRASH_STATUS = 70


def crash_bridge(bridge: Any) -> None:
    """A bridge plug-in: the process ends at once (no cleanup) right after the step in ``$OURVIDZ_TEST_BRIDGE_CRASH_AT``."""
    point = os.environ.get(CRASH_AT_ENV)
    if point:
        bridge.step_hooks.append(lambda step: _crash(step) if step == point else None)


def _crash(step: str) -> None:
    logging.getLogger("tests.faults").warning("crash plug-in: exiting right after the %s step", step)
    logging.shutdown()
    os._exit(CRASH_STATUS)


# -- the broker fetch (OURVIDZ_RUNTIME_PLUGINS=tests.faults:cut_fetch) -----------------------------------

#: ``cut:<task id>`` or ``die:<task id>``: what :func:`cut_fetch` does to that task's first fetch
FETCH_FAULT_ENV = "OURVIDZ_TEST_FETCH_FAULT"


def cut_fetch(rt: Any) -> None:
    """A runtime plug-in: between the broker fetch of one task's message and kombu's ``unacked`` record,
    the connection is cut (``cut``: the record's write fails as on a dropped socket) or the process dies
    (``die``: SIGKILL). Once per worker process and task (``$OURVIDZ_TEST_FAULT_FLAG`` marks it fired)."""
    import redis

    from ourvidz_tasks.services.guard import hooks

    action, _, task_id = os.environ.get(FETCH_FAULT_ENV, "").partition(":")
    flag = os.environ.get("OURVIDZ_TEST_FAULT_FLAG")
    if not task_id or not flag:
        return

    def fire(payload: dict[str, Any]) -> None:
        if payload.get("headers", {}).get("id") != task_id or os.path.exists(flag):
            return
        Path(flag).write_text(action)
        if action == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        raise redis.ConnectionError("connection cut between the fetch and the unacked record (test fault)")

    hooks.fetched = fire
