"""``pip install .`` without torch: a publisher, the bridge, the outbox consumer and the CLI work.

A fresh venv gets ``requirements/light.lock`` (from the package registry; the
wheels are kept under ``.cache/light-wheels/<hash of the lock>`` for later runs)
and the project from a copy of the checkout, with ``--no-deps``: no torch, no
Pillow, no NumPy. Everything then runs from that venv, outside the checkout,
against a private Redis database: a job built, validated and sent by task name;
the bridge, the outbox consumer, Flower and the metrics exporter as real
processes; ``ourvidz memory plan``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from devtools.sink import Sink
from ourvidz_tasks.contract.callbacks import callback_body, dumps
from ourvidz_tasks.contract.devices import node_name
from ourvidz_tasks.contract.names import SDXL_GENERATE
from ourvidz_tasks.contract.settings import load_settings
from ourvidz_tasks.services.outbox_store import LIST, Outbox

from .support.env import worker_env
from .support.jobs import new_id
from .support.ports import free_port
from .support.process import ROOT, ManagedProcess, wait_for

pytestmark = pytest.mark.slow

LOCK = ROOT / "requirements" / "light.lock"
#: what the wheel is built from (a copy: a build in the checkout would leave build/ behind)
PROJECT = ("setup.cfg", "pyproject.toml", "README.md", "ourvidz_tasks")
#: what only the worker extra brings
HEAVY = ("torch", "PIL", "numpy", "diffusers", "transformers", "cv2")


@dataclass
class LightVenv:
    root: Path
    #: the working directory of everything run from the venv: not the checkout (its sources are no module)
    cwd: Path

    def bin(self, name: str) -> str:
        return str(self.root / "bin" / name)

    def env(self, base: dict[str, str]) -> dict[str, str]:
        env = {k: v for k, v in base.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        env["PATH"] = f"{self.root / 'bin'}:{env.get('PATH', os.defpath)}"
        return env

    def run(self, *argv: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, cwd=self.cwd, env=self.env(env), capture_output=True, text=True,
                              timeout=timeout)


def pip(*args: str, python: str = sys.executable) -> None:
    done = subprocess.run([python, "-m", "pip", "--disable-pip-version-check", "--quiet", *args],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"pip {' '.join(args)}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"


def wheels() -> Path:
    """The light lock's wheels (and the build backend's), from the registry once per version of the lock."""
    key = hashlib.sha256(LOCK.read_bytes()).hexdigest()[:16]
    final = ROOT / ".cache" / "light-wheels" / key
    if not final.is_dir():
        partial = final.with_name(f"{key}.{os.getpid()}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        pip("wheel", "-r", str(LOCK), "setuptools>=68", "wheel", "--wheel-dir", str(partial))
        try:
            partial.rename(final)  # whole or not at all; a concurrent run may have won
        except OSError:
            shutil.rmtree(partial, ignore_errors=True)
    return final


@pytest.fixture(scope="module")
def light(tmp_path_factory: pytest.TempPathFactory) -> LightVenv:
    top = tmp_path_factory.mktemp("light")
    found = wheels()
    source = top / "src"
    for name in PROJECT:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copy2(src, source / name)
    venv = LightVenv(top / "venv", top / "run")
    venv.cwd.mkdir()
    subprocess.run([sys.executable, "-m", "venv", str(venv.root)], check=True, timeout=300)
    offline = ("--no-index", "--find-links", str(found))
    pip("install", *offline, "-r", str(LOCK), python=venv.bin("python"))
    pip("install", *offline, "--no-deps", str(source), python=venv.bin("python"))
    pip("check", python=venv.bin("python"))
    return venv


@pytest.fixture()
def db(isolated_broker: str) -> Iterator[tuple[str, redis.Redis]]:
    client = redis.Redis.from_url(isolated_broker)
    yield isolated_broker, client
    client.close()


def sdxl_job() -> dict[str, Any]:
    return {"id": new_id(), "type": "sdxl_image_fast", "user_id": "user_123", "prompt": "a quiet harbour",
            "config": {"resolution": "256x256", "num_inference_steps": 2, "seed": 3}}


def messages(store: redis.Redis, queue: str) -> list[dict[str, Any]]:
    """The Celery messages on a queue's list: headers, and the body's positional arguments."""
    out = []
    for raw in reversed(store.lrange(queue, 0, -1)):  # LPUSHed: the oldest is last
        envelope = json.loads(raw)
        args, _, _ = json.loads(base64.b64decode(envelope["body"]))
        out.append({"headers": envelope["headers"], "args": args,
                    "routing_key": envelope["properties"]["delivery_info"]["routing_key"]})
    return out


def test_the_light_venv_has_no_torch_and_runs_the_installed_package(light: LightVenv) -> None:
    for module in HEAVY:
        probe = light.run(light.bin("python"), "-c", f"import {module}", env=dict(os.environ))
        assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr, f"{module} is installed"
    where = light.run(light.bin("python"), "-c", "import ourvidz_tasks; print(ourvidz_tasks.__file__)",
                      env=dict(os.environ))
    assert where.returncode == 0 and where.stdout.startswith(str(light.root)), where
    # the data files are in the wheel: the ledger's Lua scripts, the committed model configs and sizes
    installed = Path(where.stdout.strip()).parent
    for pattern in ("runtime/**/*.lua", "models/configs/*.json"):
        want = {p.relative_to(ROOT / "ourvidz_tasks") for p in (ROOT / "ourvidz_tasks").glob(pattern)}
        assert want and {p.relative_to(installed) for p in installed.glob(pattern)} == want, pattern
    # the development tools and a top-level ``celeryconfig`` stay out of it
    for module in ("devtools", "celeryconfig"):
        assert light.run(light.bin("python"), "-c", f"import {module}", env=dict(os.environ)).returncode != 0


PUBLISH = """
import json, sys
from ourvidz_tasks import app
from ourvidz_tasks.contract.errors import InvalidJob
from ourvidz_tasks.contract.jobs import parse_job
from ourvidz_tasks.contract.names import SDXL_GENERATE
from ourvidz_tasks.contract.settings import load_settings

