"""Worker-side pieces of ``bench/dispatch.py`` (imported by the workers it starts, never by the bench).

- the probe (``-I bench.dispatch_worker``): time stamps (``time.time()``) of each stage a message goes
  through in this process, per task, written to ``$OURVIDZ_BENCH_PROBE`` when the worker shuts down
  (:data:`STAGES`). It wraps library and project functions from outside (a bench seam: nothing in the
  worker knows of it), the same wrappers in both workers where the code is shared (kombu, Celery,
  httpx), and ours' own steps in ours;
- the bare Celery app (``-A bench.dispatch_worker``): one task that sends the same signed ``processing``
  callback, then a terminal one (the same bytes a user would sign with the contract's recipe), nothing else.

Stages, in the order a message meets them (the first time each is reached for the task):

``deliver``
    the Redis fetch returned and the message was decoded (kombu's virtual ``Transport._deliver``; Redis only)
``unacked`` / ``unacked_end``
    the message recorded in kombu's ``unacked`` hash (``QoS.append``; ours also takes it out of its
    processing list in the same transaction; Redis only)
``consume``
    kombu hands the message to Celery's consumer (``Consumer._receive_callback``; both brokers)
``received_first`` / ``received_last``
    the ``task_received`` signal, before and after every other receiver (ours: the owner record)
``prerun_first`` / ``prerun_last``
    the ``task_prerun`` signal, before and after every other receiver (ours: task events, the job gate)
``body``
    the task's own code starts (ours: ``JobTask.execute``, after ``before_start``)
``admit`` / ``admit_end``
    ours: the admission round trips (claim, then terminal record, poison count and cancel flag)
``processing``
    ours: the ``processing`` body built and handed to the sender thread
``send``
    ours: the sender thread starts the callback
``sign``
    the callback's signature computed (both; the bare task also builds its body here)
``post``
    the HTTP POST of the callback starts (``httpx.Client.post``; both)

and after the task, until the next message opens a new record:

``postrun_first`` / ``postrun_last``
    the ``task_postrun`` signal, before and after every other receiver (ours: owner record, job gate)
``ack`` / ``ack_end``
    the message acknowledged (``kombu.Message.ack``); the worker fetches again after it
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import os
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from celery import Celery, signals
from celery.utils.dispatch import Signal

#: task id -> stage -> time.time()
STAGES: dict[str, dict[str, float]] = {}
_lock = threading.Lock()
#: the record of the last message (None before the first): stamps go to it until the next message arrives
_current: dict[str, float] | None = None


def mark(stage: str, *, opens: bool = False) -> None:
    """Stamp ``stage`` on the message in flight (its first time only).

    ``opens``: a message arrives here; it starts a new record unless the one in flight is still before
    this stage (a Redis message meets ``deliver``, then ``consume``). A message that never becomes a task
    (a control broadcast) leaves a record no task binds; the next message starts afresh.
    """
    global _current
    now = time.time()
    with _lock:
        if opens and (_current is None or stage in _current):
            _current = {}
        if _current is not None:
            _current.setdefault(stage, now)


def _bind(task_id: str | None) -> None:
    with _lock:
        if _current is not None and task_id:
            STAGES[str(task_id)] = _current


def stamped(owner: Any, name: str, stage: str, *, end: str | None = None, opens: bool = False,
            when: Callable[..., bool] | None = None) -> None:
    """Wrap ``owner.name`` to stamp ``stage`` on entry (and ``end`` on return)."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if when is None or when(*args, **kwargs):
            mark(stage, opens=opens)
        try:
            return original(*args, **kwargs)
        finally:
            if end is not None:
                mark(end)

    setattr(owner, name, wrapper)


