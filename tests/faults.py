"""Fault injection for tests: the prompt-policy seam (`OURVIDZ_PROMPT_POLICY`), runtime plug-ins
(`OURVIDZ_RUNTIME_PLUGINS`) and bridge plug-ins (`OURVIDZ_BRIDGE_PLUGINS`)."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import time
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


GATE = "GATED-JOB"
#: a folder: a job whose prompt carries :data:`GATE` writes ``entered-<pid>`` there, then waits for ``open``
GATE_ENV = "OURVIDZ_TEST_GATE"


def gate_on_marker(prompt: str) -> None:
    """Hold a marked job in its worker until the test opens the gate: an event, not a sleep, to act on."""
    gate = os.environ.get(GATE_ENV)
    if GATE in prompt and gate:
        Path(gate, f"entered-{os.getpid()}").touch()
        while not Path(gate, "open").exists():
            time.sleep(0.05)
    default_policy(prompt)


def gate_entered(gate: Path) -> list[int]:
    """The pids of the workers that reached the gate, in the order they did."""
    entered = sorted(gate.glob("entered-*"), key=lambda p: p.stat().st_mtime_ns)
    return [int(p.name.split("-", 1)[1]) for p in entered]

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


#: where :func:`record_holdings` appends what the ledger holds for the pool at each model call
HOLD_LOG_ENV = "OURVIDZ_TEST_HOLD_LOG"


def record_holdings(rt: Any) -> None:
    """A runtime plug-in: before every model call, append the pool's MB in the ledger (as the other
    pools see it, read from Redis) to ``$OURVIDZ_TEST_HOLD_LOG``, one JSON line per call."""
    path = os.environ.get(HOLD_LOG_ENV)
    if path and rt.ledger is not None:
        def hook(attempt: Any) -> None:
            held = sum(rt.ledger.holders(rt.family).values())
            with open(path, "a") as log:
                log.write(json.dumps({"batch": attempt.batch, "stage": attempt.stage, "held_mb": held}) + "\n")

        rt.attempt_hooks.append(hook)


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


# -- broker windows (OURVIDZ_RUNTIME_PLUGINS=tests.faults:broker_windows) -----------------------------

#: the folder of the windows plug-in: ``rules.json`` written by the test, ``hit-N`` / ``go-N`` handshakes
WINDOWS_ENV = "OURVIDZ_TEST_WINDOWS"
#: the longest a worker waits in a window for the test to let it go on
WINDOW_HOLD = 120.0


def broker_windows(rt: Any) -> None:
    """A runtime plug-in that stops the worker in chosen windows of chosen jobs until the test lets it go.

    ``$OURVIDZ_TEST_WINDOWS/rules.json`` is a list of ``{"job": id, "at": "step", "step": k}``
    (right after denoising step k), ``{"job": id, "at": "uploaded"}`` (every file stored, before
    the terminal callback) or ``{"job": id, "at": "acked"}`` (the callback sent, before the
    message's ack: Celery's ``task_postrun``). Each rule fires once, the first time its window is
    reached: the worker writes ``hit-N`` (N: the rule's index) and waits for ``go-N``. The test
    restarts Redis in between, so each window is hit on purpose and a failure replays.
    """
    from celery import signals

    from ourvidz_tasks.services import events

    folder = os.environ.get(WINDOWS_ENV)
    if not folder:
        return
    where = Path(folder)

    def step(sender: Any = None, job_id: str = "", step: int = 0, **_: Any) -> None:
        _window(where, job_id, "step", step)

    def uploaded(sender: Any = None, job_id: str = "", **_: Any) -> None:
        _window(where, job_id, "uploaded")

    def postrun(sender: Any = None, args: Any = None, **_: Any) -> None:
        payload = args[0] if args else None
        if isinstance(payload, dict):
            _window(where, str(payload.get("id")), "acked")

    events.job_step.connect(step, weak=False)
    events.job_uploaded.connect(uploaded, weak=False)
    signals.task_postrun.connect(postrun, weak=False)


def _window(where: Path, job_id: str, at: str, step: int | None = None) -> None:
    import time

    rules = json.loads((where / "rules.json").read_text())
    for index, rule in enumerate(rules):
        if rule["job"] != job_id or rule["at"] != at or rule.get("step") != step:
            continue
        try:
            (where / f"fired-{index}").open("x").close()  # once per rule, across restarts of the worker
        except FileExistsError:
            continue
        logging.getLogger("tests.faults").warning("window %d: job %s at %s %s", index, job_id, at, step or "")
        (where / f"hit-{index}").touch()
        deadline = time.monotonic() + WINDOW_HOLD
        while not (where / f"go-{index}").exists() and time.monotonic() < deadline:
            time.sleep(0.02)  # a handshake poll, not a timing window: the test decides when to go on
        return


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
