"""``bin/demo``: the whole cluster on this machine, on tiny models, end to end.

Starts (or reuses) Redis, the local Supabase-compatible sink, and one worker
per family (``bin/worker sdxl|chat|wan``); then runs the main job, an
enhance → SDXL chain, plus an enhanced WAN video and a chat request; prints
the callbacks and where every file landed; stops what it started (with the
tests' process helper, :mod:`tests.support.process`).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import redis

from tests.support.ports import free_port
from tests.support.process import ManagedProcess, wait_for

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(os.environ.get("OURVIDZ_DEMO_DIR", ROOT / "demo-output"))
ROLES = ("sdxl", "chat", "wan")  # the pools alone: they deliver their own callbacks


class Stack:
    """The processes the demo starts; stopped in reverse order."""

    def __init__(self) -> None:
        self.procs: list[ManagedProcess] = []

    def start(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> ManagedProcess:
        proc = ManagedProcess(argv, env, log, cwd=ROOT)
        proc.name = name
        self.procs.append(proc.launch())
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


def redis_url(stack: Stack) -> str:
    """The demo's Redis: the one on 6379 (database 14), else a private redis-server."""
    url = os.environ.get("OURVIDZ_BROKER_URL", "redis://127.0.0.1:6379/14")
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
        return url
    except redis.RedisError:
        pass
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("demo: no Redis reachable at 127.0.0.1:6379 and no redis-server installed "
                         "(apt-get install redis-server)")
    port = free_port()
    stack.start("redis", [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                dict(os.environ), OUT / "logs" / "redis.log")
    url = f"redis://127.0.0.1:{port}/0"
    wait(lambda: _ping(url), 20, "redis-server")
    return url


def _ping(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def wait(predicate: Any, timeout: float, what: str) -> Any:
    try:
        return wait_for(predicate, timeout, 0.2, what)
    except TimeoutError:
        raise SystemExit(f"demo: timed out waiting for {what}") from None


def main() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    (OUT / "logs").mkdir(parents=True)
    stack = Stack()
    try:
        run(stack)
    finally:
        stack.stop()


def run(stack: Stack) -> None:
    broker = redis_url(stack)
    store = redis.Redis.from_url(broker)
    store.flushdb()
    key, secret = "demo-service-key-" + secrets.token_hex(8), "demo-callback-secret-" + secrets.token_hex(8)
    port = free_port()
    env = {
        **os.environ, "OURVIDZ_BROKER_URL": broker, "SUPABASE_URL": f"http://127.0.0.1:{port}",
        "SUPABASE_SERVICE_KEY": key, "JOB_CALLBACK_SECRET": secret, "OURVIDZ_MODEL_SOURCE": "tiny",
        "OURVIDZ_FETCH_ALLOW": "127.0.0.1", "OURVIDZ_DEVICE": os.environ.get("OURVIDZ_DEVICE", "cpu"),
        "OURVIDZ_PROGRESS_INTERVAL": "0.5", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
    }
    sink_url = env["SUPABASE_URL"]
    storage = OUT / "storage"
    stack.start("sink", [sys.executable, "-m", "devtools.sink", "--root", str(storage), "--port", str(port)],
                env, OUT / "logs" / "sink.log")
    wait(lambda: _get(f"{sink_url}/_sink/health"), 20, "the sink")
    print(f"redis   {broker.rsplit('@', 1)[-1]}\nsink    {sink_url} (objects in {storage})")
    for family in ROLES:
        stack.start(family, [str(ROOT / "bin" / "worker"), family], env, OUT / "logs" / f"{family}.log")
    for family in ROLES:
        log = OUT / "logs" / f"{family}.log"
        wait(lambda log=log: " ready." in log.read_text(errors="replace"), 600, f"the {family} worker (see {log})")
        print(f"worker  {family} ready (log {log})")

    os.environ.update({"OURVIDZ_BROKER_URL": broker})
    from celery import chain

    # the task modules by name: ``ourvidz_tasks.chat`` is both a module and (lazily) the chat task
    from ourvidz_tasks.publish import chat, enhance, sdxl_generate, wan_generate

    image_job = {
        "id": str(uuid.uuid4()), "type": "sdxl_image_fast", "user_id": "demo_user",
        "prompt": "a lighthouse on a cliff at dawn", "config": {"num_images": 3, "resolution": "1024x1024", "seed": 42},
        "metadata": {"enhance": {"system_prompt": "Rewrite the prompt with more visual detail.", "max_tokens": 40}},
    }
    video_job = {
        "id": str(uuid.uuid4()), "type": "video7b_fast_enhanced", "user_id": "demo_user",
        "prompt": "waves rolling onto a beach", "config": {"width": 128, "height": 128, "frames": 33, "fps": 16,
                                                           "num_inference_steps": 4, "seed": 7},
    }
    started = time.time()
    print("\nmain job: enhance → SDXL (3 images, 1024x1024), published as a chain")
    chain(enhance.s(image_job), sdxl_generate.s()).apply_async()
    print("video job: video7b_fast_enhanced published alone to ourvidz.wan.generate (enhances itself)")
    wan_generate.delay(video_job)
    answer = chat.delay({"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16}).get(timeout=300)
    print(f"chat    {answer['completion_tokens']} tokens in {answer['generation_time']}s "
          f"(tiny random weights, so the words are noise): {answer['response'][:60]!r}")
    for job in (image_job, video_job):
        body = wait(lambda job=job: _terminal(sink_url, job["id"]), 900, f"job {job['id']}")
        show(job, body, storage, sink_url)
    print(f"\nall done in {time.time() - started:.1f}s; callbacks: {sink_url}/_sink/callbacks while running, "
          f"saved to {OUT / 'callbacks.json'}")


def _get(url: str) -> Any:
    try:
        response = httpx.get(url, timeout=2)
        return response.json() if response.status_code == 200 else None
    except httpx.HTTPError:
        return None


def _terminal(sink_url: str, job_id: str) -> dict[str, Any] | None:
    calls = _get(f"{sink_url}/_sink/callbacks") or []
    (OUT / "callbacks.json").write_text(json.dumps(calls, indent=2))
    for call in calls:
        if call["body"]["job_id"] == job_id and call["body"]["status"] in ("completed", "failed"):
            return dict(call["body"])
    return None


def show(job: dict[str, Any], body: dict[str, Any], storage: Path, sink_url: str) -> None:
    calls = [c for c in (_get(f"{sink_url}/_sink/callbacks") or []) if c["body"]["job_id"] == job["id"]]
    print(f"\njob {job['id']} ({job['type']}): {body['status']}")
    print("  callbacks: " + " → ".join(
        c["body"]["status"] + (f" {c['body']['metadata']['progress']}%" if "progress" in c["body"]["metadata"] else "")
        + ("" if c["signature_ok"] else " (BAD SIGNATURE)") for c in calls))
    meta = body["metadata"]
    if "enhanced_prompt" in meta:
        print(f"  prompt: {meta['original_prompt']!r} → enhanced ({len(meta['enhanced_prompt'])} chars)")
    if "error" in body:
        print(f"  error: {body['error']}")
    for asset in body["assets"]:
        m = asset["metadata"]
        extra = f", {m['frames']} frames @ {m['fps']} fps" if asset["type"] == "video" else ""
        print(f"  {asset['type']}: {asset['url']} ({m['width']}x{m['height']}, seed {m['seed']}{extra})")
        print(f"    file  {storage / asset['url']}")
        if asset.get("thumbnail_url"):
            print(f"    thumb {storage / asset['thumbnail_url']}")
    print(f"  processing {meta.get('processing_time')}s (model {meta.get('model_time')}s, "
          f"delivery {meta.get('delivery_time')}s)")


if __name__ == "__main__":
    main()