def bracket(signal: Signal, stage: str) -> None:
    """Receivers of ``signal`` that stamp ``{stage}_first`` before every other one and ``{stage}_last`` after."""
    def first(**_: Any) -> None:
        mark(f"{stage}_first")

    def last(**_: Any) -> None:
        mark(f"{stage}_last")

    signal.connect(first, weak=False)
    signal.receivers.insert(0, signal.receivers.pop())
    signal.connect(last, weak=False)
    signal.sender_receivers_cache.clear()
    _KEEP.extend((first, last))


_KEEP: list[Callable[..., None]] = []


def _is_callback(_client: Any, url: Any, *_: Any, **__: Any) -> bool:
    return str(url).endswith("/functions/v1/job-callback")


def _shared() -> None:
    """The wrappers both workers get: kombu, Celery's signals, httpx."""
    from kombu import message, messaging
    from kombu.transport import redis as kombu_redis
    from kombu.transport import virtual

    stamped(virtual.Transport, "_deliver", "deliver", opens=True)
    stamped(kombu_redis.QoS, "append", "unacked", end="unacked_end")
    stamped(messaging.Consumer, "_receive_callback", "consume", opens=True)
    stamped(httpx.Client, "post", "post", when=_is_callback)
    stamped(message.Message, "ack", "ack", end="ack_end")
    bracket(signals.task_received, "received")
    bracket(signals.task_prerun, "prerun")
    bracket(signals.task_postrun, "postrun")


def _ours() -> None:
    """Our steps: the guard's QoS, the task body, admission, the processing callback."""
    from ourvidz_tasks.runtime import lifecycle, tasks
    from ourvidz_tasks.services import delivery, guard

    stamped(guard.QoS, "append", "unacked", end="unacked_end")
    stamped(tasks.JobTask, "execute", "body")
    stamped(lifecycle, "admit", "admit", end="admit_end")
    stamped(delivery.Delivery, "processing", "processing")
    stamped(delivery.Delivery, "_send", "send")
    stamped(delivery, "sign", "sign")


@signals.task_received.connect
def _received(request: Any = None, **_: Any) -> None:
    _bind(getattr(request, "id", None))


@signals.worker_shutdown.connect
def _dump(**_: Any) -> None:
    target = os.environ.get("OURVIDZ_BENCH_PROBE")
    if target:
        Path(target).write_text(json.dumps(STAGES))


if os.environ.get("OURVIDZ_BENCH_PROBE"):
    _shared()
    if os.environ.get("OURVIDZ_BENCH_OURS"):
        _ours()


app = Celery("bare", broker=os.environ.get("OURVIDZ_BROKER_URL"))
app.conf.update(task_serializer="json", accept_content=["json"], worker_prefetch_multiplier=1,
                task_ignore_result=True, broker_connection_retry_on_startup=True)
_client = httpx.Client(follow_redirects=False)
_URL = os.environ.get("SUPABASE_URL", "").rstrip("/") + "/functions/v1/job-callback"
_KEY = os.environ.get("SUPABASE_SERVICE_KEY", "")
_SECRET = os.environ.get("JOB_CALLBACK_SECRET", "").encode()


def _post(job_id: str, status: str, **extra: Any) -> None:
    """The contract's callback as a user would write it: compact JSON, HMAC-SHA256 of the exact bytes."""
    mark("sign")
    metadata = {"callback_id": uuid.uuid4().hex, "attempt": 1}
    body = json.dumps({"job_id": job_id, "worker_id": "bare@bench", "status": status, "assets": [],
                       "metadata": metadata, **extra}, separators=(",", ":")).encode()
    headers = {"Authorization": f"Bearer {_KEY}", "Content-Type": "application/json",
               "X-Callback-Signature": "sha256=" + hmac.new(_SECRET, body, hashlib.sha256).hexdigest()}
    _client.post(_URL, content=body, headers=headers).raise_for_status()


@app.task(name="bench.bare")
def bare(job: dict[str, Any]) -> None:
    """What a bare Celery task does for the same job: ``processing``, then its terminal callback."""
    mark("body")
    _post(job["id"], "processing")
    _post(job["id"], "completed")
