"""Shared fixtures: a private Redis database, the sink, real worker processes.

The environment is set before ``ourvidz_tasks`` is imported (celeryconfig
reads it at import), so the publisher in this process and the workers it
starts share one broker database that no other test run uses.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

ROOT = Path(__file__).resolve().parent.parent
REDIS_HOST = "redis://127.0.0.1:6379"
LOCK = "ourvidz:test-run-lock"
KEY = "test-service-key-" + secrets.token_hex(4)
SECRET = "test-callback-secret-" + secrets.token_hex(4)
TINY_CACHE = Path(os.environ.get("OURVIDZ_TEST_TINY_CACHE", ROOT / ".cache" / "tiny"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _claim_db() -> int:
    """A Redis database (1-15) no other test run holds; flushed for us."""
    token = f"{os.getpid()}-{uuid.uuid4().hex}"
    for db in range(1, 16):
        client = redis.Redis.from_url(f"{REDIS_HOST}/{db}")
        holder = client.get(LOCK)
        if holder is not None and not _alive(int(holder.split(b"-", 1)[0])):
            client.delete(LOCK)  # a run on this machine that died without handing it back
        if client.set(LOCK, token, nx=True, ex=3 * 3600):
            for key in client.scan_iter(count=1000):
                if key != LOCK.encode():
                    client.delete(key)
            return db
    raise RuntimeError("no free Redis database in 1-15 (other test runs hold them all)")


DB = int(os.environ.get("OURVIDZ_TEST_DB") or _claim_db())
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

from devtools.sink import Sink  # noqa: E402
from ourvidz_tasks.contract.devices import node_name  # noqa: E402

_CLAIMED = [DB]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not os.environ.get("OURVIDZ_TEST_DB"):
        for db in _CLAIMED:
            redis.Redis.from_url(f"{REDIS_HOST}/{db}").flushdb()


#: workers started per broker URL (so a test's private database can be handed back)
_WORKERS: dict[str, list[WorkerProcess]] = {}


@pytest.fixture()
def isolated_broker() -> Iterator[str]:
    """A second private database, for tests whose workers must not share queues with the session's.

    At teardown its workers are stopped and the database is flushed (lock included), so a
    long suite never runs out of the 15 databases.
    """
    db = _claim_db()
    url = f"{REDIS_HOST}/{db}"
    yield url
    for worker in _WORKERS.pop(url, []):
        worker.stop(signal.SIGKILL)
    redis.Redis.from_url(url).flushdb()


@pytest.fixture(scope="session")
def store() -> redis.Redis:
    return redis.Redis.from_url(BROKER)


@pytest.fixture(scope="session")
def sink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sink]:
    server = Sink(tmp_path_factory.mktemp("sink"), KEY, SECRET).start()
    yield server
    server.stop()


class WorkerProcess:
    """A real ``bin/worker FAMILY`` process with its log file."""

    def __init__(self, family: str, env: dict[str, str], log: Path, args: tuple[str, ...] = ()) -> None:
        self.family, self.log, self.args = family, log, args  # args: extra celery worker options
        self.node = node_name(family, env["OURVIDZ_HOSTNAME"], env.get("OURVIDZ_DEVICE"))  # sdxl.cpu1@host on cpu:1
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 240) -> WorkerProcess:
        return self.launch().wait_ready(timeout)

    def launch(self) -> WorkerProcess:
        """Start the process without waiting for it to be ready (what a supervisor does)."""
        self.handle = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [str(ROOT / "bin" / "worker"), self.family, *self.args], cwd=ROOT, env=self.env,
            stdout=self.handle, stderr=subprocess.STDOUT, start_new_session=True,
        )
        return self

    def wait_ready(self, timeout: float = 240) -> WorkerProcess:
        assert self.proc is not None
        deadline = time.time() + timeout
        while time.time() < deadline:
            if f"{self.node} ready." in self.text():
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.family} exited {self.proc.returncode}:\n{self.text()[-3000:]}")
            time.sleep(0.2)
        self.stop(signal.SIGKILL)  # never leave an orphan consuming a database a later run reuses
        raise TimeoutError(f"worker {self.family} not ready in {timeout}s:\n{self.text()[-3000:]}")

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.handle.close()
        return self.proc.returncode


def worker_env(sink: Sink, family: str, **extra: str) -> dict[str, str]:
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


@pytest.fixture(scope="session")
def start_worker(sink: Sink, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(family: str, **extra: str) -> WorkerProcess:
        """Start ``bin/worker family`` (the pools alone deliver their callbacks: no outbox consumer)."""
        env = worker_env(sink, family, **extra)
        broker = env["OURVIDZ_BROKER_URL"]
        log = tmp_path_factory.mktemp("logs") / f"{family}.log"
        worker = WorkerProcess(family, env, log).start()
        started.append(worker)
        _WORKERS.setdefault(broker, []).append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture(scope="session")
def sdxl_worker(start_worker: Callable[..., WorkerProcess]) -> WorkerProcess:
    return start_worker("sdxl")


@pytest.fixture(scope="session")
def chat_worker(start_worker: Callable[..., WorkerProcess]) -> WorkerProcess:
    return start_worker("chat")


@pytest.fixture(scope="session")
def wan_worker(start_worker: Callable[..., WorkerProcess]) -> WorkerProcess:
    return start_worker("wan")


def wait_for(predicate: Callable[[], Any], timeout: float = 120, interval: float = 0.1, what: str = "condition") -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def terminal(sink: Sink, job_id: str, timeout: float = 180) -> dict[str, Any]:
    """The job's terminal callback body (waits for it)."""
    def find() -> dict[str, Any] | None:
        for call in sink.callbacks(job_id):
            if call["body"]["status"] in ("completed", "failed"):
                return call["body"]
        return None

    return wait_for(find, timeout, what=f"terminal callback of {job_id}")


def new_id() -> str:
    return uuid.uuid4().hex


