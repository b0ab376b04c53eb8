"""Results delivery against the real sink over HTTP: uploads, signatures, retries, idempotency."""

from __future__ import annotations

import hashlib
import hmac
import io
import json

import httpx
import numpy as np
import pytest
import redis
from PIL import Image

from ourvidz_tasks.delivery import Delivery, callback_body, dumps, sign
from ourvidz_tasks.errors import DeliveryError
from ourvidz_tasks.media import ImageOutput, VideoOutput
from ourvidz_tasks.settings import Settings
from ourvidz_tasks.sink import Sink

from .conftest import KEY, SECRET, new_id


@pytest.fixture()
def delivery(sink: Sink, store: redis.Redis) -> Delivery:
    settings = Settings(SUPABASE_URL=sink.url, http_backoff=0.01, http_timeout=5, callbacks="inline")
    d = Delivery(settings, "sdxl@test", store)
    yield d
    sink.faults()
    d.close()


def test_signature_is_hmac_of_exact_bytes() -> None:
    body = dumps({"job_id": "j", "status": "completed", "text": "é"})
    expected = hmac.new(b"k", body, hashlib.sha256).hexdigest()
    assert sign(b"k", body) == f"sha256={expected}"


def test_publish_uploads_png_and_thumbnail(delivery: Delivery, sink: Sink) -> None:
    job_id = new_id()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 600, 3), dtype=np.uint8))
    frames = np.random.default_rng(1).integers(0, 255, (9, 64, 96, 3), dtype=np.uint8)
    assets = delivery.publish("user_1", job_id, [ImageOutput(image, {"seed": 3}), VideoOutput(frames, 8, {"frames": 9})])
    assert [a["url"] for a in assets] == [f"workspace-temp/user_1/{job_id}/0.png", f"workspace-temp/user_1/{job_id}/1.mp4"]
    assert assets[0]["thumbnail_url"] == f"workspace-temp/user_1/{job_id}/0.thumb.webp"
    client = httpx.Client(headers={"Authorization": f"Bearer {KEY}"})
    png = client.get(f"{sink.url}/storage/v1/object/{assets[0]['url']}")
    assert png.headers["content-type"] == "image/png"
    decoded = Image.open(io.BytesIO(png.content))
    assert decoded.format == "PNG" and decoded.size == (600, 300)
    assert np.array_equal(np.asarray(decoded), np.asarray(image))
    thumb = Image.open(io.BytesIO(client.get(f"{sink.url}/storage/v1/object/{assets[0]['thumbnail_url']}").content))
    assert thumb.format == "WEBP" and thumb.size == (256, 128)
    small = Image.open(io.BytesIO(client.get(f"{sink.url}/storage/v1/object/{assets[1]['thumbnail_url']}").content))
    assert small.size == (96, 64)  # never upscaled
    meta = assets[0]["metadata"]
    assert meta["asset_index"] == 0 and meta["seed"] == 3 and meta["format"] == "png"
    assert meta["file_size_bytes"] == len(png.content)
    assert assets[1]["type"] == "video" and assets[1]["metadata"]["format"] == "mp4"
    # the key is required
    assert httpx.get(f"{sink.url}/storage/v1/object/{assets[0]['url']}").status_code == 401


def test_terminal_callback_is_signed_recorded_and_sent_once(delivery: Delivery, sink: Sink) -> None:
    job_id = new_id()
    delivery.processing(job_id, 1, {"progress": 50})
    body = callback_body(job_id, "sdxl@test", "completed", attempt=1, metadata={"batch_size": 1})
    delivery.finish(body)
    again = callback_body(job_id, "sdxl@test", "failed", attempt=2, error={"code": "OOM_ERROR"})
    assert delivery.finish(again)["status"] == "completed"  # the first terminal body wins
    calls = sink.callbacks(job_id)
    assert [c["body"]["status"] for c in calls] == ["processing", "completed"]
    assert all(c["signature_ok"] and c["signature"].startswith("sha256=") for c in calls)
    final = calls[-1]["body"]
    assert final["assets"] == [] and "error" not in final
    assert final["metadata"]["callback_id"] and final["metadata"]["attempt"] == 1
    assert calls[0]["body"]["metadata"]["progress"] == 50
    assert delivery.terminal_of(job_id)["metadata"]["callback_id"] == final["metadata"]["callback_id"]


def test_callback_retries_5xx_then_keeps_the_body(delivery: Delivery, sink: Sink) -> None:
    job_id = new_id()
    sink.faults(callback=503)
    body = callback_body(job_id, "w", "failed", attempt=1, error={"code": "INVALID_JOB", "message": "m", "retryable": False})
    delivery.finish(body)
    tries = [r for r in sink.requests() if r["path"] == "/functions/v1/job-callback"]
    assert len(tries) >= 3
    assert not delivery.delivered(job_id) and sink.callbacks(job_id) == []
    sink.faults()
    assert delivery.resend(job_id, delivery.terminal_of(job_id))
    (call,) = sink.callbacks(job_id)
    assert call["body"]["metadata"]["callback_id"] == body["metadata"]["callback_id"]


def test_upload_failure_raises_after_retries(delivery: Delivery, sink: Sink) -> None:
    sink.faults(storage=500)
    with pytest.raises(DeliveryError, match="after 3 tries: HTTP 500"):
        delivery.storage.upload("workspace-temp/u/j/0.png", b"x", "image/png")


def test_sink_rejects_bad_signature(sink: Sink) -> None:
    body = json.dumps({"job_id": "bad-sig", "status": "completed"}).encode()
    r = httpx.post(f"{sink.url}/functions/v1/job-callback", content=body,
                   headers={"Authorization": f"Bearer {KEY}", "X-Callback-Signature": "sha256=00"})
    assert r.status_code == 401
    good = sign(SECRET.encode(), body)
    r = httpx.post(f"{sink.url}/functions/v1/job-callback", content=body,
                   headers={"Authorization": f"Bearer {KEY}", "X-Callback-Signature": good})
    assert r.status_code == 200


def test_a_thumbnail_failure_never_fails_the_asset(delivery: Delivery, sink: Sink) -> None:
    sink.faults(thumbnail=500)
    (asset,) = delivery.publish("user_1", new_id(), [ImageOutput(Image.new("RGB", (64, 64)), {})])
    assert asset["thumbnail_url"] is None
    assert asset["metadata"]["thumbnail_error"]["code"] == "THUMBNAIL_GENERATION_ERROR"
    assert asset["url"].endswith("/0.png")
