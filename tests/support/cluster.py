"""The processes of the cluster a test starts: ``bin/worker``, ``bin/bridge``, a private ``redis-server``."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import redis

from ourvidz_tasks.contract.devices import node_name

from .env import worker_env
from .ports import free_port
from .process import ROOT, ManagedProcess

if TYPE_CHECKING:
    from devtools.sink import Sink


class WorkerProcess(ManagedProcess):
    """A real ``bin/worker FAMILY`` process; ready when its log says ``{node} ready.``."""

    ready_timeout = 240
    stop_timeout = 60

    def __init__(self, family: str, env: dict[str, str], log: Path, args: tuple[str, ...] = ()) -> None:
        super().__init__([str(ROOT / "bin" / "worker"), family, *args], env, log)  # args: extra celery worker options
        self.family, self.args = family, args
        self.name = f"worker {family}"
        self.node = node_name(family, env["OURVIDZ_HOSTNAME"], env.get("OURVIDZ_DEVICE"))  # sdxl.cpu1@host on cpu:1

    def ready(self) -> bool:
        return f"{self.node} ready." in self.text()


class Pools:
    """Worker processes started by one test (not the session's), each with exactly the env given."""

    def __init__(self, sink: Sink, logs: Path) -> None:
        self.sink, self.logs = sink, logs
        self.logs.mkdir(parents=True, exist_ok=True)
        self.started: list[WorkerProcess] = []

    def start(self, family: str, **env: str) -> WorkerProcess:
        log = self.logs / f"{family}-{len(self.started)}.log"
        worker = WorkerProcess(family, worker_env(self.sink, family, **env), log)
        self.started.append(worker)
        return worker.start()

    def stop(self) -> None:
        for worker in reversed(self.started):
            worker.stop()


class BridgeProcess(ManagedProcess):
    """A real ``bin/bridge`` process (short BLMOVE block and lock TTL); ready when it says so."""

    name = "bin/bridge"

    def __init__(self, log: Path, env: dict[str, str], args: Sequence[str] = ()) -> None:
        super().__init__([str(ROOT / "bin" / "bridge"), "--block", "0.2", "--lock-ttl", "1", *args], env, log)

    def ready(self) -> bool:
        return "bridge ready" in self.text()


class RedisServer(ManagedProcess):
    """A private ``redis-server`` on a free port, persisting to ``directory`` (AOF, fsync always).

    It can be stopped and started again on the same port and directory (:meth:`restart`).
    """

    name = "redis-server"
    ready_timeout = 30

    def __init__(self, directory: Path, port: int | None = None, password: str | None = None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.dir, self.port, self.password = directory, port or free_port(), password
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(directory),
                "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no"]
        argv += ["--requirepass", password] if password else []
        super().__init__(argv, dict(os.environ), directory / "redis.log")
        self.starts = 0

    def url(self, db: int = 0) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis.from_url(self.url(db))

    def launch(self) -> RedisServer:
        self.starts += 1
        return super().launch()

    def ready(self) -> bool:
        client = redis.Redis.from_url(self.url(), socket_connect_timeout=1)
        try:
            return bool(client.ping()) and client.info("persistence").get("loading") == 0
        except redis.RedisError:
            return False
        finally:
            client.close()

    def restart(self, down: float = 2.0) -> float:
        """SIGTERM, stay down ``down`` seconds, start on the same port and dir; return the outage."""
        began = time.time()
        self.stop()
        time.sleep(down)
        self.start()
        return time.time() - began
