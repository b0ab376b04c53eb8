"""The chat engine (continuous batching over one tiny Qwen2) and chat sampling, in-process.

Real tiny models, real transformers continuous batching; the references are
plain ``generate`` and a hand-written argmax loop over the model's forward.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch

from ourvidz_tasks.contract.errors import InvalidJob, ModelLoadError
from ourvidz_tasks.contract.settings import Settings, load_settings
from ourvidz_tasks.models.chat_common import QwenName, Sampling
from ourvidz_tasks.models.chat_engine import ChatEngine
from ourvidz_tasks.models.qwen import QwenModel, generate_chat, load_qwen, render_prompt

from .support.env import TINY_CACHE

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CPU = torch.device("cpu")
SUBJECTS = ["a dog", "the sea at night", "two cats", "a red car", "snow on a mountain", "a city street",
            "a portrait", "rain"]


def messages(i: int) -> list[dict[str, str]]:
    system = [{"role": "system", "content": "You describe scenes."}] if i % 2 else []
    return [*system, {"role": "user", "content": f"Describe {SUBJECTS[i % len(SUBJECTS)]}" + " in detail" * i}]


@pytest.fixture(scope="module")
def tiny() -> Settings:
    return load_settings(model_source="tiny", tiny_cache=TINY_CACHE)


@pytest.fixture(scope="module", params=["qwen_instruct", "qwen_base"])
def engine(request: pytest.FixtureRequest, tiny: Settings) -> Iterator[ChatEngine]:
    name: QwenName = request.param
    running = ChatEngine(load_qwen(tiny, name, CPU), max_running=8, cache_tokens=4096)
    yield running
    running.unload()


def greedy(n: int) -> Sampling:
    return Sampling(max_tokens=n, temperature=0.0, top_p=1.0)


def argmax_loop(model: QwenModel, msgs: list[dict[str, str]], n: int) -> list[int]:
    """Greedy decoding by hand: the model's forward and argmax, nothing from any generation config."""
    ids = model.tokenizer(render_prompt(model, msgs), add_special_tokens=False, return_tensors="pt")["input_ids"]
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(n):
            token = int(model.model(input_ids=ids).logits[0, -1].argmax())
            out.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


def token_ids(model: QwenModel, text: str) -> list[int]:
    return list(model.tokenizer(text, add_special_tokens=False)["input_ids"])


# -- same answers ----------------------------------------------------------------


def test_greedy_in_a_batch_equals_alone_and_plain_generate(engine: ChatEngine) -> None:
    lengths = [24, 40, 16, 64, 33, 8, 50, 20]
    alone = [engine.generate(messages(i), greedy(n)) for i, n in enumerate(lengths)]
    futures = [engine.submit(messages(i), greedy(n)) for i, n in enumerate(lengths)]
    together = [f.result(timeout=120) for f in futures]
    for i, (a, b) in enumerate(zip(alone, together, strict=True)):
        plain = generate_chat(engine.qwen, messages(i), max_tokens=lengths[i], temperature=0, top_p=1.0)
        assert a.response == b.response == plain.response, i
        assert a.prompt_tokens == b.prompt_tokens == plain.prompt_tokens
        assert a.completion_tokens == b.completion_tokens == plain.completion_tokens == lengths[i]
        assert a.finish_reason == b.finish_reason == plain.finish_reason == "length"


def test_seeded_sampling_in_a_batch_equals_alone(engine: ChatEngine) -> None:
    sampled = [Sampling(max_tokens=24, temperature=1.2, top_p=0.9, seed=100 + i) for i in range(6)]
    alone = [engine.generate(messages(i), s) for i, s in enumerate(sampled)]
    futures = {i: engine.submit(messages(i), sampled[i]) for i in reversed(range(len(sampled)))}  # other order
    for i, a in enumerate(alone):
        together = futures[i].result(timeout=120)
        assert (together.response, together.completion_tokens) == (a.response, a.completion_tokens), i
    other_seed = engine.generate(messages(0), Sampling(max_tokens=24, temperature=1.2, top_p=0.9, seed=7))
    assert other_seed.response != alone[0].response  # the seed is what changed the draw
    assert len({a.response for a in alone}) > 1


