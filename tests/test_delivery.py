"""Results delivery against the real sink over HTTP: uploads, signatures, retries, idempotency."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import os
import random
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import redis
from PIL import Image

from devtools.sink import Sink
from ourvidz_tasks.contract.callbacks import callback_body, dumps, sign
from ourvidz_tasks.contract.errors import DeliveryError
from ourvidz_tasks.contract.settings import Settings
from ourvidz_tasks.runtime.lifecycle import backoff
from ourvidz_tasks.services.backoff import Backoff, full_jitter
from ourvidz_tasks.services.delivery import Delivery, HttpCallbacks
from ourvidz_tasks.services.guard import DeadLetters
from ourvidz_tasks.services.media import ImageOutput, VideoOutput
from ourvidz_tasks.services.metrics import outbox_metrics
from ourvidz_tasks.services.outbox_store import JOBS, LIST, LOCK, STUCK_SECONDS, Drainer, Outbox, pool_callbacks

from .support.env import KEY, SECRET
from .support.jobs import new_id
from .support.process import ROOT


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
    tries = [r for r in sink.requests_for(job_id) if r["path"] == "/functions/v1/job-callback"]
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


def test_the_sink_tells_one_jobs_requests_from_the_rest(delivery: Delivery, sink: Sink) -> None:
    """``Sink.requests_for`` and ``GET /_sink/requests?job_id=``: a job's callbacks (refused ones too) and
    its objects, nobody else's, whatever the session's sink received before."""
    mine, other = new_id(), new_id()
    for job_id in (other, mine, other):
        delivery.storage.upload(f"workspace-temp/u/{job_id}/0.png", b"x", "image/png")
        delivery.finish(callback_body(job_id, "w", "completed", attempt=1))
    sink.faults(callback=503)
    delivery.processing(mine, 1, wait=True)  # refused: still one of its requests
    sink.faults()
    seen = sink.requests_for(mine)
    assert [(r["method"], r["path"]) for r in seen[:2]] == [
        ("POST", f"/storage/v1/object/workspace-temp/u/{mine}/0.png"), ("POST", "/functions/v1/job-callback")]
    assert len(seen) == 2 + 3 and {r["path"] for r in seen[2:]} == {"/functions/v1/job-callback"}  # 3 tries
    assert httpx.get(f"{sink.url}/_sink/requests", params={"job_id": mine}).json() == seen
    calls = httpx.get(f"{sink.url}/_sink/callbacks", params={"job_id": mine}).json()
    assert [c["body"]["status"] for c in calls] == ["completed"]


def test_a_thumbnail_failure_never_fails_the_asset(delivery: Delivery, sink: Sink) -> None:
    sink.faults(thumbnail=500)
    (asset,) = delivery.publish("user_1", new_id(), [ImageOutput(Image.new("RGB", (64, 64)), {})])
    assert asset["thumbnail_url"] is None
    assert asset["metadata"]["thumbnail_error"]["code"] == "THUMBNAIL_GENERATION_ERROR"
    assert asset["url"].endswith("/0.png")


# -- the outbox: at once from the pool, only what fails waits durably in Redis ------------------------

@pytest.fixture()
def private(isolated_broker: str) -> redis.Redis:
    """A database of its own: no running pool drains this outbox behind the test's back."""
    return redis.Redis.from_url(isolated_broker)


def _pool_transport(sink: Sink, store: redis.Redis, node: str = "sdxl@test") -> tuple[Delivery, Drainer]:
    settings = Settings(SUPABASE_URL=sink.url, http_backoff=0.01, callback_timeout=5, callbacks="outbox")
    client = httpx.Client(follow_redirects=False)
    transport, drainer = pool_callbacks(settings, store, client, node)
    return Delivery(settings, node, store, client=client, transport=transport), drainer


def _statuses(sink: Sink, job_id: str) -> list[str]:
    return [c["body"]["status"] for c in sink.callbacks(job_id)]


