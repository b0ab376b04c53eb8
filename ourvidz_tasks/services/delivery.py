"""Results delivery: storage uploads and signed callbacks (CONTRACT.md section 4).

:class:`Delivery` is built once per worker and handed to every job. Uploads
run in a small thread pool (encode + upload of one asset overlaps the
others); callbacks go through one ordered sender thread so a job's
``processing`` callbacks always precede its terminal one. The terminal body
is recorded in Redis before it is sent (keyed by job id), which makes it
idempotent across retries and redelivery: a second run of the same job id
re-sends the recorded body instead of computing again.

Only :class:`CallbackTransport` knows how a body travels; swapping the inline
HTTP transport for an outbox changes nothing for the callers. The body and its
signature are the contract's (:mod:`ourvidz_tasks.contract.callbacks`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import httpx
import redis

from ..contract import keys
from ..contract.callbacks import SIGNATURE_HEADER, callback_body, dumps, sign
from ..contract.errors import DeliveryError, DeliveryRefused, ThumbnailError
from ..contract.settings import Settings
from . import events
from .backoff import Backoff
from .guard import DeadLetters
from .tracing import ContextExecutor, span

if TYPE_CHECKING:  # media needs PIL and numpy; the outbox consumer installs neither
    from .media import Output

log = logging.getLogger(__name__)

BUCKET = "workspace-temp"
#: how many ids ``keys.JOBS_ENDED`` keeps: every key we write is bounded in size or time
ENDED_LIMIT = 2000
#: the longest pause between two HTTP tries
HTTP_BACKOFF_CAP = 30.0
CONTENT_TYPES = {".png": "image/png", ".mp4": "video/mp4", ".webp": "image/webp"}


class HttpRetry:
    """Calls an HTTP request function, retrying network errors, 429 and 5xx with backoff."""

    def __init__(self, tries: int, backoff: float) -> None:
        self.tries, self.backoff = tries, backoff

    def __call__(self, what: str, request: Callable[[], httpx.Response]) -> httpx.Response:
        last, pauses = "", Backoff(self.backoff, HTTP_BACKOFF_CAP)
        for attempt in range(self.tries):
            if attempt:
                time.sleep(pauses.next())
            try:
                response = request()
            except httpx.TransportError as exc:
                last = type(exc).__name__
                continue
            if response.status_code < 300:
                return response
            last = f"HTTP {response.status_code}"
            if response.status_code not in (408, 429) and response.status_code < 500:
                raise DeliveryRefused(f"{what} refused: {last}")
        raise DeliveryError(f"{what} failed after {self.tries} tries: {last}")


class CallbackTransport(Protocol):
    """How one callback body reaches the edge.

    ``send`` returns True when the body was delivered before it returned
    (the caller then records a terminal body as delivered), False when it
    was handed to the outbox, which delivers and records it later. ``queued``
    says that earlier bodies of the job wait in the outbox (this one must
    follow them).
    """

    def send(self, job_id: str, body: bytes, queued: bool = False) -> bool: ...


class HttpCallbacks:
    """Inline HTTP: POST to ``/functions/v1/job-callback``, signed, with retries."""

    def __init__(self, settings: Settings, client: httpx.Client, *, tries: int | None = None,
                 timeout: float | None = None) -> None:
        base, key = settings.require_delivery()
        self.url = f"{base}/functions/v1/job-callback"
        self.key = key
        secret = settings.job_callback_secret
        self.secret = secret.get_secret_value().encode() if secret else None
        self.client = client
        self.timeout = timeout if timeout is not None else settings.http_timeout
        self.retry = HttpRetry(tries or settings.http_tries, settings.http_backoff)

    def send(self, job_id: str, body: bytes, queued: bool = False) -> bool:
        headers = {"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"}
        if self.secret:
            headers[SIGNATURE_HEADER] = sign(self.secret, body)
        self.retry(f"callback for job {job_id}",
                   lambda: self.client.post(self.url, content=body, headers=headers, timeout=self.timeout))
        return True


class Backlog(Protocol):
    """The durable outbox as :class:`OutboxCallbacks` sees it (``outbox_store.Outbox``)."""

    def push(self, job_id: str, body: bytes) -> None: ...
    def look(self) -> tuple[int, bool]: ...


class OutboxCallbacks:
    """Deliver at once (one signed POST, short timeout); hand only what fails to the outbox.

    Once a body went to the outbox, every later body of this process goes
    there too until the outbox is empty again (:meth:`caught_up`, called by
    the drainer), so each job's callbacks keep their order; a terminal body
    of a job whose earlier bodies wait there (``queued``) follows them. A
    pool never waits on the edge for longer than one short try.
    """

    def __init__(self, http: HttpCallbacks, outbox: Backlog, wake: Any = None) -> None:
        self.http, self.outbox, self.wake = http, outbox, wake
        self.behind = False
        self._lock = threading.Lock()

    def send(self, job_id: str, body: bytes, queued: bool = False) -> bool:
        with self._lock:
            if self.behind or queued:
                return self._hand_over(job_id, body)
        try:
            return self.http.send(job_id, body)
        except DeliveryRefused:
            raise
        except DeliveryError as exc:
            log.warning("job %s: callback handed to the outbox (%s)", job_id, exc)
            with self._lock:
                return self._hand_over(job_id, body)

    def _hand_over(self, job_id: str, body: bytes) -> bool:
        self.outbox.push(job_id, body)
        self.behind = True
        if self.wake is not None:
            self.wake()
        return False

    def caught_up(self) -> None:
        """The drainer saw an empty outbox: deliver directly again once it is still empty."""
        with self._lock:
            if self.behind and self.outbox.look()[0] == 0:
                self.behind = False


class Storage:
    """Supabase storage uploads to ``workspace-temp/{user_id}/{job_id}/{name}``."""

    def __init__(self, settings: Settings, client: httpx.Client) -> None:
        self.base, self.key = settings.require_delivery()
        self.client = client
        self.retry = HttpRetry(settings.http_tries, settings.http_backoff)

    def upload(self, path: str, data: bytes, content_type: str, tries: int | None = None) -> str:
        """Upload ``data`` to ``path`` (``bucket/...``, overwriting) and return the path.

        ``tries``: fewer than ``http_tries`` (a live preview takes one, never waiting on a backoff).
        """
        headers = {"Authorization": f"Bearer {self.key}", "Content-Type": content_type, "x-upsert": "true"}
        url = f"{self.base}/storage/v1/object/{path}"
        attributes: dict[str, str | int] = {"ourvidz.content_type": content_type, "ourvidz.bytes": len(data)}
        retry = self.retry if tries is None else HttpRetry(tries, self.retry.backoff)
        with span("upload", **attributes):
            retry(f"upload of {path}", lambda: self.client.post(url, content=data, headers=headers))
        return path

    def remove(self, path: str) -> None:
        """Delete the object ``path`` (``bucket/...``); one try, a missing object is no error."""
        url = f"{self.base}/storage/v1/object/{path}"
        response = self.client.delete(url, headers={"Authorization": f"Bearer {self.key}"})
        if response.status_code >= 300 and response.status_code != 404:
            raise DeliveryError(f"removal of {path} failed: HTTP {response.status_code}")


class Delivery:
    """Storage and callbacks for one worker; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        worker_id: str,
        store: redis.Redis,
        *,
        client: httpx.Client | None = None,
        transport: CallbackTransport | None = None,
    ) -> None:
        self.settings = settings
        self.worker_id = worker_id
        self.redis = store
        self.client = client or httpx.Client(timeout=settings.http_timeout, follow_redirects=False)
        self.storage = Storage(settings, self.client)
        self.transport = transport or HttpCallbacks(settings, self.client)
        # in the submitter's trace context: uploads and callbacks are spans of the job's trace
        self._sender = ContextExecutor(1, thread_name_prefix="callbacks")
        self._uploads = ContextExecutor(4, thread_name_prefix="uploads")
        # live previews: beside the denoising loop and the outputs' uploads, never in their way
        self._previews = ContextExecutor(1, thread_name_prefix="previews")
        self._lock = threading.Lock()

    # -- storage ----------------------------------------------------------------
    def publish(self, user_id: str, job_id: str, outputs: Sequence[Output],
                metadata: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Encode and upload every output and its thumbnail, all in parallel; return the assets.

        Each file is written to the spool (``OURVIDZ_SPOOL_DIR/{job_id}``)
        before it is uploaded and removed once stored, so a storage outage
        loses nothing: the job's retry calls :meth:`resume` and uploads what
        is left without computing again. A thumbnail that can't be made or
        stored is reported (``THUMBNAIL_GENERATION_ERROR``) and never fails the job.
        """
        spool = self._spool(job_id)
        spool.mkdir(parents=True, exist_ok=True)
        (spool / "job.json").write_text(json.dumps({"count": len(outputs), "metadata": metadata or {}}))
        level = self.settings.png_compress_level
        mains = [self._uploads.submit(self._main, spool, user_id, output, i, level) for i, output in enumerate(outputs)]
        thumbs = [self._uploads.submit(self._thumb, spool, user_id, output, i) for i, output in enumerate(outputs)]
        for main in mains:
            main.result()
        return [self._asset(spool, user_id, i, thumb) for i, thumb in enumerate(thumbs)]

    def submit_preview(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` on the preview thread (:class:`~.previews.PreviewStream`); returns at once."""
        self._previews.submit(fn, *args)

    def resume(self, user_id: str, job_id: str) -> tuple[list[dict[str, Any]], dict[str, Any]] | None:
        """Upload what an earlier attempt left in the spool: ``(assets, job metadata)``, or None."""
        spool = self._spool(job_id)
        try:
            job = json.loads((spool / "job.json").read_text())
        except (OSError, ValueError):
            return None
        metas = [spool / f"{i}.asset.json" for i in range(job["count"])]
        if not all(m.exists() for m in metas):
            return None  # an encode never finished: compute again
        names = [json.loads(m.read_text())["name"] for m in metas]
        uploads = [self._uploads.submit(self._upload_spooled, spool, user_id, name) for name in names]
        for upload in uploads:
            upload.result()
        thumbs = [self._uploads.submit(self._upload_spooled, spool, user_id, f"{i}.thumb.webp")
                  for i in range(job["count"])]
        log.info("job %s: resumed %d asset(s) from the spool", job_id, len(names))
        return [self._asset(spool, user_id, i, thumb) for i, thumb in enumerate(thumbs)], job["metadata"]

    def discard(self, job_id: str) -> None:
        """Forget the job's spool (its terminal callback is recorded)."""
        shutil.rmtree(self._spool(job_id), ignore_errors=True)

    def _spool(self, job_id: str) -> Path:
        return self.settings.spool_dir / job_id

    def _main(self, spool: Path, user_id: str, output: Output, index: int, level: int) -> None:
        from .media import encode_output  # PIL and numpy: only a pool publishes outputs

        asset = encode_output(output, index, level)
        (spool / asset.name).write_bytes(asset.data)
        meta = {"kind": asset.kind, "name": asset.name, "content_type": asset.content_type, "metadata": asset.metadata}
        (spool / f"{index}.asset.json").write_text(json.dumps(meta))
        self._upload_spooled(spool, user_id, asset.name, asset.content_type)

    def _thumb(self, spool: Path, user_id: str, output: Output, index: int) -> str | None:
        from .media import encode_thumbnail

        name = f"{index}.thumb.webp"
        (spool / name).write_bytes(encode_thumbnail(output))
        return self._upload_spooled(spool, user_id, name, "image/webp")

    def _upload_spooled(self, spool: Path, user_id: str, name: str, content_type: str | None = None) -> str | None:
        """Upload ``spool/name`` unless an earlier attempt did; its storage path (None: never made)."""
        url = f"{BUCKET}/{user_id}/{spool.name}/{name}"
        path, done = spool / name, spool / f".{name}.done"
        if done.exists():
            return url
        if not path.exists():
            return None
        content_type = content_type or CONTENT_TYPES[path.suffix]
        self.storage.upload(url, path.read_bytes(), content_type)
        done.touch()
        path.unlink()
        return url

    def _asset(self, spool: Path, user_id: str, index: int, thumb: Future[str | None]) -> dict[str, Any]:
        meta = json.loads((spool / f"{index}.asset.json").read_text())
        metadata = {**meta["metadata"], "asset_index": index}
        try:
            thumb_url = thumb.result()
        except Exception as exc:
            thumb_url = None
            metadata["thumbnail_error"] = {"code": ThumbnailError.code, "message": type(exc).__name__}
            log.warning("job %s: thumbnail %d failed: %s", spool.name, index, type(exc).__name__)
        if thumb_url is None and "thumbnail_error" not in metadata:
            metadata["thumbnail_error"] = {"code": ThumbnailError.code, "message": "missing"}
        return {"type": meta["kind"], "url": f"{BUCKET}/{user_id}/{spool.name}/{meta['name']}",
                "thumbnail_url": thumb_url, "metadata": metadata}

    # -- callbacks --------------------------------------------------------------
    def processing(self, job_id: str, attempt: int, metadata: dict[str, Any] | None = None, *,
                   wait: bool = False) -> None:
        """Queue a ``processing`` callback; best effort.

        ``wait``: give it up to ``callback_timeout`` before going on (the first one of a job: the
        edge hears of the job before the pool spends its CPU elsewhere; an edge that does not
        answer in time gets it later, in order, from the outbox).
        """
        body = callback_body(job_id, self.worker_id, "processing", attempt=attempt, metadata=metadata)
        future = self._sender.submit(self._send_quietly, job_id, dumps(body))
        if wait:
            with contextlib.suppress(TimeoutError):
                future.result(timeout=self.settings.callback_timeout + 1.0)

    def _send(self, job_id: str, body: bytes, queued: bool = False) -> bool:
        with span("callback", **{"ourvidz.job_id": job_id}):
            return self.transport.send(job_id, body, queued)

    def _send_quietly(self, job_id: str, body: bytes) -> None:
        try:
            self._send(job_id, body)
        except DeliveryRefused as exc:
            refused(self.redis, job_id, body, exc)
        except Exception as exc:  # progress is best effort
            log.warning("job %s: processing callback not delivered: %s", job_id, exc)

    def terminal_of(self, job_id: str) -> dict[str, Any] | None:
        """The recorded terminal body of ``job_id``, if the job already ended."""
        raw = self.redis.get(keys.job_final(job_id))
        return json.loads(raw) if raw else None

    def delivered(self, job_id: str) -> bool:
        return bool(self.redis.exists(keys.job_delivered(job_id)))

    def mark_delivered(self, job_id: str, patience: float = 120.0) -> None:
        """:func:`mark_delivered` with this worker's store and ``terminal_ttl``."""
        mark_delivered(self.redis, job_id, self.settings.terminal_ttl, patience)

    def replay(self, job_id: str) -> bool:
        """Send the job's recorded terminal callback again (same ``callback_id``); False if none."""
        body = self.terminal_of(job_id)
        if body is None:
            return False
        self.redis.delete(keys.job_delivered(job_id))
        self.resend(job_id, body)
        return True

    def finish(self, body: dict[str, Any]) -> dict[str, Any]:
        """Record the terminal body (first one wins) and deliver it; return what was recorded.

        Waits for the job's earlier callbacks, so the edge sees them in order.
        One round trip records it and reads what delivery needs; a body that
        can't be delivered now is kept (outbox, or for replay): the job's
        result is already in storage.
        """
        job_id = body["job_id"]
        ttl = self.settings.terminal_ttl
        final, ended = keys.job_final(job_id), keys.JOBS_ENDED
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(final, dumps(body), nx=True, ex=ttl)
            pipe.get(final)
            pipe.rpush(ended, job_id)
            pipe.ltrim(ended, -ENDED_LIMIT, -1)
            pipe.expire(ended, ttl)
            pipe.exists(keys.job_delivered(job_id))
            pipe.hexists(keys.OUTBOX_JOBS, job_id)
            first, recorded, _, _, _, delivered, queued = pipe.execute()
        if not first and recorded:
            body = json.loads(recorded)
        if not delivered:
            self._deliver(job_id, body, bool(queued))
        return body

    def resend(self, job_id: str, body: dict[str, Any]) -> bool:
        """Send a recorded terminal body unless it was delivered; True when delivered or handed over."""
        if self.delivered(job_id):
            return True
        return self._deliver(job_id, body, bool(self.redis.hexists(keys.OUTBOX_JOBS, job_id)))

    def _deliver(self, job_id: str, body: dict[str, Any], queued: bool) -> bool:
        future: Future[bool] = self._sender.submit(self._send, job_id, dumps(body), queued)
        try:
            delivered_now = future.result()
        except DeliveryRefused as exc:  # for good: retrying won't help; an operator finds it, replays it
            refused(self.redis, job_id, dumps(body), exc)
            events.callback_failed.send(sender="delivery", job_id=job_id, status=body.get("status"))
            return False
        except DeliveryError as exc:
            log.error("job %s: terminal callback not delivered, kept for replay: %s", job_id, exc)
            events.callback_failed.send(sender="delivery", job_id=job_id, status=body.get("status"))
            return False
        if delivered_now:
            self.mark_delivered(job_id)
        return True

    def close(self) -> None:
        self._previews.shutdown(wait=True)
        self._sender.shutdown(wait=True)
        self._uploads.shutdown(wait=True)
        self.client.close()


def refused(store: redis.Redis, job_id: str, body: bytes | str, exc: DeliveryRefused, queue: str | None = None) -> None:
    """A body the edge refused (4xx): a dead letter (``keys.DEAD_LETTERS``, ``ourvidz dead``), never retried."""
    DeadLetters(store).push(f"callback refused by the edge: {exc}", raw=body, queue=queue, job_id=job_id)


def mark_delivered(store: redis.Redis, job_id: str, ttl: int, patience: float = 120.0) -> None:
    """Record that the job's terminal callback arrived; retried through a Redis outage (up to ``patience`` s).

    The edge has the callback already: a mark lost to a broker restart would make the
    redelivered message send it a second time.
    """
    pauses, deadline = Backoff(0.2, 5.0), time.monotonic() + patience
    while True:
        try:
            store.set(keys.job_delivered(job_id), "1", ex=ttl)
            return
        except redis.RedisError as exc:
            if time.monotonic() > deadline:
                log.error("job %s: delivered, but not recorded as delivered: %s", job_id, type(exc).__name__)
                return
            time.sleep(pauses.next())