def test_a_stop_token_ends_the_reply_with_stop_and_counts_it(tiny: Settings) -> None:
    model = load_qwen(tiny, "qwen_instruct", CPU)
    first = argmax_loop(model, messages(0), 1)[0]  # the checkpoint declares that token an end token
    model.model.generation_config.eos_token_id = [first]
    stopping = ChatEngine(model, max_running=4, cache_tokens=1024)
    try:
        out = stopping.generate(messages(0), greedy(30))
        assert (out.finish_reason, out.completion_tokens) == ("stop", 1)
        assert out.response == model.tokenizer.decode([first], skip_special_tokens=True)
        one = stopping.generate(messages(0), greedy(1))
        assert (one.finish_reason, one.completion_tokens) == ("stop", 1)  # the end token, not the limit
    finally:
        stopping.unload()


# -- memory: what cannot fit is refused, the rest runs ----------------------------


def test_a_context_that_cannot_fit_is_invalid_job_and_the_others_finish(tiny: Settings) -> None:
    small = ChatEngine(load_qwen(tiny, "qwen_instruct", CPU), max_running=2, cache_tokens=256)
    try:
        assert small.context_limit == 256 and small.pages * 64 == 256
        running = small.submit(messages(1), greedy(150))
        prompt = len(token_ids(small.qwen, render_prompt(small.qwen, messages(1))))
        with pytest.raises(InvalidJob) as too_long:
            small.generate(messages(1), greedy(256 - prompt + 1))
        assert too_long.value.field == "max_tokens" and f"at most {256 - prompt}" in str(too_long.value)
        with pytest.raises(InvalidJob) as too_big:
            small.generate([{"role": "user", "content": "word " * 400}], greedy(1))
        assert too_big.value.field == "messages"
        assert small.generate(messages(1), greedy(256 - prompt)).completion_tokens == 256 - prompt  # fits exactly
        assert running.result(timeout=120).completion_tokens == 150
    finally:
        small.unload()


# -- enhancements first, chats not starved ----------------------------------------


@pytest.mark.slow
def test_urgent_requests_pass_waiting_chats_but_a_chat_passed_over_goes_next(tiny: Settings) -> None:
    single = ChatEngine(load_qwen(tiny, "qwen_instruct", CPU), max_running=1, cache_tokens=4096)
    order: list[str] = []

    def track(name: str, future: Future[object]) -> None:
        future.add_done_callback(lambda _: order.append(name))

    try:
        track("long", single.submit(messages(0), greedy(1500)))  # seconds of decoding
        track("chat1", single.submit(messages(1), greedy(4)))
        track("chat2", single.submit(messages(2), greedy(4)))
        futures = {}
        for name in ("enh1", "enh2"):
            futures[name] = single.submit(messages(3), greedy(4), urgent=True)
            track(name, futures[name])
        assert single.running == 1  # everything but the long one was still waiting
        futures["enh2"].result(timeout=300)
        single.generate(messages(4), greedy(1))
        # enh1 passes both chats; with one slot, a chat passed over once goes next, so both do
        assert order[:5] == ["long", "enh1", "chat1", "chat2", "enh2"], order
    finally:
        single.unload()


# -- issue 25.6: what the engine preallocates, counted once and as transformers plans it ---------


@pytest.mark.parametrize(("tokens", "running"), [(1024, 4), (4096, 8)])
def test_the_engines_footprint_is_the_plans(tiny: Settings, tokens: int, running: int) -> None:
    """``cache_bytes`` (in ``nbytes``, so in the reservation) is transformers' own plan for this model, which
    slices its logits: one logits row per running request, not one per prefill token; memplan's figure agrees."""
    from ourvidz_tasks.models import memplan

    engine = ChatEngine(load_qwen(tiny, "qwen_instruct", CPU), max_running=running, cache_tokens=tokens)
    try:
        cfg = engine.qwen.model.config.to_dict()
        assert engine.cache_bytes == memplan.chat_cache_bytes(cfg, tokens, running=running, dtype_bytes=4)
        assert engine.nbytes() == engine.qwen.nbytes() + engine.cache_bytes
    finally:
        engine.unload()


