"""Live previews in the progress callbacks (issue 28): real workers, real Redis, real HTTP to the sink.

The session's SDXL pool runs with the defaults (previews on, about every 20% of
the steps, the tiny random-weight TAESD); pools of this module's own run with
previews' weights missing or broken, to show the job never depends on them.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from PIL import Image

from devtools.sink import Sink

from .support.cluster import Pools, WorkerProcess
from .support.env import KEY
from .support.jobs import new_id, terminal
from .support.process import wait_for
from .wire import publish

PROMPT = "a lighthouse on a cliff at dawn, secret-preview-marker"


def job(**config: Any) -> dict[str, Any]:
    return {"id": new_id(), "type": "sdxl_image_fast", "user_id": "user_123", "prompt": PROMPT,
            "config": {"resolution": "1024x768", "num_inference_steps": 10, "seed": 11, **config}}


def run(store: redis.Redis, sink: Sink, payload: dict[str, Any]) -> dict[str, Any]:
    publish(store, "ourvidz.sdxl.generate", payload, "sdxl")
    return terminal(sink, payload["id"], 240)


def previews(sink: Sink, job_id: str) -> list[dict[str, Any]]:
    return [c["body"]["metadata"]["preview"] for c in sink.callbacks(job_id) if c["body"]["metadata"].get("preview")]


def final_bytes(sink: Sink, body: dict[str, Any]) -> bytes:
    r = httpx.get(f"{sink.url}/storage/v1/object/{body['assets'][0]['url']}", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200
    return r.content


def test_previews_arrive_in_order_each_an_image_of_its_stated_size(
        sdxl_worker: WorkerProcess, store: redis.Redis, sink: Sink) -> None:
    payload = job()
    body = run(store, sink, payload)
    assert body["status"] == "completed", body
    calls = [c["body"] for c in sink.callbacks(payload["id"])]
    shown = previews(sink, payload["id"])
    key = f"workspace-temp/user_123/{payload['id']}/preview.webp"
    # every 2 of the 10 steps, never at the last: at most 4 (one still travelling makes the next wait)
    assert 1 <= len(shown) <= 4, shown
    assert [p["index"] for p in shown] == list(range(1, len(shown) + 1))
    steps = [p["step"] for p in shown]
    assert steps == sorted(set(steps)) and all(step % 2 == 0 and step < 10 for step in steps)
    assert all(p["url"] == key and p["total"] == 10 for p in shown)
    # all of them before the one terminal callback, in processing callbacks whose progress never goes back
    statuses = [c["status"] for c in calls]
    assert statuses.count("completed") == 1 and statuses[-1] == "completed"
    progress = [c["metadata"]["progress"] for c in calls if c["status"] == "processing" and "progress" in c["metadata"]]
    assert progress == sorted(progress)
    # each announced preview is the upload before it: a WEBP of the size it states, 256 px on the long side
    versions = sink.versions(key)
    assert len(versions) == len(shown)
    for preview, data in zip(shown, versions, strict=True):
        image = Image.open(io.BytesIO(data))
        assert image.format == "WEBP" and image.size == (preview["width"], preview["height"]) == (256, 192)
    # never an asset; no prompt in its path or in the pool's log
    assert [a["url"].rsplit("/", 1)[1] for a in body["assets"]] == ["0.png"]
    assert "preview" not in json.dumps(body["assets"])
    assert PROMPT not in key and "secret-preview-marker" not in sdxl_worker.text()


def test_failing_preview_uploads_leave_the_job_completed(
        sdxl_worker: WorkerProcess, store: redis.Redis, sink: Sink) -> None:
    payload = job(seed=12)
    sink.faults(preview=500)
    try:
        body = run(store, sink, payload)
    finally:
        sink.faults()
    assert body["status"] == "completed", body
    assert previews(sink, payload["id"]) == []  # a preview that was not stored is never announced
    assert sink.versions(f"workspace-temp/user_123/{payload['id']}/preview.webp") == []
    tried = [r for r in sink.requests_for(payload["id"]) if r["path"].endswith("/preview.webp")]
    assert tried and len(final_bytes(sink, body)) > 0
    assert f"job {payload['id']}: preview 1 not stored (DeliveryError)" in sdxl_worker.text()


def broken_decoder(folder: Path) -> Path:
    """A TAESD folder that loads but cannot decode SDXL's latents (8 latent channels, not 4)."""
    from diffusers import AutoencoderTiny

    taesd: Any = AutoencoderTiny(encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4,
                                 num_encoder_blocks=(1,) * 4, num_decoder_blocks=(1,) * 4, latent_channels=8)
    taesd.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.mark.slow
def test_finals_are_byte_identical_with_previews_missing_broken_or_on(
        sdxl_worker: WorkerProcess, store: redis.Redis, sink: Sink, pools: Pools, isolated_broker: str,
        tmp_path: Path) -> None:
    payload = job(seed=21)
    with_previews = run(store, sink, payload)
    assert previews(sink, payload["id"])
    private = redis.Redis.from_url(isolated_broker)
    for name, folder in (("missing", tmp_path / "nowhere"), ("broken", broken_decoder(tmp_path / "broken"))):
        worker = pools.start("sdxl", OURVIDZ_BROKER_URL=isolated_broker, OURVIDZ_HOSTNAME=f"previews-{name}-{new_id()[:6]}",
                             OURVIDZ_SDXL_PREVIEW_MODEL=str(folder))
        again = {**payload, "id": new_id()}
        body = run(private, sink, again)
        assert body["status"] == "completed", (name, body)
        assert previews(sink, again["id"]) == []
        assert final_bytes(sink, body) == final_bytes(sink, with_previews), name
        log = worker.text()
        if name == "missing":  # one warning at load, none per job
            assert log.count("SDXL previews are off") == 1
        else:  # the decode fails once, the job's previews end there
            assert log.count(f"job {again['id']}: preview decode failed") == 1
        worker.stop()


