"""ourvidz.sdxl.generate end to end: a real worker process, real Redis, real HTTP to the sink."""

from __future__ import annotations

import io
import json
import os
import subprocess
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from PIL import Image

from devtools.sink import Sink
from ourvidz_tasks.contract import keys as keys_
from ourvidz_tasks.contract.names import QUEUES
from ourvidz_tasks.services import fair_scripts

from .support.cluster import WorkerProcess
from .support.env import KEY
from .support.jobs import new_id, terminal
from .support.process import ROOT, held_stopped, wait_for
from .wire import envelope, publish

PROMPT = "a lighthouse on a cliff at dawn, secret-prompt-marker"


#: how long a job waits for its ETA in the pool (time enough for two CLI calls)
ETA_SECONDS = 20


def job(**fields: Any) -> dict[str, Any]:
    body = {"id": new_id(), "type": "sdxl_image_fast", "user_id": "user_123", "prompt": PROMPT,
            "config": {"resolution": "256x256", "num_inference_steps": 4, "seed": 42}}
    config = fields.pop("config", {})
    body.update(fields)
    body["config"] = {**body["config"], **config}
    return body


def run(store: redis.Redis, sink: Sink, payload: dict[str, Any], timeout: float = 240) -> dict[str, Any]:
    publish(store, "ourvidz.sdxl.generate", payload, "sdxl")
    return terminal(sink, payload["id"], timeout)


