"""bin/bridge: raw jobs from the legacy lists into Celery tasks, none lost, none run twice.

In-process tests drive :class:`~ourvidz_tasks.tools.bridge.Bridge` against the real
Redis with a recording publisher (and the real Celery publisher on an
in-memory broker); end-to-end tests run ``bin/bridge`` processes in front of a
real SDXL worker, killing the bridge between its steps (a bridge plug-in, :func:`tests.faults.crash_bridge`).
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from celery.signals import before_task_publish

from devtools.sink import Sink
from ourvidz_tasks import app as real_app
from ourvidz_tasks.contract import keys
from ourvidz_tasks.tools.bridge import PUBLISHED, PUBLISHING, STEPS, Bridge
from ourvidz_tasks.tools.routing import CeleryPublisher, Route, Unroutable, route, task_ids

from .faults import CRASH_AT_ENV, CRASH_STATUS
from .support.cluster import BridgeProcess, WorkerProcess
from .support.env import worker_env
from .support.jobs import new_id, terminal
from .support.process import ROOT, wait_for

PROMPT = "a lighthouse on a cliff at dawn, secret-prompt-marker"


def raw_job(job_type: str = "sdxl_image_fast", **fields: Any) -> dict[str, Any]:
    job = {"id": new_id(), "type": job_type, "user_id": "user_123", "prompt": PROMPT,
           "config": {"resolution": "256x256", "num_inference_steps": 4, "seed": 42}}
    job.update(fields)
    return job


class Recorder:
    """A publisher that records; ``fail`` publishes fail first, ``started`` ids look started."""

    def __init__(self) -> None:
        self.published: list[tuple[dict[str, Any], Route]] = []
        self.fail = 0
        self.started: set[str] = set()

    def publish(self, job: dict[str, Any], where: Route) -> None:
        if self.fail:
            self.fail -= 1
            raise ConnectionError("broker down")
        self.published.append((job, where))

    def known(self, ids: Sequence[str]) -> bool:
        return any(i in self.started for i in ids)

    def ids(self) -> list[str]:
        return [job["id"] for job, _ in self.published]


@pytest.fixture
def lists(store: redis.Redis) -> Iterator[tuple[str, str]]:
    names = (f"test:{new_id()}:sdxl_queue", f"test:{new_id()}:wan_queue")
    yield names
    for name in names:
        store.delete(name, keys.bridge_processing(name))


def make(store: redis.Redis, recorder: Recorder, lists: Sequence[str], **options: Any) -> Bridge:
    return Bridge(store, store, recorder, lists=lists, record_ttl=600, block=0.1, **options)


def dead_for(store: redis.Redis, queue: str) -> list[dict[str, Any]]:
    return [entry for entry in map(json.loads, store.lrange(keys.DEAD_LETTERS, 0, -1)) if entry["queue"] == queue]


def push(store: redis.Redis, queue: str, *items: Any) -> None:
    for item in items:
        store.rpush(queue, item if isinstance(item, bytes) else json.dumps(item))


# -- in process -------------------------------------------------------------------


def test_oldest_job_first(store: redis.Redis, lists: tuple[str, str]) -> None:
    recorder = Recorder()
    jobs = [raw_job() for _ in range(4)]
    push(store, lists[0], *jobs)  # the deployed edge function RPUSHes
    assert make(store, recorder, lists).drain() == 4
    assert recorder.ids() == [job["id"] for job in jobs]
    assert recorder.published[0][0] == jobs[0]  # the payload untouched
    assert store.llen(lists[0]) == 0 and store.llen(keys.bridge_processing(lists[0])) == 0


def test_routed_by_type_never_by_list(store: redis.Redis, lists: tuple[str, str]) -> None:
    recorder = Recorder()
    wan_image = raw_job("image_fast")
    enhanced = raw_job("video7b_fast_enhanced")
    already = raw_job("image7b_high_enhanced", metadata={"enhanced_prompt": "x"})
    legacy = {"job_id": new_id(), "job_type": "sdxl_image_high", "user_id": "u"}
    push(store, lists[0], wan_image, enhanced)  # WAN types on sdxl_queue
    push(store, lists[1], already, legacy)  # an SDXL type on wan_queue
    make(store, recorder, lists).drain()
    routes = {job.get("id") or job.get("job_id"): where for job, where in recorder.published}
    assert routes[wan_image["id"]].task == "ourvidz.wan.generate" and not routes[wan_image["id"]].enhance
    assert routes[enhanced["id"]].enhance and routes[enhanced["id"]].task == "ourvidz.wan.generate"
    assert not routes[already["id"]].enhance
    assert routes[legacy["job_id"]].task == "ourvidz.sdxl.generate"


@pytest.mark.parametrize(
    ("item", "reason"),
    [
        (b"not json at all", "not JSON"),
        (b"\xff\xfe\x00garbage", "not JSON"),
        (b'["a", "list"]', "a job must be a JSON object, got list"),
        (json.dumps({"type": "sdxl_image_fast", "user_id": "u", "prompt": PROMPT}).encode(), "no usable job id"),
        (json.dumps({"id": "has spaces", "type": "sdxl_image_fast"}).encode(), "no usable job id"),
        (json.dumps({"id": "ok-id", "type": "sdxl_video"}).encode(), "unknown job type 'sdxl_video'"),
        (json.dumps({"id": "ok-id2"}).encode(), "unknown job type none"),
    ],
)
def test_malformed_items_become_dead_letters(store: redis.Redis, lists: tuple[str, str], item: bytes,
                                              reason: str) -> None:
    recorder = Recorder()
    good = raw_job()
    push(store, lists[0], item, good)
    make(store, recorder, lists).drain()
    assert recorder.ids() == [good["id"]]  # the bridge went on
    (entry,) = dead_for(store, lists[0])
    assert entry["reason"].startswith(reason), entry["reason"]
    assert entry["raw"] == item.decode("utf-8", "replace")  # kept whole for an operator
    assert store.llen(keys.bridge_processing(lists[0])) == 0


def test_a_job_id_is_published_once(store: redis.Redis, lists: tuple[str, str]) -> None:
    recorder = Recorder()
    job = raw_job()
    push(store, lists[0], job, job)
    push(store, lists[1], job)
    make(store, recorder, lists).drain()
    assert recorder.ids() == [job["id"]]
    assert store.get(keys.bridge_record(job["id"])) == PUBLISHED.encode()


def test_recovery_publishes_what_a_crash_left_once(store: redis.Redis, lists: tuple[str, str]) -> None:
    recorder = Recorder()
    fresh, done, started, unsure = (raw_job() for _ in range(4))
    store.set(keys.bridge_record(done["id"]), PUBLISHED, ex=60)
    store.set(keys.bridge_record(started["id"]), PUBLISHING, ex=60)
    store.set(keys.bridge_record(unsure["id"]), PUBLISHING, ex=60)
    recorder.started.add(task_ids(started["id"], False)[0])  # the result backend knows this one
    push(store, keys.bridge_processing(lists[0]), fresh, done, started, unsure)
    bridge = make(store, recorder, lists)
    assert bridge.recover(lists[0]) == 4
    assert recorder.ids() == [fresh["id"], unsure["id"]]
    for job in (fresh, done, started, unsure):
        assert store.get(keys.bridge_record(job["id"])) == PUBLISHED.encode()
    assert store.llen(keys.bridge_processing(lists[0])) == 0


def test_a_failed_publish_keeps_the_job(store: redis.Redis, lists: tuple[str, str]) -> None:
    recorder = Recorder()
    recorder.fail = 1
    job = raw_job()
    push(store, lists[0], job)
    bridge = make(store, recorder, lists)
    with pytest.raises(ConnectionError):
        bridge.step(lists[0], block=False)
    assert store.lrange(keys.bridge_processing(lists[0]), 0, -1) == [json.dumps(job).encode()]
    bridge.recover(lists[0])
    assert recorder.ids() == [job["id"]]
    assert store.llen(keys.bridge_processing(lists[0])) == 0


class Crash(Exception):
    """What a step hook raises to stop the bridge between two steps."""


def test_a_crash_between_steps_loses_nothing(store: redis.Redis, lists: tuple[str, str]) -> None:
    """The step hooks see every step; stopped after the claim, the job waits in the processing list."""
    recorder, seen = Recorder(), []

    def crash_after_claim(step: str) -> None:
        seen.append(step)
        if step == "claim":
            raise Crash(step)

    job = raw_job()
    push(store, lists[0], job)
    with pytest.raises(Crash):
        make(store, recorder, lists, step_hooks=[crash_after_claim]).step(lists[0], block=False)
    assert seen == ["move", "claim"] and recorder.ids() == []
    assert store.lrange(keys.bridge_processing(lists[0]), 0, -1) == [json.dumps(job).encode()]
    assert store.get(keys.bridge_record(job["id"])) == PUBLISHING.encode()

    restarted = make(store, recorder, lists, step_hooks=[seen.append])
    assert restarted.recover(lists[0]) == 1
    assert seen[2:] == ["claim", "publish"] and recorder.ids() == [job["id"]]
    assert store.llen(keys.bridge_processing(lists[0])) == 0


def test_the_serving_loop_survives_errors(store: redis.Redis, lists: tuple[str, str]) -> None:
    recorder = Recorder()
    recorder.fail = 2
    job = raw_job()
    push(store, lists[0], b"{broken", job)
    bridge = make(store, recorder, lists)
    thread = threading.Thread(target=bridge.serve, args=(lists[0],), daemon=True)
    thread.start()
    try:
        wait_for(lambda: recorder.ids() == [job["id"]], 30, what="the job after two failed publishes")
    finally:
        bridge.stop.set()
        thread.join(10)
    assert not thread.is_alive()
    assert len(dead_for(store, lists[0])) == 1


def test_every_key_written_expires(store: redis.Redis, lists: tuple[str, str]) -> None:
    recorder = Recorder()
    job = raw_job()
    push(store, lists[0], job, b"junk")
    bridge = make(store, recorder, lists)
    assert bridge.move(lists[0], block=False) is not None
    assert store.ttl(keys.bridge_processing(lists[0])) > 0
    bridge.drain()
    assert store.ttl(keys.bridge_record(job["id"])) > 0
    assert store.ttl(keys.DEAD_LETTERS) > 0


# -- the real Celery publisher (in-memory broker, the real routes) ---------------------


@pytest.fixture
def memory_app() -> Iterator[Celery]:
    # the real app's routes and message maker (job-id-only argsrepr) on an in-memory broker
    app = Celery("bridge-test", broker="memory://", backend="cache+memory://", set_as_current=False,
                 amqp=real_app.amqp_cls)
    app.conf.update(
        task_routes=real_app.conf.task_routes, task_queues=real_app.conf.task_queues,
        task_default_queue=real_app.conf.task_default_queue, task_create_missing_queues=False,
        task_serializer="json", accept_content=["json"],
    )
    yield app


def capture() -> tuple[list[dict[str, Any]], Callable[..., None]]:
    sent: list[dict[str, Any]] = []

    def receiver(body: Any = None, routing_key: str = "", headers: Any = None, **_: Any) -> None:
        sent.append({"queue": routing_key, "headers": dict(headers or {}), "body": body})

    return sent, receiver


def test_celery_publisher_routes_chains_and_redacts(memory_app: Celery) -> None:
    sent, receiver = capture()
    before_task_publish.connect(receiver, weak=False)
    try:
        publisher = CeleryPublisher(memory_app)
        sdxl, wan, chained = raw_job(), raw_job("image_fast"), raw_job("video7b_fast_enhanced")
        for job in (sdxl, wan, chained):
            publisher.publish(job, route(job))
    finally:
        before_task_publish.disconnect(receiver)
    assert [(s["queue"], s["headers"]["task"]) for s in sent] == [
        ("sdxl", "ourvidz.sdxl.generate"), ("wan", "ourvidz.wan.generate"), ("chat", "ourvidz.chat.enhance"),
    ]
    for message, job in zip(sent, (sdxl, wan, chained), strict=True):
        assert message["headers"]["argsrepr"] == f"({job['id']!r},)"
        assert PROMPT not in json.dumps(message["headers"])
        assert list(message["body"][0]) == [job]
    assert sent[0]["headers"]["id"] == task_ids(sdxl["id"], False)[0]
    enhance_id, generate_id = task_ids(chained["id"], True)
    assert sent[2]["headers"]["id"] == enhance_id
    (step,) = sent[2]["body"][2]["chain"]
    assert step["task"] == "ourvidz.wan.generate" and step["options"]["task_id"] == generate_id


def test_celery_publisher_asks_the_result_backend(memory_app: Celery) -> None:
    publisher = CeleryPublisher(memory_app)
    ids = task_ids(new_id(), True)
    assert not publisher.known(ids)
    memory_app.backend.store_result(ids[0], None, "STARTED")
    assert publisher.known(ids)


def test_route_errors_name_the_problem() -> None:
    with pytest.raises(Unroutable, match="JSON object"):
        route("text")
    assert route({"id": "a", "type": "image7b_fast_enhanced", "metadata": {"enhancement_error": "x"}}).enhance is False
    assert route({"id": "a", "type": "", "job_type": "image_high"}).family == "wan"


# -- end to end: bin/bridge processes and a real SDXL worker ------------------------------


@pytest.fixture
def start_bridge(sink: Sink, store: redis.Redis, tmp_path: Path) -> Iterator[Callable[..., BridgeProcess]]:
    """Starts ``bin/bridge`` processes on the real ``sdxl_queue``/``wan_queue``; stops and cleans up after."""
    started: list[BridgeProcess] = []

    def start(*args: str, **extra: str) -> BridgeProcess:
        env = worker_env(sink, "bridge", **extra)
        bridge = BridgeProcess(tmp_path / f"bridge-{len(started)}.log", env, args).launch()
        started.append(bridge)
        return bridge

    yield start
    for bridge in started:
        bridge.stop()
    for name in ("sdxl_queue", "wan_queue"):
        store.delete(name, keys.bridge_processing(name))


def terminals(sink: Sink, job_id: str) -> list[dict[str, Any]]:
    return [c for c in sink.callbacks(job_id) if c["body"]["status"] in ("completed", "failed")]


@pytest.mark.slow
def test_a_raw_job_on_sdxl_queue_completes(sdxl_worker: WorkerProcess, store: redis.Redis, sink: Sink,
                                          start_bridge: Callable[..., BridgeProcess]) -> None:
    bridge = start_bridge().wait_ready()
    job = raw_job()
    store.rpush("sdxl_queue", json.dumps(job))
    body = terminal(sink, job["id"])
    assert body["status"] == "completed", body
    assert body["assets"][0]["url"] == f"workspace-temp/user_123/{job['id']}/0.png"
    assert all(c["signature_ok"] for c in sink.callbacks(job["id"]))
    assert bridge.stop() == 0
    log = bridge.text()
    assert f"job {job['id']} (sdxl_image_fast) from sdxl_queue published as ourvidz.sdxl.generate" in log
    assert "secret-prompt-marker" not in log and "bridge stopped" in log
    assert store.get(keys.BRIDGE_LOCK) is None  # released on a clean stop


@pytest.mark.slow
@pytest.mark.parametrize("point", STEPS)
def test_killed_between_steps_the_job_still_runs_once(point: str, sdxl_worker: WorkerProcess, store: redis.Redis,
                                                      sink: Sink, start_bridge: Callable[..., BridgeProcess]) -> None:
    crashing = start_bridge(OURVIDZ_BRIDGE_PLUGINS="tests.faults:crash_bridge", **{CRASH_AT_ENV: point}).wait_ready()
    job = raw_job()
    store.rpush("sdxl_queue", json.dumps(job))
    assert crashing.wait(60) == CRASH_STATUS, crashing.text()[-2000:]
    # the job is in no list but the processing list: a plain RPOP consumer would have lost it
    assert store.lrange(keys.bridge_processing("sdxl_queue"), 0, -1) == [json.dumps(job).encode()]
    assert store.llen("sdxl_queue") == 0

    restarted = start_bridge().wait_ready()
    body = terminal(sink, job["id"])
    assert body["status"] == "completed", body
    time.sleep(3)  # time for a second run, if one had been published
    assert len(terminals(sink, job["id"])) == 1
    assert sdxl_worker.text().count(f"job {job['id']} completed") == 1
    assert store.llen(keys.bridge_processing("sdxl_queue")) == 0
    assert "1 job(s) left by an earlier run handled" in restarted.text()
    assert restarted.stop() == 0


def test_a_bad_configuration_is_one_line(sink: Sink, tmp_path: Path) -> None:
    env = worker_env(sink, "bridge", OURVIDZ_LEGACY_REDIS_URL="no-scheme-here")
    out = subprocess.run([str(ROOT / "bin" / "bridge")], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "OURVIDZ_LEGACY_REDIS_URL" in out.stderr


def test_a_bad_plugin_is_one_line(sink: Sink) -> None:
    env = worker_env(sink, "bridge", OURVIDZ_BRIDGE_PLUGINS="tests.nowhere:plugin")
    out = subprocess.run([str(ROOT / "bin" / "bridge")], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "OURVIDZ_BRIDGE_PLUGINS" in out.stderr


@pytest.mark.slow
def test_drain_moves_what_waits_and_exits(sdxl_worker: WorkerProcess, store: redis.Redis, sink: Sink,
                                          start_bridge: Callable[..., BridgeProcess]) -> None:
    good, invalid = raw_job(), raw_job()
    del invalid["user_id"]  # routable, so published: its worker answers INVALID_JOB
    push(store, "sdxl_queue", good, invalid, b"garbage")
    drain = start_bridge("--drain")
    assert drain.wait(60) == 0, drain.text()[-2000:]
    assert "drained: 3 job(s) moved" in drain.text()
    assert terminal(sink, good["id"])["status"] == "completed"
    failed = terminal(sink, invalid["id"])
    assert failed["error"]["code"] == "INVALID_JOB" and "user_id" in failed["error"]["message"]
    assert store.llen("sdxl_queue") == 0 and store.llen(keys.bridge_processing("sdxl_queue")) == 0


def test_one_bridge_at_a_time(store: redis.Redis, start_bridge: Callable[..., BridgeProcess]) -> None:
    first = start_bridge().wait_ready()
    second = start_bridge()
    wait_for(lambda: "another bridge holds" in second.text(), 30, what="the second bridge waiting")
    assert "bridge ready" not in second.text()
    assert first.stop() == 0
    second.wait_ready(30)
    assert second.stop() == 0 and store.get(keys.BRIDGE_LOCK) is None