# -- issue 25.7: the cache is sized by the pool, not by the card's free memory -------------


def test_transformers_checks_the_cache_against_the_pools_plan_not_the_card() -> None:
    from ourvidz_tasks.models.chat_engine import PLAN_HEADROOM, memory_share

    planned = 1180 * 2**20
    for free in (10 * 2**20, planned, 80 * 2**30):  # a card the other pools fill, just enough, an empty card
        assert free * memory_share(planned, free) == pytest.approx(planned * PLAN_HEADROOM)
    assert memory_share(planned, 0) == 1.0  # transformers could not measure: its own default


def test_the_engine_tells_transformers_its_plan(tiny: Settings) -> None:
    from ourvidz_tasks.models.chat_engine import PLAN_HEADROOM, _device_free, planned_bytes

    engine = ChatEngine(load_qwen(tiny, "qwen_instruct", CPU), max_running=4, cache_tokens=2048)
    try:
        planned = planned_bytes(engine.qwen.model.config.to_dict(), engine.pages, 4, 4)
        assert planned == engine.cache_bytes  # the plan is transformers' own figure for these pages
        share = engine._manager.continuous_batching_config.max_memory_percent
        assert share * _device_free() == pytest.approx(planned * PLAN_HEADROOM, rel=0.05)  # RSS moves a little
    finally:
        engine.unload()


# -- errors reach every caller with their cause, and the engine recovers -----------


def test_a_decode_failure_reaches_the_callers_with_its_cause_and_the_engine_restarts(tiny: Settings) -> None:
    faulty = ChatEngine(load_qwen(tiny, "qwen_instruct", CPU), max_running=4, cache_tokens=1024)
    calls = {"n": 0}

    def fail_once(module: torch.nn.Module, args: object) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected device failure")

    hook = faulty.qwen.model.register_forward_pre_hook(fail_once)
    try:
        futures = [faulty.submit(messages(i), greedy(40)) for i in range(2)]
        for future in futures:
            error = future.exception(timeout=120)
            assert isinstance(error, RuntimeError) and "injected device failure" in str(error)
            assert isinstance(error.__cause__, RuntimeError) and error.__cause__ is not error
        assert faulty.generate(messages(0), greedy(5)).completion_tokens == 5  # a fresh decode thread
    finally:
        hook.remove()
        faulty.unload()


def test_a_restart_frees_the_dead_engine_first_and_an_engine_that_cannot_come_back_ends_the_pool(
        tiny: Settings) -> None:
    """Issue 25.3. The seam: the engine's ``_start_manager`` (an instance attribute here) and ``on_dead``
    (the pool's exit with the device-fault status). A decode failure makes the engine restart: the old KV
    cache and the failed step's frames are gone before the fresh one is built, the lock is not held while
    it starts (a request submitted meanwhile does not block), and when the start fails every waiting
    request gets the error and the pool is told to exit, instead of keeping a dead engine."""
    import threading

    dead: list[BaseException] = []
    broken = ChatEngine(load_qwen(tiny, "qwen_instruct", CPU), max_running=2, cache_tokens=1024, on_dead=dead.append)
    old = broken._manager
    assert old is not None
    seen: dict[str, object] = {}

    def fail_forward(module: torch.nn.Module, args: object) -> None:
        raise RuntimeError("injected device failure")

    def cannot_start(pages: int) -> object:
        # what the engine holds of the dead one is cut (the decode thread's logged traceback aside, which
        # pytest's log capture keeps; a pool's log handler does not)
        seen["old cache freed"] = broken._manager is None and old.batch_processor is None and old.model is None
        seen["frames freed"] = old.background_thread_status.fatal_error.__traceback__ is None
        during: list[Future[object]] = []
        submitter = threading.Thread(target=lambda: during.append(broken.submit(messages(1), greedy(5))))
        submitter.start()
        submitter.join(timeout=10)
        seen["submit blocked"] = submitter.is_alive()
        seen["during"] = during
        raise MemoryError("injected: the fresh engine cannot start")

    hook = broken.qwen.model.register_forward_pre_hook(fail_forward)
    broken._start_manager = cannot_start  # type: ignore[method-assign]
    try:
        first = broken.submit(messages(0), greedy(5))
        assert "injected device failure" in str(first.exception(timeout=60))
        deadline = time.monotonic() + 60
        while not dead and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(dead) == 1 and isinstance(dead[0], MemoryError)
        assert seen["old cache freed"] is True and seen["frames freed"] is True and seen["submit blocked"] is False
        during = seen["during"]
        assert isinstance(during, list) and len(during) == 1
        assert isinstance(during[0].exception(timeout=10), MemoryError)  # it waited for the restart, then failed
        with pytest.raises(ModelLoadError):  # nothing runs on a dead engine; the pool exits
            broken.submit(messages(2), greedy(5))
    finally:
        hook.remove()
        broken.unload()


