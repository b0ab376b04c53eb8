"""docker-compose brought up for real: the CPU profile (compose.cpu.yml, tiny models) on a local dockerd.

Runs only under ``bin/compose-check`` (``OURVIDZ_COMPOSE_CHECK=1``), which installs docker and compose,
starts dockerd and builds the images (a debootstrap base: no registry needed). The stack is the
rendered CPU file (devtools/compose_cpu.py) plus, for these tests only, the gate of tests/faults.py
mounted into the pools, so a job can be held in its worker while its container is killed.
Checked: the demo's enhance → SDXL chain through the containers (terminal callback, PNG at the sink);
a pool container whose main process dies is restarted by compose and its job ends once; Flower
answers only with its basic auth; ``down`` then ``up`` keeps Redis's data. ``down -v`` at the end.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml
from PIL import Image

from devtools.compose_cpu import render
from ourvidz_tasks.contract.names import CHAT_ENHANCE, FAMILIES, SDXL_GENERATE

from .faults import GATE, GATE_ENV, gate_entered
from .support.jobs import tiny_job
from .support.ports import free_port
from .support.process import ROOT, wait_for
from .wire import envelope, publish, signature

pytestmark = pytest.mark.skipif(os.environ.get("OURVIDZ_COMPOSE_CHECK") != "1",
                                reason="brings docker-compose up for real: run bin/compose-check")

PROJECT = "ourvidz-check"
FLOWER = "http://127.0.0.1:5555"
KEY = "compose-check-key-" + secrets.token_hex(8)


class Stack:
    """The CPU profile under one project name, driven through Debian's docker-compose."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.gate = workdir / "gate"
        self.gate.mkdir()
        self.gate.chmod(0o777)  # the pools run as uid 1000
        (workdir / "models").mkdir()
        self.password = secrets.token_hex(12)
        self.flower_auth = ("ops", secrets.token_hex(8))
        self.redis_port, self.sink_port = free_port(), free_port()
        env_file = workdir / "env"
        env_file.write_text("\n".join([
            f"REDIS_PASSWORD={self.password}", "SUPABASE_URL=http://sink:54321", f"SUPABASE_SERVICE_KEY={KEY}",
            f"JOB_CALLBACK_SECRET={secrets.token_hex(12)}", f"FLOWER_BASIC_AUTH={':'.join(self.flower_auth)}",
            f"MODELS_DIR={workdir / 'models'}", f"OURVIDZ_REDIS_PORT={self.redis_port}",
            f"OURVIDZ_SINK_PORT={self.sink_port}",
        ]) + "\n")
        config = render(env_file)
        for name in FAMILIES:  # the gate (test code) in every pool
            service = config["services"][name]
            service["volumes"] = [*service.get("volumes", []), f"{ROOT / 'tests'}:/app/tests:ro", f"{self.gate}:/gate"]
            service["environment"].update({"OURVIDZ_PROMPT_POLICY": "tests.faults:gate_on_marker", GATE_ENV: "/gate"})
        self.file = workdir / "compose.yml"
        self.file.touch(mode=0o600)
        self.file.write_text(yaml.safe_dump(config, sort_keys=False))
        self.sink = f"http://127.0.0.1:{self.sink_port}"

    def compose(self, *args: str, timeout: float = 600) -> str:
        env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root")}
        result = subprocess.run(["docker-compose", "-p", PROJECT, "-f", str(self.file), *args], env=env,
                                capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, f"docker-compose {' '.join(args)}: {result.stderr[-3000:]}"
        return result.stdout

    def logs(self, service: str) -> str:
        return self.compose("logs", "--no-color", service, timeout=60)

    def state(self, service: str) -> dict[str, Any]:
        """``docker inspect`` of the service's one container: its State and RestartCount."""
        container = self.compose("ps", "-q", service, timeout=60).strip()
        out = subprocess.run(["docker", "inspect", container], capture_output=True, text=True, check=True)
        info = json.loads(out.stdout)[0]
        return {**info["State"], "RestartCount": info["RestartCount"]}

    def redis(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.redis_port, password=self.password, socket_timeout=10)

    def get(self, path: str, **options: Any) -> httpx.Response | None:
        try:
            return httpx.get(f"{self.sink}{path}", timeout=10, **options)
        except httpx.HTTPError:
            return None

    def callbacks(self, job_id: str) -> list[dict[str, Any]]:
        response = self.get("/_sink/callbacks")
        calls = response.json() if response is not None and response.status_code == 200 else []
        return [c for c in calls if c["body"].get("job_id") == job_id]

    def terminals(self, job_id: str) -> list[dict[str, Any]]:
        return [c["body"] for c in self.callbacks(job_id) if c["body"]["status"] in ("completed", "failed")]

    def terminal(self, job_id: str, timeout: float = 300) -> dict[str, Any]:
        return dict(wait_for(lambda: self.terminals(job_id), timeout, 0.5, f"terminal callback of {job_id}")[0])

    def wait_up(self) -> None:
        wait_for(lambda: self._ping(), 120, 0.5, "Redis on its published port")
        wait_for(lambda: (r := self.get("/_sink/health")) is not None and r.status_code == 200, 120, 0.5, "the sink")
        for name in FAMILIES:
            wait_for(lambda: " ready." in self.logs(name), 900, 2, f"the {name} pool")  # noqa: B023 (waited on at once)

    def _ping(self) -> bool:
        try:
            return bool(self.redis().ping())
        except redis.RedisError:
            return False


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(tmp_path_factory.mktemp("compose"))
    stack.compose("down", "-v", "-t", "30")  # what an interrupted run left
    try:
        stack.compose("up", "-d", "--no-build")
        stack.wait_up()
        yield stack
    finally:
        for name in (*FAMILIES, "sink", "flower"):  # the logs, for a failure's report
            with contextlib.suppress(AssertionError, subprocess.SubprocessError):
                print(f"---- {name}\n{stack.logs(name)[-4000:]}")
        stack.compose("down", "-v", "-t", "60")


def test_the_demo_chain_runs_through_the_containers(stack: Stack) -> None:
    job = tiny_job(steps=2, size="256x256")
    job["metadata"] = {"enhance": {"system_prompt": "Rewrite the prompt with more visual detail.", "max_tokens": 12}}
    message = envelope(CHAT_ENHANCE, [job], "chat", chain=[signature(SDXL_GENERATE, queue="sdxl")])
    stack.redis().lpush("chat", json.dumps(message))
    body = stack.terminal(job["id"])
    assert body["status"] == "completed", body
    assert body["metadata"]["original_prompt"] == job["prompt"] and body["metadata"]["enhanced_prompt"]
    assert all(c["signature_ok"] for c in stack.callbacks(job["id"]))
    assert len(stack.terminals(job["id"])) == 1
    assert body["assets"]
    for asset in body["assets"]:
        stored = stack.get(f"/storage/v1/object/{asset['url']}", headers={"Authorization": f"Bearer {KEY}"})
        assert stored is not None and stored.status_code == 200, asset["url"]
        image = Image.open(io.BytesIO(stored.content))
        assert image.format == "PNG" and image.size == (256, 256)


def test_a_killed_pool_container_is_restarted_and_its_job_ends_once(stack: Stack) -> None:
    job = tiny_job(steps=3, prompt=f"a lighthouse {GATE}")
    publish(stack.redis(), SDXL_GENERATE, job, "sdxl")
    wait_for(lambda: gate_entered(stack.gate), 120, what="the job held at the gate in the sdxl container")
    before = stack.state("sdxl")
    assert before["Running"]
    # the container's main process dies, as on a crash (docker kill would count as a stop: no restart)
    os.kill(before["Pid"], signal.SIGKILL)
    after = wait_for(lambda: (s := stack.state("sdxl"))["RestartCount"] > before["RestartCount"] and s["Running"]
                     and s, 120, 0.5, "compose's restart of the sdxl container")
    assert after["Pid"] != before["Pid"]
    (stack.gate / "open").touch()
    body = stack.terminal(job["id"])
    assert body["status"] == "completed", body
    # a job published after it runs on the same solo pool: any second run of the first came before
    later = tiny_job(steps=2)
    publish(stack.redis(), SDXL_GENERATE, later, "sdxl")
    assert stack.terminal(later["id"])["status"] == "completed"
    assert len(stack.terminals(job["id"])) == 1


def test_flower_answers_only_with_its_basic_auth(stack: Stack) -> None:
    def answer(**options: Any) -> int | None:
        try:
            return httpx.get(f"{FLOWER}/", timeout=10, **options).status_code
        except httpx.HTTPError:
            return None

    assert wait_for(lambda: answer(), 120, 0.5, "Flower") == 401
    assert answer(auth=stack.flower_auth) == 200
    assert answer(auth=(stack.flower_auth[0], "wrong")) == 401


def test_down_and_up_keep_redis_data(stack: Stack) -> None:
    token = secrets.token_hex(8)
    stack.redis().set("ourvidz:compose-check", token)
    stack.compose("down", "-t", "60")
    assert not stack._ping()
    stack.compose("up", "-d", "--no-build")
    wait_for(lambda: stack._ping(), 120, 0.5, "Redis after up")
    assert stack.redis().get("ourvidz:compose-check") == token.encode()