def test_a_pool_delivers_at_once_and_the_outbox_stays_empty(sink: Sink, private: redis.Redis) -> None:
    delivery, _ = _pool_transport(sink, private)
    job_id = new_id()
    try:
        delivery.processing(job_id, 1)
        delivery.finish(callback_body(job_id, "sdxl@test", "completed", attempt=1))
    finally:
        delivery.close()
    assert _statuses(sink, job_id) == ["processing", "completed"]  # before finish returned: no drainer ran
    assert delivery.delivered(job_id)
    assert private.llen(LIST) == 0 and not private.exists(JOBS)


def test_failed_deliveries_wait_in_the_outbox_in_order_and_a_drainer_delivers_them(
        sink: Sink, private: redis.Redis) -> None:
    delivery, drainer = _pool_transport(sink, private)
    first, second = new_id(), new_id()
    sink.faults(callback=503)
    try:
        delivery.processing(first, 1, {"progress": 0})
        delivery.processing(first, 1, {"progress": 50})
        delivery.finish(callback_body(first, "sdxl@test", "completed", attempt=1))
        sink.faults()  # the edge is back, but this pool is behind: the next job waits its turn
        delivery.processing(second, 1)
        delivery.finish(callback_body(second, "sdxl@test", "failed", attempt=1, error={"code": "INVALID_JOB"}))
        assert sink.callbacks(first) == [] and sink.callbacks(second) == []
        assert private.llen(LIST) == 5 and not delivery.delivered(first)
        sink.faults(callback=503)
        assert drainer.outbox.drain(drainer.send, "t") == "blocked" and private.llen(LIST) == 5
        sink.faults()
        assert drainer.outbox.drain(drainer.send, "t") == "empty"
        arrived = [(c["body"]["job_id"], c["body"]["status"]) for c in sink.callbacks()
                   if c["body"]["job_id"] in (first, second)]
        assert arrived == [(first, "processing"), (first, "processing"), (first, "completed"),
                           (second, "processing"), (second, "failed")]
        assert [c["body"]["metadata"].get("progress") for c in sink.callbacks(first)][:2] == [0, 50]
        assert all(c["signature_ok"] for c in sink.callbacks(first) + sink.callbacks(second))
        assert delivery.delivered(first) and delivery.delivered(second) and not private.exists(JOBS)
        drainer.on_empty()  # what the drainer thread calls once it finds the outbox empty
        third = new_id()
        delivery.processing(third, 1)
        delivery.close()
        assert _statuses(sink, third) == ["processing"] and private.llen(LIST) == 0  # direct again
    finally:
        sink.faults()
        delivery.close()


def test_a_terminal_body_follows_its_jobs_bodies_already_in_the_outbox(sink: Sink, private: redis.Redis) -> None:
    """A job redelivered to another pool: its predecessor's bodies wait in the outbox, so its terminal waits too."""
    job_id = new_id()
    other, _ = _pool_transport(sink, private, "sdxl@other")
    try:
        Outbox.for_settings(private, other.settings).push(job_id, dumps(callback_body(job_id, "a", "processing", attempt=1)))
        other.finish(callback_body(job_id, "sdxl@other", "completed", attempt=1))
        assert sink.callbacks(job_id) == [] and private.llen(LIST) == 2
        Drainer(Outbox.for_settings(private, other.settings), other.transport.http.send, "d").tick()  # type: ignore[attr-defined]
        assert _statuses(sink, job_id) == ["processing", "completed"] and other.delivered(job_id)
    finally:
        other.close()


def test_one_drainer_at_a_time_and_a_refused_body_is_a_dead_letter(sink: Sink, private: redis.Redis) -> None:
    outbox = Outbox.for_settings(private, Settings(SUPABASE_URL=sink.url))
    job_id = new_id()
    outbox.push(job_id, dumps(callback_body(job_id, "w", "completed", attempt=1)))
    assert private.set(LOCK, "someone-else", px=60_000)
    assert outbox.drain(lambda *_: pytest.fail("a second drainer sent"), "me") == "busy"
    private.delete(LOCK)
    sink.faults(callback=400)
    try:
        http = HttpCallbacks(Settings(SUPABASE_URL=sink.url), httpx.Client(), tries=1)
        assert outbox.drain(http.send, "me") == "empty"
    finally:
        sink.faults()
    (dead,) = DeadLetters(private).entries()
    assert dead["job_id"] == job_id and "refused" in dead["reason"] and private.llen(LIST) == 0