def fetch(sink: Sink, path: str) -> Image.Image:
    r = httpx.get(f"{sink.url}/storage/v1/object/{path}", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200, path
    return Image.open(io.BytesIO(r.content))


def pixels(sink: Sink, body: dict[str, Any], i: int = 0) -> np.ndarray:
    return np.asarray(fetch(sink, body["assets"][i]["url"]))


def test_text_to_image_over_the_wire(sdxl_worker: WorkerProcess, store: redis.Redis, sink: Sink) -> None:
    payload = job(config={"resolution": "1024x1024", "num_inference_steps": 15, "seed": 7})
    body = run(store, sink, payload)
    assert body["status"] == "completed", body
    calls = sink.callbacks(payload["id"])
    assert calls[0]["body"]["status"] == "processing"
    assert [c["body"]["status"] for c in calls].count("completed") == 1
    assert all(c["signature_ok"] for c in calls)
    (asset,) = body["assets"]
    assert asset["type"] == "image"
    assert asset["url"] == f"workspace-temp/user_123/{payload['id']}/0.png"
    assert asset["thumbnail_url"] == f"workspace-temp/user_123/{payload['id']}/0.thumb.webp"
    image = fetch(sink, asset["url"])
    assert image.format == "PNG" and image.size == (1024, 1024)
    thumb = fetch(sink, asset["thumbnail_url"])
    assert thumb.format == "WEBP" and max(thumb.size) == 256
    meta = asset["metadata"]
    assert (meta["width"], meta["height"], meta["seed"], meta["steps"], meta["pipeline"]) == (1024, 1024, 7, 15, "txt2img")
    assert meta["denoise_strength"] is None and meta["format"] == "png" and meta["asset_index"] == 0
    assert body["worker_id"] == sdxl_worker.node
    assert body["metadata"]["batch_size"] == 1 and body["metadata"]["processing_time"] > 0
    progress = [c["body"]["metadata"].get("progress") for c in calls if c["body"]["status"] == "processing"]
    assert 100 in progress


def test_same_seed_same_pixels_including_zero(sdxl_worker: WorkerProcess, store: redis.Redis, sink: Sink) -> None:
    a, b, c = (run(store, sink, job(config={"seed": s})) for s in (0, 0, 1))
    assert np.array_equal(pixels(sink, a), pixels(sink, b))
    assert not np.array_equal(pixels(sink, a), pixels(sink, c))
    assert a["assets"][0]["metadata"]["seed"] == 0


def test_batch_seeds_and_split_invariance(sdxl_worker: WorkerProcess, store: redis.Redis, sink: Sink) -> None:
    batch = run(store, sink, job(config={"seed": 100, "num_images": 3}))
    assert [a["metadata"]["seed"] for a in batch["assets"]] == [100, 101, 102]
    assert [a["url"].rsplit("/", 1)[1] for a in batch["assets"]] == ["0.png", "1.png", "2.png"]
    single = run(store, sink, job(config={"seed": 101}))
    diff = np.abs(pixels(sink, batch, 1).astype(int) - pixels(sink, single).astype(int))
    assert diff.max() <= 2  # the same image within float noise
    unseeded = job()
    del unseeded["config"]["seed"]
    random_body = run(store, sink, unseeded)
    assert random_body["metadata"]["seed_was_random"] and isinstance(random_body["assets"][0]["metadata"]["seed"], int)


def reference_url(sink: Sink, name: str, left: tuple[int, int, int], right: tuple[int, int, int]) -> str:
    ref = Image.new("RGB", (256, 256))
    ref.paste(left, (0, 0, 128, 256))
    ref.paste(right, (128, 0, 256, 256))
    buffer = io.BytesIO()
    ref.save(buffer, "PNG")
    return sink.put(f"refs/{name}", buffer.getvalue())


def test_exact_copy_from_a_reference_on_the_sink(sdxl_worker: WorkerProcess, store: redis.Redis, sink: Sink) -> None:
    red_blue = reference_url(sink, "exact.png", (200, 30, 30), (30, 30, 200))
    blue_red = reference_url(sink, "exact2.png", (30, 30, 200), (200, 30, 30))

    def exact(url: str) -> dict[str, Any]:
        return run(store, sink, job(prompt="", negative_prompt="ugly", config={"guidance_scale": 8},
                                    metadata={"exact_copy_mode": True, "reference_image_url": url,
                                              "denoise_strength": 0.3}))

    body = exact(red_blue)
    assert body["status"] == "completed", body
    meta = body["assets"][0]["metadata"]
    assert meta["pipeline"] == "img2img" and meta["denoise_strength"] == 0.05 and meta["guidance_scale"] == 1.0
    assert 6 <= meta["steps_run"] <= 10 and meta["negative_prompt_used"] is False
    assert meta["steps"] == round(meta["steps_run"] / 0.05)
    assert body["metadata"]["exact_copy_mode"] is True
    assert any(r["path"].endswith("refs/exact.png") for r in sink.requests())
    # random weights can't reproduce the picture, but the output must be a function of it
    same, swapped, t2i = exact(red_blue), exact(blue_red), run(store, sink, job(prompt=""))
    assert np.array_equal(pixels(sink, body), pixels(sink, same))
    assert not np.array_equal(pixels(sink, body), pixels(sink, swapped))
    assert not np.array_equal(pixels(sink, body), pixels(sink, t2i))


def test_modify_mode_with_missing_reference_falls_back(sdxl_worker: WorkerProcess, store: redis.Redis, sink: Sink) -> None:
    payload = job(metadata={"reference_image_url": f"{sink.url}/storage/v1/object/public/refs/missing.png",
                            "denoise_strength": 0.5})
    body = run(store, sink, payload)
    assert body["status"] == "completed"
    fallback = body["metadata"]["fallback"]
    assert fallback["code"] == "I2I_PIPELINE_ERROR" and fallback["used"] == "txt2img" and "404" in fallback["reason"]
    assert body["assets"][0]["metadata"]["pipeline"] == "txt2img"


def test_exact_copy_without_usable_reference_fails(sdxl_worker: WorkerProcess, store: redis.Redis, sink: Sink) -> None:
    payload = job(prompt="", metadata={"exact_copy_mode": True,
                                       "reference_image_url": f"{sink.url}/storage/v1/object/public/refs/none.png"})
    body = run(store, sink, payload)
    assert body["status"] == "failed" and body["error"]["code"] == "I2I_PIPELINE_ERROR"


@pytest.mark.parametrize("steps", [49, 98, 103, 107])  # int(n * (1 / n)) == 0 for these
def test_a_raised_single_step_runs_img2img(steps: int, sdxl_worker: WorkerProcess, store: redis.Redis,
                                          sink: Sink) -> None:
    """Raising to one step once computed 1 / n, which runs zero steps for these n: the pipeline
    refused and the job quietly fell back to txt2img."""
    url = reference_url(sink, "raised.png", (200, 30, 30), (30, 30, 200))
    payload = job(config={"image": url, "num_inference_steps": steps, "denoise_strength": 0.001,
                          "width": 64, "height": 64})
    body = run(store, sink, payload)
    assert body["status"] == "completed" and "fallback" not in body["metadata"], body
    meta = body["assets"][0]["metadata"]
    assert (meta["pipeline"], meta["steps"], meta["steps_run"]) == ("img2img", steps, 1)
    assert body["metadata"]["steps_raised"]["steps_run"] == 1


def test_unsafe_reference_is_invalid_job(sdxl_worker: WorkerProcess, store: redis.Redis, sink: Sink) -> None:
    body = run(store, sink, job(config={"image": "file:///etc/passwd"}))
    assert body["error"]["code"] == "INVALID_JOB" and "config.image" in body["error"]["message"]
    body = run(store, sink, job(metadata={"reference_image_url": "http://169.254.169.254/latest/meta-data"}))
    assert body["error"]["code"] == "INVALID_JOB" and "metadata.reference_image_url" in body["error"]["message"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"user_id": None}, "user_id"),
        ({"config": {"resolution": "abc"}}, "config.resolution"),
        ({"config": {"num_images": 4}}, "config.num_images"),
        ({"config": {"denoise_strength": 1.5}}, "config.denoise_strength"),
        ({"type": "video_fast"}, "type"),
    ],
)
def test_bad_payloads_fail_naming_the_field(change: dict[str, Any], field: str, sdxl_worker: WorkerProcess,
                                            store: redis.Redis, sink: Sink) -> None:
    payload = job(**change)
    if payload.get("user_id") is None:
        payload.pop("user_id")
    body = run(store, sink, payload)
    assert body["status"] == "failed" and body["assets"] == [] and isinstance(body["metadata"], dict)
    assert body["error"]["code"] == "INVALID_JOB" and body["error"]["retryable"] is False
    assert field in body["error"]["message"]
    assert [c["body"]["status"] for c in sink.callbacks(payload["id"])].count("failed") == 1
    assert run(store, sink, job())["status"] == "completed"  # the worker serves the next job