def test_the_pools_dead_engine_callback_exits_with_the_device_fault_status() -> None:
    from ourvidz_tasks.runtime.faults import EXIT_DEVICE_FAULT, exit_when_dead

    statuses: list[int] = []
    exit_when_dead("qwen_instruct", statuses.append)(MemoryError("injected"))
    assert statuses == [EXIT_DEVICE_FAULT]


# -- issue 14.4: sampling only as asked --------------------------------------------


@pytest.fixture(scope="module")
def opinionated(tiny: Settings, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny instruct model whose generation config sets sampling defaults, as Qwen2.5's does."""
    load_qwen(tiny, "qwen_instruct", CPU).unload()  # built once
    folder = tmp_path_factory.mktemp("opinionated") / "qwen_instruct"
    shutil.copytree(TINY_CACHE / "qwen_instruct", folder)
    config = json.loads((folder / "generation_config.json").read_text())
    config.update(do_sample=True, temperature=0.01, top_k=1, top_p=0.05, repetition_penalty=50.0,
                  no_repeat_ngram_size=1)
    (folder / "generation_config.json").write_text(json.dumps(config))
    return folder


def test_the_checkpoints_sampling_defaults_never_reach_a_request(opinionated: Path) -> None:
    settings = load_settings(model_source="local", qwen_instruct_model=opinionated)
    model = load_qwen(settings, "qwen_instruct", CPU)
    reference = argmax_loop(model, messages(2), 12)
    assert len(set(reference)) < len(reference)  # it repeats tokens: a repetition penalty would show
    plain = generate_chat(model, messages(2), max_tokens=12, temperature=0, top_p=1.0)
    assert token_ids(model, plain.response) == reference or plain.response == model.tokenizer.decode(reference)
    engine = ChatEngine(model, max_running=2, cache_tokens=512)
    try:
        assert engine.generate(messages(2), greedy(12)).response == model.tokenizer.decode(reference)
        # sampled at temperature 1.5 with top_k/top_p of the checkpoint this would always be the greedy reply
        hot = [engine.generate(messages(2), Sampling(12, 1.5, 1.0, seed=s)).response for s in range(4)]
        hot += [generate_chat(model, messages(2), max_tokens=12, temperature=1.5, top_p=1.0, seed=s).response
                for s in range(4)]
        assert any(reply != model.tokenizer.decode(reference) for reply in hot)
    finally:
        engine.unload()


def test_unload_delivers_what_runs_and_fails_what_waits(tiny: Settings) -> None:
    closing = ChatEngine(load_qwen(tiny, "qwen_instruct", CPU), max_running=1, cache_tokens=1024)
    running = closing.submit(messages(0), greedy(60))
    waiting = closing.submit(messages(1), greedy(5))
    assert closing.unload() > 0
    assert running.result(timeout=60).completion_tokens == 60
    assert isinstance(waiting.exception(timeout=60), ModelLoadError)
    with pytest.raises(ModelLoadError):
        closing.submit(messages(2), greedy(5))