def _status(url: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    environ.update(OURVIDZ_REDIS_URL=url, **env)
    return subprocess.run([sys.executable, "-m", "ourvidz_tasks.tools.cli", "status", "--json"], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=60)


def _health(store: redis.Redis, settings: Settings) -> str:
    (family,) = [m for m in outbox_metrics(store, settings) if m.name == "ourvidz_outbox_consumer"]
    (health,) = [s.labels["health"] for s in family.samples if s.value == 1]
    return str(health)


def test_a_configured_consumer_that_is_missing_or_stuck_shows_in_logs_status_and_metrics(
        sink: Sink, private: redis.Redis, isolated_broker: str, caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(SUPABASE_URL=sink.url, outbox_consumer=True)
    outbox = Outbox.for_settings(private, settings)
    pool = Drainer(outbox, lambda *_: None, "sdxl@test", expect_consumer=True)
    with caplog.at_level(logging.WARNING, logger="ourvidz_tasks.services.outbox_store"):
        pool.tick()
    assert "no live `bin/worker outbox` consumer" in caplog.text
    missing = _status(isolated_broker, OURVIDZ_OUTBOX_CONSUMER="1")
    assert missing.returncode == 1 and json.loads(missing.stdout)["outbox"]["consumer_health"] == "missing"
    assert _health(private, settings) == "missing"
    assert _status(isolated_broker).returncode == 0  # none configured: the pools drain, nothing is wrong

    outbox.beat("outbox@test", ttl=60)  # a consumer that is alive, but whose outbox does not move
    job_id = new_id()
    private.rpush(LIST, json.dumps({"job_id": job_id, "body": "{}", "at": time.time() - 2 * STUCK_SECONDS}))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ourvidz_tasks.services.outbox_store"):
        pool.tick()
    assert private.llen(LIST) == 1  # a live consumer drains; the pool leaves it alone
    assert "the consumer is alive but the oldest callback has waited" in caplog.text
    stuck = json.loads(_status(isolated_broker, OURVIDZ_OUTBOX_CONSUMER="1").stdout)["outbox"]
    assert stuck["consumer_health"] == "stuck" and stuck["consumer"] == "outbox@test" and stuck["depth"] == 1
    assert _health(private, settings) == "stuck"


def test_every_retry_pause_is_full_jitter() -> None:
    """``uniform(0, min(cap, base * 2**n))``: spread over the whole ceiling, which doubles up to the cap."""
    random.seed(7)
    for attempt, ceiling in ((0, 0.5), (1, 1.0), (3, 4.0), (6, 10.0), (10_000, 10.0)):
        pauses = [full_jitter(attempt, 0.5, 10.0) for _ in range(400)]
        assert all(0.0 <= p <= ceiling for p in pauses)
        assert min(pauses) < 0.1 * ceiling and max(pauses) > 0.9 * ceiling
    loop = Backoff(1.0, 8.0)
    assert not loop.backing_off
    assert [loop.next() <= c for c in (1, 2, 4, 8, 8)] == [True] * 5 and loop.backing_off
    loop.reset()
    assert not loop.backing_off and loop.next() <= 1.0


def test_a_task_retry_countdown_is_whole_seconds_and_never_zero() -> None:
    """Celery's native delayed delivery (RabbitMQ quorum queues) refuses a countdown under 1 s."""
    random.seed(11)
    for retries, ceiling in ((0, 2), (1, 4), (3, 16), (20, 600)):
        countdowns = [backoff(retries) for _ in range(400)]
        assert all(isinstance(c, int) and 1 <= c <= ceiling for c in countdowns)
        assert min(countdowns) <= max(1, ceiling // 4) and max(countdowns) >= ceiling * 3 // 4


_LIGHT = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("PIL", "numpy", "cv2", "torch"):
            raise ImportError(name)
sys.meta_path.insert(0, Block())
import ourvidz_tasks.services.delivery, ourvidz_tasks.services.outbox_store
"""


def test_delivery_and_the_outbox_import_without_pil_or_numpy() -> None:
    """The light outbox consumer installs neither: media is imported only where an output is encoded."""
    subprocess.run([sys.executable, "-c", _LIGHT], cwd=ROOT, check=True, timeout=60)
