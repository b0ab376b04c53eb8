"""Shared fixtures: a private Redis database, the sink, real worker processes.

The helpers themselves are in ``tests/support``. Importing :mod:`tests.support.env`
sets the environment, before any test module imports the Celery app
(celeryconfig reads it at import), so the publisher in this process and the
workers it starts share one broker database that no other test run uses.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from devtools.sink import Sink

from .support.cluster import Pools, WorkerProcess
from .support.env import BROKER, DB, GIVEN_DB, KEY, REDIS_HOST, SECRET, claim_db, worker_env

_CLAIMED = [DB]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not GIVEN_DB:
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
    db = claim_db()
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


@pytest.fixture()
def pools(sink: Sink, tmp_path: Path) -> Iterator[Pools]:
    """Workers started by one test, each with exactly the env it is given; stopped after the test.

    (``start_worker``'s session pools share one env; on RabbitMQ, say, a pool needs its own.)
    """
    started = Pools(sink, tmp_path / "logs")
    yield started
    started.stop()