payload = json.loads(sys.argv[1])
settings = load_settings()
job = parse_job(payload, settings, "sdxl")
try:
    parse_job({**payload, "type": "painting"}, settings)
    sys.exit("an unknown type passed")
except InvalidJob as exc:
    assert exc.code == "INVALID_JOB"
sent = app.send_task(SDXL_GENERATE, args=[payload], argsrepr=repr((job.the_id,)))
print(json.dumps({"task_id": sent.id, "family": job.family}))
"""


def test_a_publisher_validates_a_job_and_sends_it_by_task_name(light: LightVenv,
                                                               db: tuple[str, redis.Redis]) -> None:
    url, store = db
    job = sdxl_job()
    env = {**os.environ, "OURVIDZ_BROKER_URL": url}
    done = light.run(light.bin("python"), "-c", PUBLISH, json.dumps(job), env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    sent = json.loads(done.stdout)
    assert sent["family"] == "sdxl"
    [message] = messages(store, "sdxl")
    assert message["headers"]["task"] == SDXL_GENERATE and message["headers"]["id"] == sent["task_id"]
    assert message["args"] == [job] and message["routing_key"] == "sdxl"
    assert job["prompt"] not in message["headers"]["argsrepr"]


class Light(ManagedProcess):
    """A process run from the light venv; ready once its log holds ``needle``."""

    def __init__(self, venv: LightVenv, argv: list[str], env: dict[str, str], log: Path, needle: str) -> None:
        super().__init__(argv, venv.env(env), log, cwd=venv.cwd)
        self.name, self.needle = argv[0], needle

    def ready(self) -> bool:
        return self.needle in self.text()


def test_the_bridge_runs_from_the_light_install(light: LightVenv, db: tuple[str, redis.Redis], sink: Sink,
                                                tmp_path: Path) -> None:
    url, store = db
    env = worker_env(sink, "bridge", OURVIDZ_BROKER_URL=url, OURVIDZ_LEGACY_REDIS_URL=url)
    argv = [light.bin("ourvidz-bridge"), "--block", "0.2", "--lock-ttl", "1", "--lists", "sdxl_queue"]
    bridge = Light(light, argv, env, tmp_path / "bridge.log", "bridge ready").start(timeout=60)
    try:
        job = sdxl_job()
        store.rpush("sdxl_queue", json.dumps(job))
        [message] = wait_for(lambda: messages(store, "sdxl"), 30, what="the bridged task")
        assert message["headers"]["task"] == SDXL_GENERATE and message["args"] == [job]
        assert store.llen("sdxl_queue") == 0
    finally:
        status = bridge.stop()
    assert status == 0, bridge.text()[-3000:]


def test_the_outbox_consumer_runs_from_the_light_install(light: LightVenv, db: tuple[str, redis.Redis],
                                                         sink: Sink, tmp_path: Path) -> None:
    url, store = db
    env = worker_env(sink, "outbox", OURVIDZ_BROKER_URL=url)
    node = node_name("outbox", env["OURVIDZ_HOSTNAME"], env.get("OURVIDZ_DEVICE"))
    consumer = Light(light, [light.bin("ourvidz-worker"), "outbox"], env, tmp_path / "outbox.log",
                     f"{node} ready").start(timeout=120)
    try:
        job_id = new_id()
        body = dumps(callback_body(job_id, "light-test", "completed", attempt=1))
        Outbox.for_settings(store, load_settings()).push(job_id, body)
        [call] = wait_for(lambda: sink.callbacks(job_id), 30, what="the callback from the outbox")
        assert call["body"] == json.loads(body) and call["signature_ok"]
        wait_for(lambda: store.llen(LIST) == 0, 10, what="the delivered body leaving the outbox")
    finally:
        consumer.stop()
    log = consumer.text()
    assert "Traceback" not in log, log[-3000:]


def test_memory_plan_runs_from_the_light_install(light: LightVenv) -> None:
    done = light.run(light.bin("ourvidz"), "memory", "plan", "--card", "h100-80gb", "--json", env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)


#: the light image's HTTP servers: argv (after the venv's bin/) and the path that answers 200 once it serves
SERVERS = {
    "flower": (["python", "-m", "ourvidz_tasks.tools.flower", "--local-only", "--port", "{port}"], "/healthcheck"),
    "metrics": (["ourvidz", "metrics", "--port", "{port}", "--address", "127.0.0.1"], "/metrics"),
}


@pytest.mark.parametrize("server", sorted(SERVERS))
def test_flower_and_the_metrics_exporter_serve_from_the_light_install(
        light: LightVenv, db: tuple[str, redis.Redis], tmp_path: Path, server: str) -> None:
    port = free_port()
    argv, path = SERVERS[server]
    argv = [light.bin(argv[0]), *(arg.format(port=port) for arg in argv[1:])]
    env = {**os.environ, "OURVIDZ_BROKER_URL": db[0], "FLOWER_BASIC_AUTH": ""}
    process = Light(light, argv, env, tmp_path / f"{server}.log", "").launch()
    try:
        def serving() -> bool:
            assert process.alive(), process.text()[-3000:]
            try:
                return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(serving, 60, what=f"{server} on {path}")
    finally:
        process.stop()
