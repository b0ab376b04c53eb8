"""One trace per job (services/tracing.py): publish, chain steps, model call, uploads and callbacks.

Real pools export to a local OTLP collector stand-in (tests/support/otlp.py). Two publishers: a
raw message carrying a W3C ``traceparent`` as the edge function sends it, and the Python publisher
(``ourvidz_tasks.publish``) in a process of its own with tracing on.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest
import redis

from devtools.sink import Sink

from .support.cluster import WorkerProcess
from .support.jobs import new_id, terminal
from .support.otlp import Collector, Span
from .support.process import ROOT, wait_for
from .wire import envelope, signature

PROMPT = "a secret lighthouse prompt " + secrets.token_hex(4)


@pytest.fixture()
def collector() -> Iterator[Collector]:
    server = Collector().start()
    yield server
    server.stop()


def otel_env(collector: Collector) -> dict[str, str]:
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}


def job() -> dict[str, object]:
    return {"id": new_id(), "type": "sdxl_image_fast", "user_id": "user_123", "prompt": PROMPT,
            "config": {"resolution": "256x256", "num_inference_steps": 2, "seed": 5}}


def job_trace(collector: Collector, job_id: str, root_parent: str) -> list[Span]:
    """The spans of the one trace that holds the job's spans, once every span's parent has arrived."""
    def complete() -> list[Span] | None:
        ids = {s.trace_id for s in collector.spans if s.attributes.get("ourvidz.job_id") == job_id}
        if len(ids) != 1:
            return None
        spans = collector.trace(ids.pop())
        known = {s.span_id for s in spans} | {root_parent}
        done = all(s.parent_id in known for s in spans) and "run/ourvidz.sdxl.generate" in {s.name for s in spans}
        return spans if done else None

    spans: list[Span] = wait_for(complete, 60, what=f"the whole trace of {job_id}")
    return spans


def check_steps(spans: list[Span]) -> None:
    """Both chain steps, the step's publish, the model call, uploads and callbacks, from both pools."""
    by_id = {s.span_id: s for s in spans}

    def depth(span: Span) -> int:
        return 0 if span.parent_id not in by_id else 1 + depth(by_id[span.parent_id])

    for span in spans:
        print("  " * depth(span) + f"{span.name} ({span.service})")
    names = [s.name for s in spans]
    assert "run/ourvidz.chat.enhance" in names and "run/ourvidz.sdxl.generate" in names
    assert "apply_async/ourvidz.sdxl.generate" in names  # the chain's next step, published by the chat pool
    assert names.count("model") >= 1 and names.count("upload") >= 2 and names.count("callback") >= 2
    assert {s.service for s in spans} >= {"ourvidz-chat", "ourvidz-sdxl"}


@pytest.mark.slow
def test_a_chain_is_one_trace_from_either_publisher_with_no_prompt_in_it(
        isolated_broker: str, start_worker: Callable[..., WorkerProcess], collector: Collector, sink: Sink) -> None:
    env = {"OURVIDZ_BROKER_URL": isolated_broker, **otel_env(collector)}
    start_worker("chat", **env)
    start_worker("sdxl", **env)
    store = redis.Redis.from_url(isolated_broker)

    # as the edge function sends it: a raw message whose headers carry the caller's trace context
    edge_trace, edge_span = secrets.token_hex(16), secrets.token_hex(8)
    edge_job = job()
    message = envelope("ourvidz.chat.enhance", [edge_job], "chat", chain=[signature("ourvidz.sdxl.generate", queue="sdxl")])
    message["headers"]["traceparent"] = f"00-{edge_trace}-{edge_span}-01"
    store.lpush("chat", json.dumps(message))
    assert terminal(sink, str(edge_job["id"]))["status"] == "completed"
    spans = job_trace(collector, str(edge_job["id"]), edge_span)  # every span hangs from the edge's
    assert {s.trace_id for s in spans} == {edge_trace}  # the edge's trace, continued
    check_steps(spans)

    # the Python publisher, tracing on: its publish span is the root
    python_job = job()
    code = ("import json, sys; from celery import chain; from ourvidz_tasks.publish import enhance, sdxl_generate; "
            "chain(enhance.s(json.loads(sys.argv[1])), sdxl_generate.s()).apply_async()")
    publisher_env = {**os.environ, "OURVIDZ_BROKER_URL": isolated_broker, **otel_env(collector),
                     "OTEL_SERVICE_NAME": "publisher"}
    subprocess.run([sys.executable, "-c", code, json.dumps(python_job)], env=publisher_env, cwd=ROOT, check=True,
                   timeout=120)
    assert terminal(sink, str(python_job["id"]))["status"] == "completed"
    spans = job_trace(collector, str(python_job["id"]), "")
    roots = [s for s in spans if s.parent_id == ""]
    assert [(r.service, r.name) for r in roots] == [("publisher", "apply_async/ourvidz.chat.enhance")]
    check_steps(spans)

    for span in collector.spans:  # the job's prompt, enhanced or not, never reaches a span
        assert PROMPT.encode() not in span.raw and b"lighthouse" not in span.raw, span.name


def test_tracing_is_off_and_not_imported_without_an_endpoint() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    code = ("import sys, ourvidz_tasks.celery; from ourvidz_tasks.services import tracing; "
            "print(tracing.enabled(), 'opentelemetry.sdk' in sys.modules, "
            "'opentelemetry.instrumentation.celery' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, check=True, capture_output=True,
                         text=True, timeout=60).stdout.split()
    assert out == ["False", "False", "False"]
