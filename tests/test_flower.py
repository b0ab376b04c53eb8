"""``bin/flower``: refuses to start without a password, shows the pools and a job's live progress.

Real processes throughout: the three session workers, ``bin/flower`` on the
same broker, the Flower HTTP API with and without basic auth, and headless
Chromium (Debian's ``chromium``) rendering the dashboard to PNG files that
are kept under ``.cache/test-artifacts/`` for a person to look at.
"""

from __future__ import annotations

import io
import os
import re
import secrets
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from PIL import Image

from devtools.sink import Sink
from ourvidz_tasks.contract.errors import ConfigError
from ourvidz_tasks.services.progress import progress_text
from ourvidz_tasks.services.redact import HIDDEN
from ourvidz_tasks.tools.flower import check_auth, format_task

from .support.cluster import WorkerProcess
from .support.jobs import new_id, terminal
from .support.ports import free_port
from .support.process import ROOT, ManagedProcess, wait_for
from .support.tools import tool
from .wire import publish

USER = "operator"
PASSWORD = "pw-" + secrets.token_hex(8)
MARKER = "flower-secret-prompt-marker"
ARTIFACTS = Path(os.environ.get("OURVIDZ_TEST_ARTIFACTS", ROOT / ".cache" / "test-artifacts"))


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "FLOWER_"))}
    env.update(extra)
    return env


class FlowerProcess(ManagedProcess):
    """``bin/flower`` on a free port; ready when its ``/healthcheck`` answers."""

    name = "bin/flower"

    def __init__(self, log: Path, *args: str, port: int | None = None, port_flag: bool = True, **env: str) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        flags = ["--port", str(self.port)] if port_flag else []
        super().__init__([str(ROOT / "bin" / "flower"), *flags, *args], base_env(**env), log)

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/healthcheck", timeout=2).text == "OK"
        except httpx.HTTPError:
            return False


@pytest.fixture(scope="module")
def flower(sdxl_worker: WorkerProcess, chat_worker: WorkerProcess, wan_worker: WorkerProcess,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlowerProcess]:
    log = tmp_path_factory.mktemp("flower") / "flower.log"
    process = FlowerProcess(log, "--address", "127.0.0.1", FLOWER_BASIC_AUTH=f"{USER}:{PASSWORD}").start()
    yield process
    process.stop()


def api(flower: FlowerProcess, path: str, **params: Any) -> Any:
    response = httpx.get(f"{flower.url}{path}", params=params, auth=(USER, PASSWORD), timeout=30)
    response.raise_for_status()
    return response.json()


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's headless Chromium (``bin/test`` installs it; a failure there, a skip in a bare pytest run)."""
    return tool("chromium", "chromium fonts-dejavu-core")