def test_bad_id_never_becomes_a_path(sdxl_worker: WorkerProcess, store: redis.Redis, sink: Sink) -> None:
    payload = job(id="../x")
    task_id = publish(store, "ourvidz.sdxl.generate", payload, "sdxl")
    entry = wait_for(lambda: next((e for e in dead(store) if e["task_id"] == task_id), None), 60, what="dead letter")
    assert entry["reason"] == "no usable job id"
    assert not any("../x" in r["path"] or "/x/" in r["path"] for r in sink.requests() if r["method"] == "POST")


def dead(store: redis.Redis) -> list[dict[str, Any]]:
    return [json.loads(x) for x in store.lrange("ourvidz:dead", 0, -1)]


def test_foreign_items_are_dead_lettered_and_the_worker_lives(sdxl_worker: WorkerProcess, store: redis.Redis,
                                                              sink: Sink) -> None:
    before = len(dead(store))
    store.lpush("sdxl", b"{this is not json")
    store.lpush("sdxl", json.dumps({"hello": "world"}))
    pickled = envelope("ourvidz.sdxl.generate", [job()], "sdxl")
    pickled["content-type"] = "application/x-python-serialize"
    store.lpush("sdxl", json.dumps(pickled))
    store.lpush("sdxl", json.dumps(envelope("ourvidz.nothing.here", [job()], "sdxl")))
    entries = wait_for(lambda: dead(store)[: len(dead(store)) - before] if len(dead(store)) - before >= 4 else None,
                       60, what="four dead letters")
    reasons = " | ".join(e["reason"] for e in entries)
    assert "not JSON" in reasons and "not a Celery envelope" in reasons
    assert "refused content type 'application/x-python-serialize'" in reasons and "unknown task" in reasons
    assert sdxl_worker.alive()
    assert run(store, sink, job())["status"] == "completed"
    assert store.llen("sdxl") == 0  # nothing loops back


def test_raw_job_on_the_celery_queue_is_republished(sdxl_worker: WorkerProcess, store: redis.Redis, sink: Sink) -> None:
    payload = job()
    store.lpush("sdxl", json.dumps(payload))
    assert terminal(sink, payload["id"])["status"] == "completed"


def test_model_loaded_once_and_no_secrets_or_prompts_in_logs(sdxl_worker: WorkerProcess, store: redis.Redis,
                                                             sink: Sink) -> None:
    for _ in range(2):
        run(store, sink, job())
    loads = store.hgetall(f"ourvidz:loads:{sdxl_worker.node}")
    assert loads == {b"sdxl": b"1"}
    log = sdxl_worker.text()
    assert KEY not in log and "test-callback-secret" not in log
    assert "secret-prompt-marker" not in log and "lighthouse" not in log


def test_cancel_stops_a_running_job_at_its_next_step(sdxl_worker: WorkerProcess, store: redis.Redis, sink: Sink) -> None:
    from ourvidz_tasks.runtime.lifecycle import cancel

    payload = job(config={"resolution": "512x512", "num_inference_steps": 60})
    publish(store, "ourvidz.sdxl.generate", payload, "sdxl")
    wait_for(lambda: any(c["body"]["metadata"].get("progress") for c in sink.callbacks(payload["id"])), 120,
             what="the first step")
    cancel(store, payload["id"])
    body = terminal(sink, payload["id"])
    assert body["status"] == "failed" and body["error"]["code"] == "CANCELLED"
    steps = [c["body"]["metadata"].get("progress", 0) for c in sink.callbacks(payload["id"])]
    assert max(steps) < 100
    assert run(store, sink, job())["status"] == "completed"


