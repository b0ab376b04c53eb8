"""Predictive load through a real worker: a pool whose model went cold while its next job
waits in its queue loads it between jobs, before that job is taken (prefetch 1 leaves the
next job in the queue while one runs, so the end of a job is when a pool can see it)."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import redis
from PIL import Image

from devtools.sink import Sink
from ourvidz_tasks.contract.settings import load_settings
from ourvidz_tasks.runtime.ledger import Ledger

from .support.cluster import WorkerProcess
from .support.jobs import new_id, terminal
from .support.process import wait_for
from .wire import publish


class HeldReference:
    """An HTTP server whose one image is served only once :attr:`release` is set."""

    def __init__(self) -> None:
        self.requested, self.release = threading.Event(), threading.Event()
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), (10, 200, 90)).save(buffer, "PNG")
        png, held = buffer.getvalue(), self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                held.requested.set()
                held.release.wait(120)
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(png)))
                self.end_headers()
                self.wfile.write(png)

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/held.png"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()


@pytest.fixture()
def held() -> Iterator[HeldReference]:
    server = HeldReference()
    yield server
    server.close()


def job(**config: Any) -> dict[str, Any]:
    return {"id": new_id(), "type": "sdxl_image_fast", "user_id": "user_123", "prompt": "a kite",
            "config": {"width": 64, "height": 64, "num_inference_steps": 2, "seed": 1, **config}}


@pytest.mark.slow
def test_a_cold_pool_loads_between_jobs_when_its_queue_holds_work(
        isolated_broker: str, start_worker: Callable[..., WorkerProcess], sink: Sink, held: HeldReference) -> None:
    host = f"predict-{new_id()[:6]}"
    worker = start_worker("sdxl", OURVIDZ_BROKER_URL=isolated_broker, OURVIDZ_HOSTNAME=host)
    broker = redis.Redis.from_url(isolated_broker)
    ledger = Ledger.for_settings(broker, load_settings(broker_url=isolated_broker, hostname=host), "cpu")
    first, second = job(image=held.url), job()
    publish(broker, "ourvidz.sdxl.generate", first, "sdxl")
    publish(broker, "ourvidz.sdxl.generate", second, "sdxl")
    assert held.requested.wait(120), "the first job never fetched its reference"
    # the first job runs (held on its reference) and the second waits in the queue: the model is
    # taken away between jobs, as a waiter of another pool or an operator would have it
    assert ledger.request("unload", "sdxl", "sdxl", reason="control")
    held.release.set()
    assert terminal(sink, first["id"])["status"] == "completed"
    assert terminal(sink, second["id"])["status"] == "completed"
    log = worker.text()
    unloaded = log.index("unloading sdxl for control")
    predicted = log.index("predictive load of sdxl on sdxl", unloaded)
    loaded = log.index("sdxl loaded in", predicted)
    # the model was back before the second job was even taken from the queue
    assert log[:loaded].count("] received") == 1, log[unloaded - 2000:]
    assert log.index(f"job {second['id']} completed") > loaded
    assert wait_for(lambda: broker.hget(f"ourvidz:loads:{worker.node}", "sdxl"), 30) == b"2"
