"""The chat pool's engine: many requests, one model, continuous batching.

:class:`ChatEngine` wraps one loaded :class:`QwenModel` and one long-lived
``transformers`` ``ContinuousBatchingManager`` (its paged KV cache is
preallocated at load and its decode thread runs until unload). Task threads
call :meth:`ChatEngine.generate`; a request joins the running batch at the
next decode step and leaves it when it ends.

The engine keeps its own admission in front of the manager:

* at most ``max_running`` requests decode together, and the KV cache pages of
  every admitted request (prompt + ``max_tokens``) are reserved up front, so
  the cache never overflows mid-decode and no request can push another out;
  a request that could never fit is ``INVALID_JOB`` naming ``messages`` or
  ``max_tokens``;
* waiting requests are admitted urgent-first (enhancements gate generations),
  but a waiting chat passed over ``max_running`` times goes next.

Sampling is done per request by
:class:`~ourvidz_tasks.models.chat_sampler.RequestSampler`, so a request's
tokens depend only on its own logits, not on its neighbours in the batch or
their order. torch is imported when an engine starts, not with this module.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..contract.errors import InvalidJob, ModelLoadError
from . import release_memory
from .chat_common import ChatOutput, QwenName, Sampling, check_sampling
from .memplan import chat_cache_bytes
from .qwen import QwenModel, load_qwen, pad_token_id, render_prompt, stop_token_ids

if TYPE_CHECKING:
    import torch
    from transformers import ContinuousBatchingManager
    from transformers.generation.continuous_batching.requests import GenerationOutput

    from ..contract.settings import Settings

log = logging.getLogger(__name__)

#: tokens per KV-cache page; admission reserves whole pages
PAGE_SIZE = 64
#: the most prompt tokens one decode step prefills (longer prompts take several steps)
MAX_BATCH_TOKENS = 512


@dataclass
class _Request:
    key: str
    job: str
    prompt_ids: list[int]
    sampling: Sampling
    urgent: bool
    pages: int
    future: Future[ChatOutput] = field(default_factory=Future)
    queued: float = field(default_factory=time.monotonic)
    #: times an urgent request was admitted while this one waited
    passed: int = 0
    slot: int = 0


class ChatEngine:
    """One model, continuously batched; thread-safe :meth:`generate`."""

    def __init__(self, model: QwenModel, *, max_running: int, cache_tokens: int,
                 on_dead: Callable[[BaseException], object] | None = None) -> None:
        if model.model is None:
            raise ModelLoadError(f"{model.name}: the model was unloaded")
        self.qwen = model
        self.name = model.name
        self.max_running = max_running
        self.stop_ids = stop_token_ids(model)
        self._pad = pad_token_id(model, self.stop_ids)
        self._lock = threading.Lock()
        self._waiting: deque[_Request] = deque()
        self._running: dict[str, _Request] = {}
        self._slots = 0
        from .chat_sampler import RequestSampler  # torch: only where an engine starts

        self._sampler = RequestSampler()
        self._closed = threading.Event()
        self._stopping = threading.Event()
        #: called when the decode thread died and a fresh one could not start (the pool exits for its supervisor)
        self._on_dead = on_dead
        manager = self._start_manager(math.ceil(cache_tokens / PAGE_SIZE))
        self._manager: ContinuousBatchingManager | None = manager
        cache = manager.batch_processor.cache  # type: ignore[union-attr]
        self.pages: int = int(cache.num_blocks)
        #: what the engine preallocates or plans for: the KV cache and the per-step tensors
        self.cache_bytes: int = _footprint(manager, cache)
        del cache
        positions = getattr(model.model.config, "max_position_embeddings", None) or self.pages * PAGE_SIZE
        #: the most tokens (prompt + max_tokens) one request may hold
        self.context_limit = min(self.pages * PAGE_SIZE, int(positions))
        self._pages_free = self.pages
        self._dispatcher = threading.Thread(target=self._dispatch, name=f"chat-engine-{self.name}", daemon=True)
        self._dispatcher.start()

    # -- the manager ------------------------------------------------------------

    def _start_manager(self, pages: int) -> ContinuousBatchingManager:
        import torch
        from transformers import ContinuousBatchingConfig, GenerationConfig

        # do_sample with a temperature makes the manager keep one per-request processor slot,
        # which the RequestSampler then takes over; every row it returns is one-hot, so the draw is ours
        generation = GenerationConfig(do_sample=True, temperature=0.5, max_new_tokens=1,
                                      eos_token_id=self.stop_ids, pad_token_id=self._pad)
        model: Any = self.qwen.model
        # the cache's size is ours (num_blocks, counted in the pool's reservation); transformers' check of it
        # against the whole card's free memory (the other pools' included) is made against that plan instead
        planned = planned_bytes(model.config.get_text_config().to_dict(), pages, self.max_running,
                                model.dtype.itemsize)
        config = ContinuousBatchingConfig(
            page_size=PAGE_SIZE, num_blocks=pages, max_batch_tokens=MAX_BATCH_TOKENS,
            max_requests_per_batch=self.max_running, allow_block_sharing=False, safety_margin=0.0,
            per_request_processors=True, use_cuda_graph=False, auto_switch_to_flash=False,
            use_async_batching=False, max_memory_percent=memory_share(planned, _device_free()),
        )
        manager = model.init_continuous_batching(generation_config=generation, continuous_batching_config=config)
        processors = manager.logit_processor
        processors.logits_processor[:] = [self._sampler]
        processors._retrieve_processors_kwargs()
        with torch.inference_mode():
            manager.start()
        deadline = time.monotonic() + 120
        while manager.batch_processor is None:  # the decode thread builds the cache first thing
            if not manager.is_running() or time.monotonic() > deadline:
                fatal = manager.background_thread_status.fatal_error
                raise ModelLoadError(f"{self.name}: the batching engine did not start") from fatal
            time.sleep(0.01)
        return manager

    def nbytes(self) -> int:
        """Weights plus the KV cache and the per-step tensors the manager plans for (0 once unloaded)."""
        weights = self.qwen.nbytes()
        return weights + self.cache_bytes if weights else 0

    def unload(self) -> int:
        """Stop the decode thread (failing whatever still runs), then drop every reference to the cache
        and the model (the manager holds both) before the memory is handed back."""
        freed = self.nbytes()
        self._stopping.set()  # no restart, no new admissions
        manager = self._manager
        if manager is not None:
            manager.stop(block=True, timeout=30)  # what runs finishes and is still delivered
        self._closed.set()
        self._dispatcher.join(timeout=5)
        gone = ModelLoadError(f"{self.name}: the model was unloaded")
        self._fail_all(gone)
        with self._lock:
            waiting = list(self._waiting)
            self._waiting.clear()
            self._manager = None
        for request in waiting:
            request.future.set_exception(_copy(gone))
        if manager is not None:
            _drop(manager)
        del manager
        self._sampler.rows.clear()
        self.qwen.unload()  # the last reference to the weights: memory goes back here (release_memory)
        return freed

    # -- requests -----------------------------------------------------------------

    def generate(self, messages: list[dict[str, str]], sampling: Sampling, *, urgent: bool = False,
                 job: str = "?") -> ChatOutput:
        """Answer ``messages`` (blocking); raises what the request or the engine failed with."""
        return self.submit(messages, sampling, urgent=urgent, job=job).result()

    def submit(self, messages: list[dict[str, str]], sampling: Sampling, *, urgent: bool = False,
               job: str = "?") -> Future[ChatOutput]:
        """Queue ``messages``; the future holds the answer or the error."""
        check_sampling(sampling)
        if self._stopping.is_set() or self.qwen.tokenizer is None:
            raise ModelLoadError(f"{self.name}: the model was unloaded")
        prompt = render_prompt(self.qwen, messages)
        ids = self.qwen.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        self._check_fits(len(ids), sampling.max_tokens)
        pages = math.ceil((len(ids) + sampling.max_tokens) / PAGE_SIZE)
        with self._lock:
            self._slots += 1
            request = _Request(key=f"{job}#{self._slots}", job=job, prompt_ids=list(ids), sampling=sampling,
                               urgent=urgent, pages=pages, slot=self._slots)
            self._waiting.append(request)
            self._admit()
        return request.future

    def _check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        limit = self.context_limit
        if prompt_tokens >= limit:
            raise InvalidJob(f"`messages` take {prompt_tokens} tokens; a request to {self.name} holds at most "
                             f"{limit} tokens with its reply", field="messages")
        if prompt_tokens + max_tokens > limit:
            raise InvalidJob(f"`max_tokens` must be at most {limit - prompt_tokens} for these messages "
                             f"({prompt_tokens} tokens; {limit} in all); got {max_tokens}", field="max_tokens")

    def _admit(self) -> None:
        """Move waiting requests into the batch while slots and cache pages last (lock held).

        Nothing is admitted while the decode thread is down: a request that comes between its
        failure and the restart waits for the fresh thread instead of failing with the old error.
        """
        manager = self._manager  # None while a restart frees the old engine and starts a fresh one
        while (self._waiting and len(self._running) < self.max_running and not self._stopping.is_set()
               and manager is not None and manager.is_running()):
            request = self._next()
            if request.pages > self._pages_free:
                return  # it waits at the head, so a big request is never starved by small ones
            self._waiting.remove(request)
            for other in self._waiting:
                if request.urgent and not other.urgent:
                    other.passed += 1
            self._pages_free -= request.pages
            self._running[request.key] = request
            self._sampler.add(request.slot, request.sampling, self.qwen.device)
            s = request.sampling
            added = manager.add_request(request.prompt_ids, request_id=request.key, max_new_tokens=s.max_tokens,
                                              eos_token_id=self.stop_ids, slot=request.slot)
            if added is None:
                self._finish(request, error=self._engine_error())
            else:
                log.info("chat %s admitted (%s, waited %.3fs, %d running)", request.job,
                         "urgent" if request.urgent else "normal", time.monotonic() - request.queued,
                         len(self._running))

    def _next(self) -> _Request:
        """Urgent first, unless the oldest normal request has been passed over ``max_running`` times."""
        normal = next((r for r in self._waiting if not r.urgent), None)
        if normal is not None and normal.passed >= self.max_running:
            return normal
        return next((r for r in self._waiting if r.urgent), self._waiting[0])

    def _dispatch(self) -> None:
        """Hand finished outputs to their callers; fail everything if the decode thread dies."""
        while not self._closed.is_set():
            manager = self._manager
            if manager is None:
                return  # unloaded
            output = manager.get_result(timeout=0.1)
            if output is not None:
                if output.is_finished():
                    self._complete(output)
                continue
            if not manager.is_running() and not self._stopping.is_set():
                error = self._engine_error()
                log.error("chat engine %s stopped: %s", self.name, type(error).__name__)
                self._fail_all(error)
                del manager
                self._restart()

    def _restart(self) -> None:
        """Free the dead engine first (its cache, the failed step's tensors), then start one fresh engine,
        outside the lock: requests that come meanwhile wait for it. If it cannot start, every waiting
        request gets the error and ``on_dead`` is told (the pool exits so its supervisor starts it clean)."""
        with self._lock:
            old, self._manager = self._manager, None
        if old is not None:
            _drop(old)
        del old
        release_memory(self.qwen.device)
        try:
            fresh = self._start_manager(self.pages)
        except Exception as exc:  # nothing can run here
            self._die(exc)
            return
        with self._lock:
            if self._stopping.is_set():  # unloaded meanwhile
                _drop(fresh)
                return
            self._manager = fresh
            self._admit()

    def _die(self, error: BaseException) -> None:
        log.critical("chat engine %s: the decode thread died and could not start again (%s)", self.name,
                     type(error).__name__)
        self._stopping.set()
        self._closed.set()
        with self._lock:
            waiting = list(self._waiting)
            self._waiting.clear()
        for request in waiting:
            request.future.set_exception(_copy(error))
        if self._on_dead is not None:
            self._on_dead(error)

    def _complete(self, output: GenerationOutput) -> None:
        with self._lock:
            request = self._running.get(output.request_id)
            if request is None:
                return
            if output.error is not None:
                self._finish(request, error=self._engine_error(output.error))
            else:
                self._finish(request, output=output)
            self._admit()

    def _finish(self, request: _Request, *, output: GenerationOutput | None = None,
                error: BaseException | None = None) -> None:
        """Free the request's pages and slot, then resolve its future (lock held)."""
        self._running.pop(request.key, None)
        self._sampler.rows.pop(request.slot, None)
        self._pages_free += request.pages
        if output is None:
            request.future.set_exception(error or self._engine_error())
            return
        try:
            request.future.set_result(self._answer(request, output))
        except Exception as exc:  # decoding failed: the caller sees why
            request.future.set_exception(exc)

    def _answer(self, request: _Request, output: GenerationOutput) -> ChatOutput:
        new_ids = list(output.generated_tokens)
        hit_limit = len(new_ids) >= request.sampling.max_tokens and (not new_ids or new_ids[-1] not in self.stop_ids)
        response = self.qwen.tokenizer.decode(new_ids, skip_special_tokens=True)
        start, end = output.lifespan
        return ChatOutput(
            response=str(response), prompt_tokens=len(request.prompt_ids), completion_tokens=len(new_ids),
            finish_reason="length" if hit_limit else "stop",
            generation_time=end - start if end > start > 0 else time.monotonic() - request.queued,
        )

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            for request in list(self._running.values()):
                self._finish(request, error=_copy(error))

    def _engine_error(self, message: str | None = None) -> BaseException:
        """The decode thread's own exception (a copy, its original as the cause), else a RuntimeError."""
        manager = self._manager
        fatal = manager.background_thread_status.fatal_error if manager is not None else None
        if isinstance(fatal, BaseException):
            return _copy(fatal)
        return RuntimeError(f"chat engine {self.name}: {message or 'the decode thread stopped'}")

    @property
    def running(self) -> int:
        return len(self._running)


def _footprint(manager: ContinuousBatchingManager, cache: Any) -> int:
    """The manager's own sizing of its cache and of every tensor that scales with it (logits,
    activations, masks of a full step), else the cache tensor alone."""
    from transformers.generation.continuous_batching.cache import PagedAttentionMemoryHandler

    try:
        slices = getattr(manager.model, "_supports_logits_to_keep", None)  # as transformers sizes the cache
        handler = PagedAttentionMemoryHandler(
            config=manager.model.config.get_text_config(), cb_config=manager.continuous_batching_config,
            dtype=cache.dtype, bytes_per_sector=cache.bytes_per_sector, tokens_per_sector=cache.tokens_per_sector,
            bytes_per_block=1, attn_types=list(cache.cache_allocators),
            model_supports_logits_to_keep=callable(slices) and bool(slices()),
        )
        return int(handler.compute_memory_footprint(cache.max_batch_tokens, cache.num_sectors))
    except Exception as exc:  # a transformers change: the cache itself is still known
        log.warning("chat engine: footprint unknown (%s); counting the KV cache only", type(exc).__name__)
        return int(cache.cache_tensor.nbytes)


def planned_bytes(config: dict[str, Any], pages: int, running: int, dtype_bytes: int) -> int:
    """What the engine preallocates for ``pages`` cache pages: the figure the pool's reservation counts
    (:func:`ourvidz_tasks.models.memplan.chat_cache_bytes`, transformers' own plan)."""
    return chat_cache_bytes(config, pages * PAGE_SIZE, running=running, batch_tokens=MAX_BATCH_TOKENS,
                            dtype_bytes=dtype_bytes)


#: how much more than its plan transformers is told the engine may use (its figure and ours agree to the byte)
PLAN_HEADROOM = 1.25


def memory_share(planned: int, free: int) -> float:
    """``max_memory_percent`` that makes transformers' available memory ``planned`` (with headroom), not
    the card's free memory: the cache is sized by ``num_blocks``; memory that is really missing then
    fails the allocation itself, an out-of-memory the pool retries."""
    if free <= 0:
        return 1.0
    return planned * PLAN_HEADROOM / free


def _device_free() -> int:
    """The memory transformers measures as available (its ``get_device_and_memory_breakdown``)."""
    from transformers.generation.continuous_batching.utils import get_device_and_memory_breakdown

    _, total, reserved, allocated = get_device_and_memory_breakdown()
    return int(total - max(allocated, reserved))


def _drop(manager: ContinuousBatchingManager) -> None:
    """Stop ``manager`` and cut what it holds: its batch processor (the KV cache), the model, the
    failed step's frames (the decode thread's exception keeps its traceback, and the traceback the tensors)."""
    manager.destroy()
    fatal = manager.background_thread_status.fatal_error
    seen: set[int] = set()
    while isinstance(fatal, BaseException) and id(fatal) not in seen:  # the error and what it was raised from
        seen.add(id(fatal))
        fatal.__traceback__ = None
        fatal = fatal.__cause__ or fatal.__context__
    manager.batch_processor = None
    manager.model = None  # type: ignore[assignment]


def _copy(error: BaseException) -> BaseException:
    """A fresh exception of the same type for one waiting caller, chained to the shared original."""
    try:
        clone = type(error)(*error.args)
    except Exception:
        clone = RuntimeError(f"{type(error).__name__}: {error}")
    clone.__cause__ = error
    return clone


def load_chat_engine(settings: Settings, name: QwenName, device: torch.device,
                     on_dead: Callable[[BaseException], object] | None = None) -> ChatEngine:
    """Load ``name`` and start its engine sized from the chat settings (the pool's loader)."""
    model = load_qwen(settings, name, device)
    try:
        return ChatEngine(model, max_running=settings.chat_concurrency, cache_tokens=settings.chat_cache_tokens,
                          on_dead=on_dead)
    except Exception:
        model.unload()
        raise
