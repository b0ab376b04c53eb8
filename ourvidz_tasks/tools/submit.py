"""What ``ourvidz submit`` does: build a job from a file and flags, publish it, follow it.

Following: the callback goes to Supabase, which the command cannot see. It
follows the Celery task through the result backend instead: queued, started,
then the PROGRESS state as a progress bar (:mod:`~ourvidz_tasks.services.progress`),
and finally the task's result: the very callback body the worker sent.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from ..contract import names
from ..contract.errors import ConfigError
from ..contract.settings import Settings
from ..services.progress import PROGRESS, progress_text


def build_job(source: str | None, *, job_type: str | None, prompt: str | None, user_id: str | None,
              job_id: str | None, sets: Sequence[str]) -> dict[str, Any]:
    """The job from a file (or stdin) and flags; flags win; an id is made up if none is given."""
    job: dict[str, Any] = {}
    if source:
        text = sys.stdin.read() if source == "-" else Path(source).read_text()
        loaded = json.loads(text)
        if not isinstance(loaded, dict):
            raise ConfigError(f"{source}: a job is a JSON object, got {type(loaded).__name__}")
        job.update(loaded)
    for key, value in (("type", job_type), ("prompt", prompt), ("user_id", user_id), ("id", job_id)):
        if value is not None:
            job[key] = value
    for item in sets:
        path, sep, raw = item.partition("=")
        if not sep or not path:
            raise ConfigError(f"--set wants KEY=VALUE (e.g. config.seed=7), got {item!r}")
        _assign(job, path.split("."), _value(raw))
    if not job.get("id") and not job.get("job_id"):
        job["id"] = str(uuid.uuid4())
    return job


def _value(raw: str) -> Any:
    """JSON when it parses (7, true, null, [1,2]), else the text itself."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _assign(target: dict[str, Any], path: list[str], value: Any) -> None:
    for part in path[:-1]:
        child = target.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {'.'.join(path)}: {part!r} is not an object")
        target = child
    target[path[-1]] = value


def publish(job: dict[str, Any], settings: Settings, *, enhance: bool) -> Any:
    """Validate with the workers' rules, then publish; returns the AsyncResult to follow."""
    from celery import chain

    from ..celery import app
    from ..contract.jobs import parse_job

    parsed = parse_job(job, settings)
    family = parsed.family
    generate = app.signature(names.GENERATE[str(family)])
    if enhance:
        return chain(app.signature(names.CHAT_ENHANCE, args=(job,)), generate).apply_async()
    return generate.clone(args=(job,)).apply_async()


class ProgressLine:
    """One status line: redrawn in place on a terminal, one line per change otherwise."""

    def __init__(self, stream: TextIO, label: str) -> None:
        self.stream, self.label = stream, label
        self.tty = stream.isatty()
        self.last = ""

    def show(self, text: str) -> None:
        if text == self.last:
            return
        self.last = text
        line = f"{self.label}  {text}"
        self.stream.write(f"\r\033[K{line}" if self.tty else f"{line}\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self.last:
            self.stream.write("\n")
            self.stream.flush()


def follow(result: Any, line: ProgressLine, timeout: float, interval: float) -> tuple[str, Any]:
    """Poll the result backend until the task is ready; returns ``(state, result or error)``."""
    backend = result.backend
    deadline = time.monotonic() + timeout
    while True:
        meta = backend.get_task_meta(result.id)
        state, info = meta.get("status"), meta.get("result")
        if state in ("SUCCESS", "FAILURE"):
            status = info.get("status") if isinstance(info, dict) else None
            line.show(f"{status or state.lower()}")
            return state, info
        if state == PROGRESS and isinstance(info, dict):
            line.show(progress_text(info))
        elif state == "STARTED":
            host = info.get("hostname") if isinstance(info, dict) else None
            line.show(f"started on {host}" if host else "started")
        elif state == "RETRY":
            line.show(f"retrying ({error_text(info)})")
        elif result.parent is not None and not result.parent.ready():
            line.show("enhancing the prompt")
        else:
            line.show("queued")
        if time.monotonic() >= deadline:
            return "TIMEOUT", None
        time.sleep(interval)


def error_text(info: Any) -> str:
    """An exception as the result backend keeps it (``exc_type``, ``exc_message``), as one line."""
    if isinstance(info, dict) and "exc_type" in info:
        message = info.get("exc_message")
        text = " ".join(map(str, message)) if isinstance(message, list | tuple) else str(message or "")
        return f"{info['exc_type']}: {text}".rstrip(": ")
    return str(info)
