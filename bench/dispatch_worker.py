"""Worker-side pieces of ``bench/dispatch.py`` (imported by the workers it starts, never by the bench).

- the probe (``-I bench.dispatch_worker``): records ``time.time()`` when each task starts (the last
  ``task_prerun`` receiver, so after every handler of ours) and writes them to
  ``$OURVIDZ_BENCH_PROBE`` when the worker shuts down;
- the bare Celery app (``-A bench.dispatch_worker``): one task that sends the same signed ``processing``
  callback, then a terminal one (the same bytes a user would sign with the contract's recipe), nothing else.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from celery import Celery, signals

STARTS: dict[str, float] = {}


@signals.task_prerun.connect
def _started(task_id: str | None = None, **_: Any) -> None:
    STARTS[str(task_id)] = time.time()


@signals.worker_shutdown.connect
def _dump(**_: Any) -> None:
    target = os.environ.get("OURVIDZ_BENCH_PROBE")
    if target:
        Path(target).write_text(json.dumps(STARTS))


app = Celery("bare", broker=os.environ.get("OURVIDZ_BROKER_URL"))
app.conf.update(task_serializer="json", accept_content=["json"], worker_prefetch_multiplier=1,
                task_ignore_result=True, broker_connection_retry_on_startup=True)
_client = httpx.Client(follow_redirects=False)
_URL = os.environ.get("SUPABASE_URL", "").rstrip("/") + "/functions/v1/job-callback"
_KEY = os.environ.get("SUPABASE_SERVICE_KEY", "")
_SECRET = os.environ.get("JOB_CALLBACK_SECRET", "").encode()


def _post(job_id: str, status: str, **extra: Any) -> None:
    """The contract's callback as a user would write it: compact JSON, HMAC-SHA256 of the exact bytes."""
    metadata = {"callback_id": uuid.uuid4().hex, "attempt": 1}
    body = json.dumps({"job_id": job_id, "worker_id": "bare@bench", "status": status, "assets": [],
                       "metadata": metadata, **extra}, separators=(",", ":")).encode()
    headers = {"Authorization": f"Bearer {_KEY}", "Content-Type": "application/json",
               "X-Callback-Signature": "sha256=" + hmac.new(_SECRET, body, hashlib.sha256).hexdigest()}
    _client.post(_URL, content=body, headers=headers).raise_for_status()


@app.task(name="bench.bare")
def bare(job: dict[str, Any]) -> None:
    """What a bare Celery task does for the same job: ``processing``, then its terminal callback."""
    _post(job["id"], "processing")
    _post(job["id"], "failed", error={"code": "INVALID_JOB", "message": "bench", "retryable": False})
