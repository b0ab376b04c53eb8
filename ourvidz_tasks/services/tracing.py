"""One trace per job, with OpenTelemetry: off unless ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set.

OpenTelemetry's own variables configure it (``OTEL_EXPORTER_OTLP_ENDPOINT``,
``OTEL_SERVICE_NAME``, ``OTEL_BSP_SCHEDULE_DELAY``...). When on, OpenTelemetry's Celery
instrumentation makes a span of every publish and every task run, and carries the context in
the message headers (W3C ``traceparent``; the TypeScript publisher sets it too, edge/src/celery.ts),
so the steps of a chain are one trace. Ours add the model call (``model``), each upload
(``upload``) and each callback (``callback``). Spans carry job ids, task names and sizes,
never a prompt.

When off, :func:`span` is a no-op context manager and nothing of OpenTelemetry is imported.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
_tracer: Any = None


def enabled() -> bool:
    return _tracer is not None


def setup(service: str) -> bool:
    """Start exporting spans when an OTLP endpoint is set (once per process); whether tracing is on."""
    global _tracer
    if _tracer is not None:
        return True
    if not any(os.environ.get(name) for name in ENDPOINT_VARS):
        return False
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    name = os.environ.get("OTEL_SERVICE_NAME") or service
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    CeleryInstrumentor().instrument(tracer_provider=provider)
    _tracer = trace.get_tracer("ourvidz_tasks")
    log.info("tracing on: spans to the OTLP endpoint as service %s", name)
    return True


@contextlib.contextmanager
def span(name: str, **attributes: str | int | float | bool) -> Iterator[None]:
    """A span of the current trace (none when tracing is off); an exception is recorded on it."""
    if _tracer is None:
        yield
        return
    with _tracer.start_as_current_span(name, attributes=attributes):
        yield


class ContextExecutor(ThreadPoolExecutor):
    """A thread pool whose tasks run in the submitter's context, so their spans join its trace."""

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        if _tracer is None:
            return super().submit(fn, *args, **kwargs)
        context = contextvars.copy_context()
        return super().submit(context.run, fn, *args, **kwargs)  # type: ignore[arg-type]
