"""What the edge sees on the wire: upload and callback headers, unsigned callbacks, an edge that hangs.

Real pools (``bin/worker``), the real sink recording each request's headers (the service key only
as whether it matched).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import redis

from devtools.sink import Sink
from ourvidz_tasks.contract.callbacks import SIGNATURE_HEADER
from ourvidz_tasks.services.outbox_store import LIST

from .support.cluster import WorkerProcess
from .support.env import KEY, SECRET, worker_env
from .support.jobs import new_id, terminal, terminal_counts, tiny_job
from .support.process import wait_for
from .wire import publish

CONTENT_TYPES = {".png": "image/png", ".webp": "image/webp", ".mp4": "video/mp4"}


def wan_video() -> dict[str, Any]:
    return {"id": new_id(), "type": "video_fast", "user_id": "user_123", "prompt": "a boat on a lake",
            "config": {"width": 64, "height": 64, "frames": 9, "fps": 8, "num_inference_steps": 2, "seed": 11}}


def uploads_of(sink: Sink, job_id: str) -> list[dict[str, Any]]:
    return [r for r in sink.requests_for(job_id) if r["path"].startswith("/storage/v1/object/workspace-temp/")]


@pytest.mark.slow
def test_uploads_and_callbacks_carry_their_headers(sdxl_worker: WorkerProcess, wan_worker: WorkerProcess,
                                                   store: redis.Redis, sink: Sink) -> None:
    """Storage: the key, ``x-upsert: true`` (a retry overwrites) and each file's Content-Type (png, webp, mp4);
    callbacks: the key, ``application/json`` and the HMAC of the exact body."""
    image, video = tiny_job(), wan_video()
    publish(store, "ourvidz.sdxl.generate", image, "sdxl")
    publish(store, "ourvidz.wan.generate", video, "wan")
    assert terminal(sink, image["id"], 180)["status"] == "completed"
    assert terminal(sink, video["id"], 300)["status"] == "completed"
    seen = set()
    for job in (image, video):
        uploads = uploads_of(sink, job["id"])
        assert uploads, job["id"]
        for r in uploads:
            suffix = Path(r["path"]).suffix
            seen.add(suffix)
            assert r["method"] == "POST" and r["authorized"], r
            assert r["headers"].get("x-upsert") == "true", r
            assert r["headers"].get("Content-Type") == CONTENT_TYPES[suffix] == r["content_type"], r
    assert seen == {".png", ".webp", ".mp4"}
    for job in (image, video):  # the sink checks each signature against the HMAC of the raw body it got
        calls = sink.callbacks(job["id"])
        assert calls and all(c["content_type"] == "application/json" and c["signature_ok"] for c in calls)
        assert all(c["signature"].startswith("sha256=") for c in calls)
    # the session's sink: only this test's jobs' requests
    posts = [r for job in (image, video) for r in sink.requests_for(job["id"]) if r["path"] == "/functions/v1/job-callback"]
    assert posts and all(r["authorized"] and r["headers"].get("Content-Type") == "application/json" for r in posts)


def _own_pool(tmp_path: Path, sink: Sink, broker: str, *, drop: tuple[str, ...] = (), **extra: str) -> WorkerProcess:
    env = worker_env(sink, "sdxl", OURVIDZ_BROKER_URL=broker, OURVIDZ_HOSTNAME=f"wire-{new_id()[:6]}", **extra)
    for name in drop:
        env.pop(name, None)
    return WorkerProcess("sdxl", env, tmp_path / "sdxl.log").start()


@pytest.mark.slow
def test_callbacks_without_a_secret_are_unsigned(isolated_broker: str, tmp_path: Path) -> None:
    """JOB_CALLBACK_SECRET unset (CONTRACT section 5: optional): callbacks go out without a signature header."""
    edge = Sink(tmp_path / "edge", KEY, None).start()  # verifies no signature
    pool = _own_pool(tmp_path, edge, isolated_broker, drop=("JOB_CALLBACK_SECRET",))
    try:
        job = tiny_job()
        publish(redis.Redis.from_url(isolated_broker), "ourvidz.sdxl.generate", job, "sdxl")
        assert terminal(edge, job["id"], 180)["status"] == "completed"
        calls = edge.callbacks(job["id"])
        assert calls[0]["body"]["status"] == "processing"
        assert all(c["signature"] is None for c in calls)
        posts = [r for r in edge.requests() if r["path"] == "/functions/v1/job-callback"]
        assert posts and all(SIGNATURE_HEADER not in r["headers"] and r["authorized"] for r in posts)
        assert SECRET not in pool.text()
    finally:
        pool.stop()
        edge.stop()


@pytest.mark.slow
def test_an_edge_that_hangs_costs_a_pool_one_short_try(isolated_broker: str, tmp_path: Path) -> None:
    """Each callback held HANG s: the pool gives up after OURVIDZ_CALLBACK_TIMEOUT, hands the body to the outbox
    and goes on; the jobs end long before one hang would, and every callback arrives once the edge answers."""
    hang = 30
    edge = Sink(tmp_path / "edge", KEY, SECRET).start()
    store = redis.Redis.from_url(isolated_broker)
    pool = _own_pool(tmp_path, edge, isolated_broker, OURVIDZ_CALLBACK_TIMEOUT="1", OURVIDZ_OUTBOX_MAX_PAUSE="2")
    jobs = [tiny_job() for _ in range(3)]
    try:
        edge.faults(callback_hang=hang)
        started = time.monotonic()
        for job in jobs:
            publish(store, "ourvidz.sdxl.generate", job, "sdxl")
        wait_for(lambda: all(store.exists(f"ourvidz:job:{j['id']}:final") for j in jobs), hang - 5,
                 what="every job to end while the edge hangs")
        took = time.monotonic() - started
        assert all(edge.callbacks(j["id"]) == [] for j in jobs) and store.llen(LIST) >= len(jobs)
        hung = [r for r in edge.requests() if r["path"] == "/functions/v1/job-callback"]
        print(f"{len(jobs)} jobs ended in {took:.1f}s while each callback hung {hang}s ({len(hung)} tries)")
        edge.faults()
        for job in jobs:
            assert terminal(edge, job["id"], 2 * hang)["status"] == "completed"
        assert terminal_counts(edge, [j["id"] for j in jobs]) == {j["id"]: 1 for j in jobs}
    finally:
        edge.faults()
        pool.stop()
        edge.stop()