def render(chromium: str, url: str, png: Path) -> str:
    """Load ``url`` in headless Chromium: write a screenshot to ``png``, return the DOM after scripts ran.

    Two Chromium runs side by side (a screenshot, a DOM dump), so both see the same moment.
    """
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as shot_profile, tempfile.TemporaryDirectory() as dom_profile:
        def run(profile: str, *what: str) -> subprocess.Popen[bytes]:
            return subprocess.Popen(
                [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
                 "--window-size=1500,900", "--virtual-time-budget=6000", f"--user-data-dir={profile}", *what, url],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

        shot = run(shot_profile, f"--screenshot={png}")
        dom = run(dom_profile, "--dump-dom")
        dom_out, _ = dom.communicate(timeout=120)
        _, shot_err = shot.communicate(timeout=120)
    assert png.exists(), shot_err.decode(errors="replace")[-2000:]
    return dom_out.decode(errors="replace")


def authed(flower: FlowerProcess, path: str) -> str:
    return f"http://{USER}:{PASSWORD}@127.0.0.1:{flower.port}{path}"


# -- the pieces ---------------------------------------------------------------------------
def test_progress_bar_and_task_formatting() -> None:
    meta = {"job_id": "j1", "percent": 60, "step": 9, "total": 15, "stage": "generating"}
    assert progress_text(meta) == "[██████░░░░] 60% · step 9/15 · generating"
    assert progress_text({"percent": 2}) == "[█░░░░░░░░░] 2%"  # any progress shows
    assert progress_text({"percent": 99}).startswith("[█████████░]")  # only 100% is full
    assert progress_text({"percent": "junk"}) == "[░░░░░░░░░░] 0%"

    class Task:
        def __init__(self, state: str, result: Any) -> None:
            self.state, self.result = state, result

    assert format_task(Task("PROGRESS", meta)).result == progress_text(meta)
    assert format_task(Task("SUCCESS", HIDDEN)).result == "hidden (see the callback)"
    assert format_task(Task("FAILURE", "WorkerUnavailable()")).result == "WorkerUnavailable()"


def test_basic_auth_must_name_user_and_password() -> None:
    check_auth("admin:s3cret")
    check_auth("a:b,c:d:e")  # a password may hold colons
    for bad in ("admin", "admin:", ":pw", "a:b,", "a:b,c"):
        with pytest.raises(ConfigError):
            check_auth(bad)


# -- refusing to start -----------------------------------------------------------------
def test_refuses_to_start_without_basic_auth() -> None:
    run = subprocess.run([str(ROOT / "bin" / "flower")], env=base_env(), capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "FLOWER_BASIC_AUTH is not set" in run.stderr and "--local-only" in run.stderr
    bad = subprocess.run([str(ROOT / "bin" / "flower")], env=base_env(FLOWER_BASIC_AUTH="admin"),
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "user:password" in bad.stderr
    argv = subprocess.run([str(ROOT / "bin" / "flower"), "--local-only", "--basic_auth=a:b"], env=base_env(),
                          capture_output=True, text=True, timeout=60)
    assert argv.returncode == 2 and "not on the command line" in argv.stderr
    wide = subprocess.run([str(ROOT / "bin" / "flower"), "--local-only", "--address", "0.0.0.0"], env=base_env(),
                          capture_output=True, text=True, timeout=60)
    assert wide.returncode == 2 and "loopback" in wide.stderr


@pytest.mark.slow
def test_local_only_serves_loopback_without_password(tmp_path: Path) -> None:
    process = FlowerProcess(tmp_path / "local.log", "--local-only").start()
    try:
        assert f"Visit me at http://127.0.0.1:{process.port}" in process.text()
        assert httpx.get(f"{process.url}/workers", timeout=10).status_code == 200  # the UI: no password
        assert httpx.get(f"{process.url}/api/workers", timeout=10).status_code == 401  # the API: never open
    finally:
        process.stop()


def test_local_only_refuses_a_wide_address_from_the_environment() -> None:
    run = subprocess.run([str(ROOT / "bin" / "flower"), "--local-only"], env=base_env(FLOWER_ADDRESS="0.0.0.0"),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "loopback" in run.stderr and "'0.0.0.0'" in run.stderr


@pytest.mark.slow
def test_flower_environment_options_work_and_flags_win(tmp_path: Path) -> None:
    """Flower's own ``FLOWER_<OPTION>`` settings configure ``bin/flower``; a flag still beats its variable."""
    env_port, flag_port = free_port(), free_port()
    by_env = FlowerProcess(tmp_path / "env.log", port=env_port, port_flag=False, FLOWER_PORT=str(env_port),
                           FLOWER_ADDRESS="127.0.0.1", FLOWER_BASIC_AUTH=f"{USER}:{PASSWORD}",
                           FLOWER_URL_PREFIX="dash").launch()
    by_flag = FlowerProcess(tmp_path / "flag.log", "--local-only", port=flag_port,
                            FLOWER_PORT=str(env_port + 1)).launch()
    try:
        by_env.url = f"{by_env.url}/dash"
        by_env.wait_ready()
        assert f"Visit me at http://127.0.0.1:{env_port}/dash/" in by_env.text()
        assert httpx.get(f"{by_env.url}/api/workers", timeout=10).status_code == 401
        assert httpx.get(f"{by_env.url}/api/workers", auth=(USER, PASSWORD), timeout=30).status_code == 200
        by_flag.wait_ready()
        assert f"Visit me at http://127.0.0.1:{flag_port}" in by_flag.text()
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{env_port + 1}/healthcheck", timeout=5)
    finally:
        by_env.stop()
        by_flag.stop()


# -- auth, pools, tasks -------------------------------------------------------------------
@pytest.mark.slow
def test_api_needs_the_password_which_is_not_in_argv(flower: FlowerProcess) -> None:
    for path in ("/api/workers", "/api/tasks", "/workers", "/tasks"):
        assert httpx.get(f"{flower.url}{path}", timeout=10).status_code == 401, path
        assert httpx.get(f"{flower.url}{path}", auth=(USER, "wrong"), timeout=10).status_code == 401, path
        assert httpx.get(f"{flower.url}{path}", auth=(USER, PASSWORD), timeout=30).status_code == 200, path
    cmdline = Path(f"/proc/{flower.proc.pid}/cmdline").read_bytes()
    assert PASSWORD.encode() not in cmdline


@pytest.mark.slow
def test_shows_the_three_pools(flower: FlowerProcess, sdxl_worker: WorkerProcess, chat_worker: WorkerProcess,
                               wan_worker: WorkerProcess) -> None:
    nodes = {sdxl_worker.node, chat_worker.node, wan_worker.node}
    workers = wait_for(lambda: (w := api(flower, "/api/workers", refresh=1)) and nodes <= set(w) and w,
                       60, 1, "the three pools in /api/workers")
    for node in nodes:
        queues = {q["name"] for q in workers[node]["active_queues"]}
        assert queues == {node.split("@")[0]}


@pytest.mark.slow
def test_the_workers_page_draws_the_three_pools(flower: FlowerProcess, sdxl_worker: WorkerProcess,
                                                chat_worker: WorkerProcess, wan_worker: WorkerProcess,
                                                chromium: str) -> None:
    nodes = {sdxl_worker.node, chat_worker.node, wan_worker.node}
    wait_for(lambda: nodes <= set(api(flower, "/api/workers", refresh=1)), 60, 1, "the three pools in /api/workers")
    dom = render(chromium, authed(flower, "/workers"), ARTIFACTS / "flower-workers.png")
    assert all(node in dom for node in nodes)
    assert_drawn(ARTIFACTS / "flower-workers.png")


def long_job() -> dict[str, Any]:
    """Long enough (~15 s here) to watch: 1024² at the largest schedule the contract allows."""
    return {"id": new_id(), "type": "sdxl_image_fast", "user_id": "user_123", "prompt": f"a harbor, {MARKER}",
            "config": {"resolution": "1024x1024", "num_inference_steps": 150, "seed": 3}}


def progress_of(flower: FlowerProcess, task_id: str, seen: list[int]) -> dict[str, Any] | None:
    """The task in /api/tasks while it is in PROGRESS (its percent noted in ``seen``)."""
    task = api(flower, "/api/tasks", limit=50).get(task_id)
    if task and task["state"] == "PROGRESS" and isinstance(task["result"], dict):
        seen.append(task["result"]["percent"])
        return dict(task)
    return None


def assert_drawn(png: Path) -> None:
    image = Image.open(io.BytesIO(png.read_bytes()))
    assert image.size == (1500, 900)
    assert len(set(image.convert("L").resize((150, 90)).getdata())) > 20  # drawn, not blank


@pytest.mark.slow
def test_live_progress_job_id_not_prompt(flower: FlowerProcess, sdxl_worker: WorkerProcess, store: redis.Redis,
                                         sink: Sink) -> None:
    """Flower's API and pages, no browser: PROGRESS moves forward, SUCCESS, the prompt nowhere."""
    job = long_job()
    task_id = publish(store, "ourvidz.sdxl.generate", job, "sdxl")
    seen: list[int] = []
    running = wait_for(lambda: progress_of(flower, task_id, seen), 120, 0.1, "PROGRESS in /api/tasks")
    moved = wait_for(lambda: (task := progress_of(flower, task_id, seen)) and len(set(seen)) >= 2 and task, 60, 0.1,
                     "PROGRESS to move")
    assert seen == sorted(seen) and seen[-1] > seen[0]  # it moves forward
    for task in (running, moved):
        assert task["result"]["job_id"] == job["id"] and task["result"]["stage"] == "generating"
        assert task["result"]["total"] == 150 and 0 < task["result"]["step"] <= 150
        assert task["args"] == repr((job["id"],)) and task["worker"].startswith("sdxl@")
    page = httpx.get(f"{flower.url}/task/{task_id}", auth=(USER, PASSWORD), timeout=30).text
    assert MARKER not in page

    assert terminal(sink, job["id"], 240)["status"] == "completed"
    done = wait_for(lambda: (t := api(flower, f"/api/task/info/{task_id}")) and t["state"] == "SUCCESS" and t,
                    60, 0.2, "SUCCESS in flower")
    assert done["args"] == f"({job['id']!r},)" and "hidden" in done["result"]
    # the prompt is nowhere Flower can show it
    for text in (page, httpx.get(f"{flower.url}/api/tasks", auth=(USER, PASSWORD), timeout=30).text,
                 httpx.get(f"{flower.url}/api/task/info/{task_id}", auth=(USER, PASSWORD), timeout=30).text,
                 httpx.get(f"{flower.url}/task/{task_id}", auth=(USER, PASSWORD), timeout=30).text,
                 httpx.get(f"{flower.url}/tasks?name=ourvidz.sdxl.generate", auth=(USER, PASSWORD), timeout=30).text):
        assert MARKER not in text


@pytest.mark.slow
def test_the_dashboard_draws_live_progress(flower: FlowerProcess, sdxl_worker: WorkerProcess, store: redis.Redis,
                                           sink: Sink, chromium: str) -> None:
    """Headless Chromium: the tasks table draws the progress as a bar while the job runs, then SUCCESS."""
    job = long_job()
    task_id = publish(store, "ourvidz.sdxl.generate", job, "sdxl")
    wait_for(lambda: progress_of(flower, task_id, []), 120, 0.1, "PROGRESS in /api/tasks")
    tasks_page = "/tasks?name=ourvidz.sdxl.generate"
    dom = render(chromium, authed(flower, tasks_page), ARTIFACTS / "flower-tasks-progress.png")
    assert job["id"] in dom and task_id in dom
    assert "PROGRESS" in dom and "generating" in dom, "the job ended before the screenshot"
    assert re.search(r"\[[█░]{10}\] \d+% · step \d+/150 · generating", dom)
    assert terminal(sink, job["id"], 240)["status"] == "completed"
    wait_for(lambda: api(flower, f"/api/task/info/{task_id}")["state"] == "SUCCESS", 60, 0.2, "SUCCESS in flower")
    done_dom = render(chromium, authed(flower, tasks_page), ARTIFACTS / "flower-tasks-done.png")
    assert task_id in done_dom and "SUCCESS" in done_dom and "hidden (see the callback)" in done_dom
    for text in (dom, done_dom):
        assert MARKER not in text
    for name in ("flower-tasks-progress.png", "flower-tasks-done.png"):
        assert_drawn(ARTIFACTS / name)
