"""The test run's environment: a private Redis database, the variables every process gets.

Imported first by ``conftest.py``: the environment is set before ``ourvidz_tasks``
is imported (its Celery configuration reads it at import), so the publisher in
the test process and the workers it starts share one broker database that no
other test run uses.
"""

from __future__ import annotations

import os
import secrets
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import redis

from ourvidz_tasks.contract.text import as_text

from .process import ROOT

if TYPE_CHECKING:
    from devtools.sink import Sink

#: the Redis whose databases 1-15 test runs claim (another port lets runs side by side use their own)
REDIS_HOST = os.environ.get("OURVIDZ_TEST_REDIS", "redis://127.0.0.1:6379")
LOCK = "ourvidz:test-run-lock"
KEY = "test-service-key-" + secrets.token_hex(4)
SECRET = "test-callback-secret-" + secrets.token_hex(4)
TINY_CACHE = Path(os.environ.get("OURVIDZ_TEST_TINY_CACHE", ROOT / ".cache" / "tiny"))
#: the local RabbitMQ, for the tests that need one (skipped where it does not answer)
AMQP = os.environ.get("OURVIDZ_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim_db() -> int:
    """A Redis database (1-15) no other test run holds; flushed for us."""
    token = f"{os.getpid()}-{uuid.uuid4().hex}"
    for db in range(1, 16):
        client = redis.Redis.from_url(f"{REDIS_HOST}/{db}")
        holder = client.get(LOCK)
        if holder is not None and not _alive(int(as_text(holder).split("-", 1)[0])):
            client.delete(LOCK)  # a run on this machine that died without handing it back
        if client.set(LOCK, token, nx=True, ex=3 * 3600):
            for key in client.scan_iter(count=1000):
                if key != LOCK.encode():
                    client.delete(key)
            return db
    raise RuntimeError("no free Redis database in 1-15 (other test runs hold them all)")


#: set by the caller: a database this run neither claims nor flushes
GIVEN_DB = bool(os.environ.get("OURVIDZ_TEST_DB"))
DB = int(os.environ.get("OURVIDZ_TEST_DB") or claim_db())
BROKER = f"{REDIS_HOST}/{DB}"
os.environ.update({
    "OURVIDZ_BROKER_URL": BROKER,
    "SUPABASE_SERVICE_KEY": KEY,
    "JOB_CALLBACK_SECRET": SECRET,
    "OURVIDZ_MODEL_SOURCE": "tiny",
    "OURVIDZ_TINY_CACHE": str(TINY_CACHE),
    "OURVIDZ_FETCH_ALLOW": "127.0.0.1",
    "OURVIDZ_DEVICE": "cpu",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
})
os.environ.setdefault("SUPABASE_URL", "http://127.0.0.1:9")  # replaced per worker by the sink's URL


def worker_env(sink: Sink, family: str, **extra: str) -> dict[str, str]:
    """The environment of a process of the cluster (a pool, the bridge, ...) delivering to ``sink``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update({
        "SUPABASE_URL": sink.url,
        "OURVIDZ_HOSTNAME": f"test-{family}-{DB}",
        "OURVIDZ_PROGRESS_INTERVAL": "0",
        # session-wide pools live for the whole suite: no idle unload between far-apart tests
        # (tests of the idle unload set their own)
        "OURVIDZ_IDLE_UNLOAD_SECONDS": '{"wan": 86400}',
        "OURVIDZ_HTTP_BACKOFF": "0.05",
        "OURVIDZ_TORCH_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra)
    return env


def amqp_reachable() -> bool:
    """Whether the RabbitMQ at :data:`AMQP` answers."""
    from kombu import Connection

    try:
        with Connection(AMQP, connect_timeout=2) as conn:
            conn.ensure_connection(max_retries=1)
        return True
    except Exception:
        return False
