"""OOM remedies and device faults through real SDXL and WAN worker processes.

Faults come in through the runtime plug-in seam (``OURVIDZ_RUNTIME_PLUGINS=tests.faults:inject``):
the hook raises ``torch.OutOfMemoryError`` or a CUDA error right before a model call, and the
worker takes the path a real CUDA failure takes. The rules live in a file the test rewrites
between jobs, so one worker serves several scenarios.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from PIL import Image

from devtools.sink import Sink

from .faults import fault_env, fired, set_rules
from .support.cluster import WorkerProcess
from .support.env import KEY, worker_env
from .support.jobs import new_id, terminal
from .support.process import wait_for
from .wire import publish

pytestmark = pytest.mark.slow


def sdxl_job(num_images: int = 1, **fields: Any) -> dict[str, Any]:
    return {"id": new_id(), "type": "sdxl_image_fast", "user_id": "user_123", "prompt": "a red kite",
            "config": {"resolution": "256x256", "num_inference_steps": 2, "seed": 9, "num_images": num_images},
            **fields}


def wan_job() -> dict[str, Any]:
    return {"id": new_id(), "type": "video_fast", "user_id": "user_123", "prompt": "a boat on a lake",
            "config": {"width": 64, "height": 64, "frames": 5, "fps": 8, "num_inference_steps": 2, "seed": 11}}


def images(sink: Sink, body: dict[str, Any]) -> list[np.ndarray]:
    out = []
    for asset in body["assets"]:
        r = httpx.get(f"{sink.url}/storage/v1/object/{asset['url']}", headers={"Authorization": f"Bearer {KEY}"})
        out.append(np.asarray(Image.open(io.BytesIO(r.content))).astype(int))
    return out


def loads(store: redis.Redis, worker: WorkerProcess, model: str) -> int:
    return int(store.hget(f"ourvidz:loads:{worker.node}", model) or 0)


def run(store: redis.Redis, sink: Sink, job: dict[str, Any], task: str, queue: str) -> dict[str, Any]:
    publish(store, task, job, queue)
    return terminal(sink, job["id"], 240)


def test_sdxl_steps_down_through_every_remedy(isolated_broker: str, tmp_path: Path, sink: Sink,
                                              start_worker: Callable[..., WorkerProcess]) -> None:
    from ourvidz_tasks.runtime.ledger import Ledger

    store, rules, host = redis.Redis.from_url(isolated_broker), tmp_path / "rules.json", f"oom-{new_id()[:6]}"
    set_rules(rules)
    worker = start_worker("sdxl", OURVIDZ_HOSTNAME=host, **fault_env(isolated_broker, rules))

    def generate(job: dict[str, Any]) -> dict[str, Any]:
        return run(store, sink, job, "ourvidz.sdxl.generate", "sdxl")

    # a batch of 6 that fits only one image at a time: 6 -> 3+3 -> 1s, same seeds, same pixels
    set_rules(rules, {"stage": "txt2img", "remedies": ["batch"], "min_batch": 2, "error": "oom"})
    stepped = generate(sdxl_job(6))
    assert stepped["status"] == "completed", stepped
    assert stepped["metadata"]["oom_step_down"] == {"failed": ["batch:6", "batch:3"], "batch": 1, "remedy": "batch"}
    assert [x["metadata"]["seed"] for x in stepped["assets"]] == [9, 10, 11, 12, 13, 14]
    # its peak is the shape that ran (one image at a time), never the batch of 6 that was asked
    assert list(Ledger(store, host, "cpu", 10**6).sizes("sdxl")["work"]) == ["256x256x1"]
    set_rules(rules)
    plain = generate(sdxl_job(6))
    assert "oom_step_down" not in plain["metadata"]
    for a, b in zip(images(sink, stepped), images(sink, plain), strict=True):
        assert np.abs(a - b).max() <= 2

    # one image does not fit either: VAE tiling and slicing
    set_rules(rules, {"stage": "txt2img", "remedies": ["batch"], "error": "oom"})
    tiled = generate(sdxl_job(3))
    assert tiled["status"] == "completed", tiled
    assert tiled["metadata"]["oom_step_down"] == {"failed": ["batch:3", "batch:2", "batch:1"], "batch": 1,
                                                  "remedy": "vae_tiling"}
    assert [f["remedy"] for f in fired(rules)] == ["batch", "batch", "batch"]

    # img2img steps down the same way and stays img2img (no fallback to txt2img)
    reference = Image.new("RGB", (256, 256), (200, 30, 30))
    buffer = io.BytesIO()
    reference.save(buffer, "PNG")
    url = sink.put(f"refs/oom-{new_id()[:6]}.png", buffer.getvalue())
    set_rules(rules, {"stage": "img2img", "remedies": ["batch"], "min_batch": 2, "error": "oom"})
    i2i = generate(sdxl_job(3, metadata={"reference_image_url": url, "denoise_strength": 0.6}))
    assert i2i["status"] == "completed", i2i
    assert i2i["metadata"]["pipeline"] == "img2img" and "fallback" not in i2i["metadata"]
    assert i2i["metadata"]["oom_step_down"] == {"failed": ["batch:3", "batch:2"], "batch": 1, "remedy": "batch"}

    # tiling is not enough: model CPU offload, after which the model is unloaded and loads clean
    assert loads(store, worker, "sdxl") == 1
    set_rules(rules, {"stage": "txt2img", "remedies": ["batch", "vae_tiling"], "error": "oom"})
    offloaded = generate(sdxl_job(1))
    assert offloaded["status"] == "completed", offloaded
    assert offloaded["metadata"]["oom_step_down"] == {"failed": ["batch:1", "vae_tiling:1"], "batch": 1,
                                                      "remedy": "cpu_offload"}
    set_rules(rules)
    assert generate(sdxl_job(1))["status"] == "completed"
    assert loads(store, worker, "sdxl") == 2

    # nothing helps: retried with backoff (each retry climbs the ladder again), then OOM_ERROR
    set_rules(rules, {"stage": "txt2img", "error": "oom"})
    failed = generate(sdxl_job(1))
    assert failed["status"] == "failed" and failed["error"]["code"] == "OOM_ERROR"
    assert failed["error"]["retryable"] is True
    assert [f["number"] for f in fired(rules)] == [1, 2, 3] * 4  # 3 rungs, first try + 3 retries
    assert worker.alive()


@pytest.mark.stress
def test_wan_remedies_and_device_faults(isolated_broker: str, tmp_path: Path, sink: Sink,
                                        start_worker: Callable[..., WorkerProcess]) -> None:
    store, rules = redis.Redis.from_url(isolated_broker), tmp_path / "rules.json"
    set_rules(rules)
    env = fault_env(isolated_broker, rules)
    first = start_worker("wan", OURVIDZ_HOSTNAME=f"woom-{new_id()[:6]}", **env)

    def generate(job: dict[str, Any]) -> dict[str, Any]:
        return run(store, sink, job, "ourvidz.wan.generate", "wan")

    ladder = ["full", "vae_tiling", "text_encoder_offload", "cpu_offload"]
    for rung in (1, 2, 3):
        set_rules(rules, {"stage": "video", "remedies": ladder[:rung], "error": "oom"})
        body = generate(wan_job())
        assert body["status"] == "completed", body
        assert body["metadata"]["oom_step_down"] == {"failed": [f"{r}:1" for r in ladder[:rung]], "batch": 1,
                                                     "remedy": ladder[rung]}
        assert body["metadata"]["frame_num"] == 5
    set_rules(rules)
    assert generate(wan_job())["status"] == "completed"
    assert loads(store, first, "wan") == 2  # unloaded after CPU offload, loaded clean for the next job

    # a CUDA error (torch.AcceleratorError) in generation: exit 75, nothing acked, requeued, done once
    set_rules(rules, {"stage": "video", "error": "accelerator", "times": 1})
    job = wan_job()
    publish(store, "ourvidz.wan.generate", job, "wan")
    wait_for(lambda: not first.alive(), 120, what="the WAN worker to exit")
    assert first.stop() == 75
    assert "device fault (AcceleratorError)" in first.text()
    start_worker("wan", OURVIDZ_HOSTNAME=f"wclean-{new_id()[:6]}", **env)  # what the supervisor does
    body = terminal(sink, job["id"], 240)
    assert body["status"] == "completed" and body["metadata"]["attempt"] == 1
    assert [c["body"]["status"] for c in sink.callbacks(job["id"])].count("completed") == 1


def test_a_device_fault_while_loading_exits_75(isolated_broker: str, tmp_path: Path, sink: Sink) -> None:
    """A CUDA error wrapped as a load error (found through ``__cause__``) ends the worker with 75, not 3."""
    env = worker_env(sink, "wan", OURVIDZ_BROKER_URL=isolated_broker, OURVIDZ_HOSTNAME=f"wload-{new_id()[:6]}",
                     OURVIDZ_RUNTIME_PLUGINS="tests.faults:fail_loads")
    worker = WorkerProcess("wan", env, tmp_path / "wan.log")
    with pytest.raises(RuntimeError, match="exited 75"):
        worker.start(timeout=240)
    assert "device fault (RuntimeError)" in worker.text()
    worker.stop()