@pytest.mark.slow
def test_every_n_steps_at_most_k_and_removed_at_completion(
        sink: Sink, pools: Pools, isolated_broker: str) -> None:
    pools.start("sdxl", OURVIDZ_BROKER_URL=isolated_broker, OURVIDZ_HOSTNAME=f"previews-k-{new_id()[:6]}",
                OURVIDZ_PREVIEW_EVERY="3", OURVIDZ_PREVIEW_MAX="2", OURVIDZ_PREVIEW_REMOVE="1")
    payload = job(resolution="512x512", num_inference_steps=12)
    body = run(redis.Redis.from_url(isolated_broker), sink, payload)
    assert body["status"] == "completed", body
    shown = previews(sink, payload["id"])
    assert 1 <= len(shown) <= 2 and all(p["step"] % 3 == 0 for p in shown), shown
    assert all((p["width"], p["height"]) == (256, 256) for p in shown)
    key = shown[0]["url"]

    def removed() -> bool:
        return any(r["method"] == "DELETE" and r["path"].endswith(key) for r in sink.requests())

    wait_for(removed, 30, what="the preview's removal")
    r = httpx.get(f"{sink.url}/storage/v1/object/{key}", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404


def test_wan_previews_are_short_animations_in_order(wan_worker: WorkerProcess, store: redis.Redis, sink: Sink) -> None:
    payload: dict[str, Any] = {"id": new_id(), "type": "video_fast", "user_id": "user_123", "prompt": PROMPT,
               "config": {"width": 128, "height": 96, "frames": 9, "fps": 8, "num_inference_steps": 10, "seed": 3}}
    publish(store, "ourvidz.wan.generate", payload, "wan")
    body = terminal(sink, payload["id"], 300)
    assert body["status"] == "completed", body
    shown = previews(sink, payload["id"])
    assert 1 <= len(shown) <= 4 and [p["index"] for p in shown] == list(range(1, len(shown) + 1)), shown
    assert [p["step"] for p in shown] == sorted({p["step"] for p in shown})
    statuses = [c["body"]["status"] for c in sink.callbacks(payload["id"])]
    assert statuses[-1] == "completed" and statuses.count("completed") == 1
    versions = sink.versions(shown[0]["url"])
    assert len(versions) == len(shown)
    for preview, data in zip(shown, versions, strict=True):
        image = Image.open(io.BytesIO(data))
        # 9 frames are 3 latent frames: one preview frame each (WEBP merges the random decoder's
        # near-identical frames into one longer frame)
        assert image.format == "WEBP" and preview["frames"] == 3 and 1 <= getattr(image, "n_frames", 1) <= 3
        assert image.size == (preview["width"], preview["height"]) == (128, 96)
    assert [a["type"] for a in body["assets"]] == ["video"] and "preview" not in json.dumps(body["assets"])
    assert "secret-preview-marker" not in wan_worker.text()


def test_a_preview_still_travelling_when_the_job_ends_is_never_announced_after_it(
        sink: Sink, store: redis.Redis) -> None:
    """The stream, a real Delivery and the sink; the upload is held at a fault hook until the job ended."""
    import threading

    import numpy as np

    from ourvidz_tasks.contract.callbacks import callback_body
    from ourvidz_tasks.contract.settings import Settings
    from ourvidz_tasks.services.delivery import Delivery
    from ourvidz_tasks.services.previews import PreviewStream

    settings = Settings(SUPABASE_URL=sink.url, http_backoff=0.01, callbacks="inline", preview_remove=True,  # type: ignore[call-arg]
                        preview_every=1)
    delivery = Delivery(settings, "sdxl@test", store)
    held, started = threading.Event(), threading.Event()
    upload = delivery.storage.upload

    def held_upload(path: str, data: bytes, content_type: str, tries: int | None = None) -> str:
        started.set()
        assert held.wait(30)
        return upload(path, data, content_type, tries)

    delivery.storage.upload = held_upload  # type: ignore[method-assign]  # the fault hook
    job_id = new_id()
    stream = PreviewStream(delivery, settings, "user_1", job_id, 1, lambda: 40)
    try:
        assert stream.due(4, 10)
        stream.offer(4, 10, np.zeros((96, 128, 3), dtype=np.uint8))
        assert started.wait(30) and not stream.due(5, 10)  # one in flight: the next step waits for nothing
        stream.close()  # the job ends (the work returned) while its preview travels
        delivery.finish(callback_body(job_id, "sdxl@test", "completed", attempt=1, assets=[], metadata={}))
        held.set()
        key = f"workspace-temp/user_1/{job_id}/preview.webp"
        wait_for(lambda: len(sink.versions(key)) == 1, 30, what="the late preview's upload")
        wait_for(lambda: any(r["method"] == "DELETE" and r["path"].endswith(key) for r in sink.requests()), 30,
                 what="its removal after the upload")
    finally:
        held.set()
        delivery.close()
    assert [c["body"]["status"] for c in sink.callbacks(job_id)] == ["completed"]
    assert previews(sink, job_id) == []