def test_a_message_past_its_expiry_is_not_run(sdxl_worker: WorkerProcess, store: redis.Redis, sink: Sink) -> None:
    payload = job()
    env = envelope("ourvidz.sdxl.generate", [payload], "sdxl", argsrepr=repr((payload["id"],)))
    env["headers"]["expires"] = "2020-01-01T00:00:00+00:00"
    store.lpush("sdxl", json.dumps(env))
    body = terminal(sink, payload["id"])
    assert body["status"] == "failed" and body["error"]["code"] == "TIMEOUT_ERROR"
    assert [c["body"]["status"] for c in sink.callbacks(payload["id"])] == ["failed"]


def test_a_queued_job_cancelled_before_it_starts_ends_cancelled(sdxl_worker: WorkerProcess, store: redis.Redis,
                                                                sink: Sink) -> None:
    busy = job(config={"resolution": "512x512", "num_inference_steps": 40})
    publish(store, "ourvidz.sdxl.generate", busy, "sdxl")
    wait_for(lambda: sink.callbacks(busy["id"]), 60, what="the busy job to start")
    assert sdxl_worker.proc is not None
    # the pool is held mid-job while the second job is queued and cancelled: the busy job cannot end
    # first however slow the CLI is (a few seconds, well inside the pool's lease)
    with held_stopped(sdxl_worker.proc.pid):
        queued = job()
        publish(store, "ourvidz.sdxl.generate", queued, "sdxl")
        result = subprocess.run([str(ROOT / ".venv" / "bin" / "ourvidz"), "cancel", queued["id"]],
                                capture_output=True, text=True, timeout=60)
        assert not sink.callbacks(queued["id"])  # still queued when cancelled
    assert result.returncode == 0 and "cancel requested" in result.stdout
    body = terminal(sink, queued["id"])
    assert body["status"] == "failed" and body["error"]["code"] == "CANCELLED"
    assert terminal(sink, busy["id"])["status"] == "completed"


@pytest.mark.slow
def test_celery_control_revoke_of_a_waiting_job_ends_cancelled(sdxl_worker: WorkerProcess, store: redis.Redis,
                                                               sink: Sink) -> None:
    """``celery -A ourvidz_tasks control revoke TASK_ID`` (Flower's button sends the same) on a job the pool holds
    for its ETA: it never runs, and the edge gets its one ``failed`` callback, ``CANCELLED``."""
    payload = job()
    env = envelope("ourvidz.sdxl.generate", [payload], "sdxl", argsrepr=repr((payload["id"],)))
    env["headers"]["eta"] = (datetime.now(UTC) + timedelta(seconds=ETA_SECONDS)).isoformat()
    task_id = env["headers"]["id"]
    store.lpush("sdxl", json.dumps(env))
    cli_env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def celery(*args: str) -> str:
        done = subprocess.run([str(ROOT / ".venv" / "bin" / "celery"), "-A", "ourvidz_tasks", *args,
                               "-d", sdxl_worker.node, "-t", "5"], env=cli_env, cwd=ROOT, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    wait_for(lambda: task_id in celery("inspect", "scheduled"), ETA_SECONDS / 2, 0.5, "the job held for its ETA")
    assert "revoked" in celery("control", "revoke", task_id)
    body = terminal(sink, payload["id"], ETA_SECONDS + 60)
    assert body["status"] == "failed" and body["error"]["code"] == "CANCELLED", body
    assert [c["body"]["status"] for c in sink.callbacks(payload["id"])] == ["failed"]  # it never ran
    assert not [r for r in sink.requests() if r["path"].startswith("/storage/v1/object/workspace-temp/")
                and f"/{payload['id']}/" in r["path"]]


def test_every_key_we_write_expires(sdxl_worker: WorkerProcess, store: redis.Redis, sink: Sink) -> None:
    run(store, sink, job())
    run(store, sink, job(config={"num_images": 4}))
    keys = [k.decode() for k in store.scan_iter("ourvidz:*", count=1000) if k != b"ourvidz:test-run-lock"]
    assert keys
    # a queue's fair order lives as long as the queue: bounded by its waiting jobs, users and pools
    fair = {keys_.fair(name, part) for queue in QUEUES for name in (queue, f"{queue}.fair") for part in fair_scripts.PARTS}
    without = [k for k in keys if store.ttl(k) == -1 and k not in fair]
    assert without == []
