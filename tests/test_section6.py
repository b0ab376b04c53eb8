"""CONTRACT.md section 6, one test per rule, named after it.

Pure rules run on :mod:`ourvidz_tasks.contract.params`; rules whose truth is in what a
model does or what a worker sends run the real tiny models in this process or
a real worker over the wire. Step counts are checked against diffusers' own
timestep computation, not against our formula.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import redis
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from devtools.sink import Sink
from ourvidz_tasks.contract.errors import InvalidJob
from ourvidz_tasks.contract.jobs import parse_chat, parse_job
from ourvidz_tasks.contract.params import MIN_BOTH_FRAMES, sdxl_params, wan_params
from ourvidz_tasks.contract.settings import Settings, load_settings
from ourvidz_tasks.contract.steps import MAX_SCHEDULE, exact_copy_plan, img2img_steps, strength_for

from .support.cluster import WorkerProcess
from .support.jobs import new_id, terminal
from .support.process import wait_for
from .wire import publish

S = Settings()


def sdxl(**fields: Any) -> dict[str, Any]:
    return {"id": new_id(), "type": "sdxl_image_fast", "user_id": "user_123", "prompt": "a red fox", **fields}


def wan(**fields: Any) -> dict[str, Any]:
    return {"id": new_id(), "type": "video_fast", "user_id": "user_123", "prompt": "waves", **fields}


def params(payload: dict[str, Any], settings_: Settings = S) -> Any:
    job = parse_job(payload, settings_)
    return sdxl_params(job, settings_) if job.family == "sdxl" else wan_params(job, settings_)


def invalid(payload: dict[str, Any]) -> InvalidJob:
    with pytest.raises(InvalidJob) as info:
        params(payload)
    return info.value


# -- diffusers' own count of the img2img steps a (schedule, strength) runs -------------------


@pytest.fixture(scope="module")
def diffusers_steps() -> Any:
    """``count(schedule, strength)``: the timesteps SDXL img2img runs, computed by diffusers."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline

    from ourvidz_tasks.models.tiny.sdxl import SCHEDULER_CONFIG

    class Holder:
        scheduler = EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG)

    holder = Holder()

    def count(schedule: int, strength: float) -> int:
        holder.scheduler.set_timesteps(schedule)
        timesteps, steps = StableDiffusionXLImg2ImgPipeline.get_timesteps(holder, schedule, strength, "cpu")
        assert len(timesteps) == steps
        return steps

    return count


# -- field precedence, nothing invented ---------------------------------------------------


def test_field_precedence() -> None:
    p = params(sdxl(id="a", job_id="b", type="sdxl_image_high", job_type="image_fast", seed=5,
                    negative_prompt="top", reference_image_url="http://x/top.png", reference_strength=0.1,
                    config={"num_inference_steps": 7, "steps": 8, "sample_steps": 9, "guidance_scale": 3,
                            "sample_guide_scale": 4, "seed": 6, "negative_prompt": "config", "width": 512,
                            "height": 576, "resolution": "640x640", "image": "http://x/config.png",
                            "denoise_strength": 0.4},
                    metadata={"negative_prompt": "metadata", "reference_image_url": "http://x/meta.png",
                              "denoise_strength": 0.5, "reference_strength": 0.3}))
    assert (p.job_id, p.job_type, p.steps, p.guidance_scale, p.seeds, p.negative_prompt) == (
        "a", "sdxl_image_high", 7, 3.0, [6], "top")
    assert (p.reference, p.denoise_strength, p.width, p.height) == ("http://x/config.png", 0.4, 512, 576)
    p = params(sdxl(reference_image_url="http://x/top.png", reference_strength=0.1,
                    config={"steps": 8, "sample_steps": 9, "sample_guide_scale": 4, "resolution": "640x704"},
                    metadata={"negative_prompt": "metadata", "reference_image_url": "http://x/meta.png",
                              "reference_strength": 0.3}))
    assert (p.steps, p.guidance_scale, p.negative_prompt, p.reference) == (8, 4.0, "metadata", "http://x/meta.png")
    assert (p.denoise_strength, p.width, p.height) == (pytest.approx(0.7), 640, 704)
    p = params(sdxl(seed=5, reference_image_url="http://x/top.png", reference_strength=0.1,
                    config={"sample_steps": 9}))
    assert (p.steps, p.seeds, p.reference, p.denoise_strength) == (9, [5], "http://x/top.png", pytest.approx(0.9))
    assert (p.width, p.height) == (1024, 1024)
    w = params(wan(config={"width": 64, "height": 96, "size": "832*480", "frames": 9, "frame_num": 17}))
    assert (w.width, w.height, w.frames) == (64, 96, 9)
    w = params(wan(config={"size": "832*480", "frame_num": 17}))
    assert (w.width, w.height, w.frames) == (832, 480, 17)
    w = params(wan())
    assert (w.width, w.height) == (S.wan_width, S.wan_height)
    # the reference image's order holds for WAN too (the top-level alias was once ignored there)
    w = params(wan(reference_image_url="http://x/top.png", config={"reference_mode": "single"}))
    assert w.references == {"single": ("reference_image_url", "http://x/top.png")}
    w = params(wan(reference_image_url="http://x/top.png", metadata={"reference_image_url": "http://x/m.png"}))
    assert w.reference_mode == "single" and w.references["single"][1] == "http://x/m.png"


def test_quality_format_and_content_type_are_informational() -> None:
    plain = params(sdxl(config={"seed": 1}))
    tagged = params(sdxl(config={"seed": 1}, quality="high", format="png", content_type="image"))
    assert plain.__dict__ | {"job_id": ""} == tagged.__dict__ | {"job_id": ""}


def test_nothing_is_invented() -> None:
    assert params(sdxl()).negative_prompt is None
    assert params(sdxl(config={"image": "http://x/r.png"})).negative_prompt is None
    assert params(wan()).negative_prompt is None
    assert params(sdxl()).prompt == "a red fox" and params(wan()).prompt == "waves"


# -- ids, types, seeds --------------------------------------------------------------------


@pytest.mark.parametrize("field", ["id", "user_id"])
@pytest.mark.parametrize("value", ["", "a/b", "../x", "a b", "x" * 129, "é"])
def test_id_and_user_id_are_path_segments(field: str, value: str) -> None:
    assert invalid(sdxl(**{field: value})).field == field
    assert params(sdxl(**{field: "user_123"})).user_id == "user_123"
    assert params(sdxl(**{field: "x" * 128}))


def test_a_type_of_another_family_is_invalid_job_naming_type() -> None:
    from ourvidz_tasks.contract.jobs import parse_job as parse

    with pytest.raises(InvalidJob) as info:
        parse(wan(), S, "sdxl")
    assert info.value.field == "type" and "wan" in info.value.message


def test_seeds_count_up_mod_2_31_one_per_image() -> None:
    p = params(sdxl(config={"num_images": 3, "seed": 2**31 - 1}))
    assert p.seeds == [2**31 - 1, 0, 1] and not p.seed_was_random
    p = params(sdxl(config={"num_images": 6}))
    assert p.seed_was_random and p.seeds == [(p.seeds[0] + i) % 2**31 for i in range(6)]
    assert params(sdxl(config={"seed": 0})).seeds == [0]


# -- steps --------------------------------------------------------------------------------


def test_img2img_steps_run_is_int_steps_times_denoise_at_least_one(diffusers_steps: Any) -> None:
    """Every schedule 1-150 and every step count in it: the strength we pass runs exactly the
    steps we report (49 * (1 / 49) is 0.999... in floating point: that one ran no step)."""
    for schedule in range(1, 151):
        strength, run, raised = img2img_steps(schedule, 0.0)
        assert (run, raised) == (1, True) and diffusers_steps(schedule, strength) == 1, schedule
        for wanted in range(1, schedule + 1):
            exact = strength_for(schedule, wanted)
            assert 0 < exact <= 1 and diffusers_steps(schedule, exact) == wanted, (schedule, wanted)


@settings(max_examples=400, deadline=None)
@given(schedule=st.integers(1, 150), denoise=st.floats(0, 1, allow_nan=False))
def test_img2img_modify_mode_runs_the_steps_it_reports(schedule: int, denoise: float) -> None:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline

    from ourvidz_tasks.models.tiny.sdxl import SCHEDULER_CONFIG

    class Holder:
        scheduler = EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG)

    strength, run, raised = img2img_steps(schedule, denoise)
    assert run >= 1 and raised == (int(schedule * denoise) < 1)
    assert strength == denoise or raised
    Holder.scheduler.set_timesteps(schedule)
    assert StableDiffusionXLImg2ImgPipeline.get_timesteps(Holder(), schedule, strength, "cpu")[1] == run


def test_exact_copy_mode_runs_6_to_10_steps(diffusers_steps: Any) -> None:
    """Every step count 6-10 and every denoise down to far below 6/1000: a schedule of at most
    1000, a strength of at most 0.05, and exactly the steps asked, by diffusers' count."""
    denoises = sorted({0.05, 0.0499999, 0.049, 0.03, 0.0123, 0.01, 0.007, 0.006, 0.001, 1e-9}
                      | {k / 10000 for k in range(1, 501)})
    for run in range(6, 11):
        for denoise in denoises:
            schedule, strength = exact_copy_plan(run, denoise)
            assert run <= schedule <= MAX_SCHEDULE and 0 < strength <= 0.05, (run, denoise)
            assert diffusers_steps(schedule, strength) == run, (run, denoise, schedule, strength)
    p = params(sdxl(prompt="", config={"num_inference_steps": 40, "image": "http://x/r.png", "guidance_scale": 9},
                    negative_prompt="blurry", metadata={"exact_copy_mode": True, "denoise_strength": 0.2}))
    assert (p.exact_copy, p.pipeline, p.guidance_scale, p.negative_prompt) == (True, "img2img", 1.0, None)
    assert p.steps_run == 10 and p.denoise_strength == 0.05 and p.steps == 200


# -- fallbacks and exact copy ---------------------------------------------------------------


def test_exact_copy_without_a_reference_is_img2img_that_must_fail() -> None:
    for config in ({}, {"pipeline": "txt2img"}):
        p = params(sdxl(prompt=" ", config=config, metadata={"exact_copy_mode": True}))
        assert p.exact_copy and p.pipeline == "img2img" and p.reference is None


def job_body(store: redis.Redis, sink: Sink, payload: dict[str, Any], task: str, queue: str) -> dict[str, Any]:
    publish(store, task, payload, queue)
    return terminal(sink, payload["id"], 300)


@pytest.mark.slow
def test_exact_copy_with_no_usable_reference_fails_i2i_pipeline_error(
        sdxl_worker: WorkerProcess, store: redis.Redis, sink: Sink) -> None:
    gone = f"{sink.url}/storage/v1/object/public/refs/s6/gone.png"
    for extra in ({}, {"config": {"pipeline": "txt2img", "width": 64, "height": 64}},
                  {"config": {"image": gone, "width": 64, "height": 64}}):
        payload = sdxl(prompt="", metadata={"exact_copy_mode": True}, **extra)
        body = job_body(store, sink, payload, "ourvidz.sdxl.generate", "sdxl")
        assert body["status"] == "failed" and body["error"]["code"] == "I2I_PIPELINE_ERROR", body
        assert body["assets"] == []


@pytest.mark.slow
def test_fallbacks_keep_the_job_alive_and_say_so(sdxl_worker: WorkerProcess, store: redis.Redis, sink: Sink) -> None:
    gone = f"{sink.url}/storage/v1/object/public/refs/s6/gone.png"
    payload = sdxl(config={"image": gone, "width": 64, "height": 64, "num_inference_steps": 2})
    body = job_body(store, sink, payload, "ourvidz.sdxl.generate", "sdxl")
    assert body["status"] == "completed"
    assert body["metadata"]["fallback"]["code"] == "I2I_PIPELINE_ERROR" and body["metadata"]["fallback"]["used"] == "txt2img"
    assert body["assets"][0]["metadata"]["pipeline"] == "txt2img"


@pytest.mark.slow
def test_a_reference_refused_as_unsafe_is_invalid_job(sdxl_worker: WorkerProcess, store: redis.Redis, sink: Sink) -> None:
    for url in ("file:///etc/passwd", "http://169.254.169.254/latest/meta-data"):
        body = job_body(store, sink, sdxl(config={"image": url, "width": 64, "height": 64}), "ourvidz.sdxl.generate",
                        "sdxl")
        assert body["error"]["code"] == "INVALID_JOB" and "config.image" in body["error"]["message"]


@pytest.mark.slow
def test_callback_bodies_always_carry_assets_metadata_callback_id_and_attempt(
        sdxl_worker: WorkerProcess, store: redis.Redis, sink: Sink) -> None:
    good = sdxl(config={"width": 64, "height": 64, "num_inference_steps": 2})
    bad = sdxl(config={"num_images": 2})
    for payload in (good, bad):
        body = job_body(store, sink, payload, "ourvidz.sdxl.generate", "sdxl")
        calls = [c["body"] for c in sink.callbacks(payload["id"])]
        assert [c["status"] for c in calls][-1] == body["status"]
        assert sum(c["status"] in ("completed", "failed") for c in calls) == 1
        ids = [c["metadata"]["callback_id"] for c in calls]
        assert len(set(ids)) == len(ids)
        for call in calls:
            assert isinstance(call["assets"], list) and isinstance(call["metadata"], dict)
            assert call["metadata"]["attempt"] == 1
            assert ("error" in call) == (call["status"] == "failed")
            assert call["assets"] == [] or call["status"] == "completed"
    assert json.dumps(good["id"]) and terminal(sink, bad["id"])["error"]["code"] == "INVALID_JOB"


# -- WAN ----------------------------------------------------------------------------------


def test_wan_frames_round_down_to_4k_plus_1() -> None:
    for requested in range(1, 84):
        p = params(wan(config={"frames": requested}))
        assert p.frames == (requested - 1) // 4 * 4 + 1 and p.frames_requested == requested
    for bad in (0, 84):
        assert invalid(wan(config={"frames": bad})).field == "config.frames"
    assert invalid(wan(config={"frame_num": 99})).field == "config.frame_num"


@pytest.mark.parametrize("frames", [1, 2, 3, 4])
def test_wan_both_needs_five_frames_after_rounding(frames: int) -> None:
    refs = {"first_frame": "http://x/a.png", "last_frame": "http://x/b.png"}
    error = invalid(wan(config={"frames": frames, "reference_mode": "both", **refs}))
    assert error.field == "config.frames" and "5" in error.message
    error = invalid(wan(config={"frame_num": frames, **refs}))  # mode inferred from the two frames
    assert error.field == "config.frame_num"
    assert params(wan(config={"frames": MIN_BOTH_FRAMES + 3, "reference_mode": "both", **refs})).frames == 5
    assert invalid(wan(type="image_fast", config={"reference_mode": "both", **refs})).field == "config.reference_mode"


def test_wan_reference_modes_take_config_first_metadata_as_fallback() -> None:
    meta = {"reference_image_url": "http://x/m.png", "start_reference_url": "http://x/ms.png",
            "end_reference_url": "http://x/me.png"}
    config = {"image": "http://x/c.png", "first_frame": "http://x/cs.png", "last_frame": "http://x/ce.png"}
    expected: dict[str, set[str]] = {"none": set(), "single": {"single"}, "start": {"first"}, "end": {"last"}, "both": {"first", "last"}}
    for mode, roles in expected.items():
        p = params(wan(config={"reference_mode": mode, **config}, metadata=meta))
        assert set(p.references) == roles and all(f.startswith("config.") for f, _ in p.references.values())
        p = params(wan(config={"reference_mode": mode}, metadata=meta))
        assert set(p.references) == roles and all(f.startswith("metadata.") for f, _ in p.references.values())


def test_wan_sample_shift_from_the_job_else_per_size() -> None:
    assert params(wan(config={"sample_shift": 8})).shift == 8.0
    assert params(wan()).shift == 5.0  # the old system's value at 480x832
    tuned = load_settings(wan_shift={"*": 3.0, "1280x720": 7.0})
    assert params(wan(config={"width": 720, "height": 1280}), tuned).shift == 7.0
    assert params(wan(config={"width": 64, "height": 64}), tuned).shift == 3.0
    for bad in (0, -1, 51, "x"):
        assert invalid(wan(config={"sample_shift": bad})).field == "config.sample_shift"


def test_enhanced_jobs_count_as_enhanced_once_marked() -> None:
    assert not parse_job(wan(type="video7b_fast_enhanced"), S).is_enhanced
    assert parse_job(wan(type="video7b_fast_enhanced", metadata={"enhanced_prompt": "x"}), S).is_enhanced
    assert parse_job(wan(type="video7b_fast_enhanced", metadata={"enhancement_error": "x"}), S).is_enhanced


def test_chat_max_tokens_roles_and_unknown_fields() -> None:
    base = {"messages": [{"role": "user", "content": "hi"}], "sfw_mode": True}
    assert parse_chat({**base, "max_tokens": 2048}, S).max_tokens == 2048
    for bad in (0, 2049):
        with pytest.raises(InvalidJob) as info:
            parse_chat({**base, "max_tokens": bad}, S)
        assert info.value.field == "max_tokens"
    with pytest.raises(InvalidJob) as info:
        parse_chat({"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}, S)
    assert str(info.value.message).startswith("messages[1].role must be one of system, user, assistant")


# -- nothing reaches a model that it refuses --------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return load_settings(model_source="tiny", tiny_cache=S.tiny_cache)


@pytest.fixture(scope="module")
def wan_model(tiny: Settings) -> Iterator[Any]:
    from ourvidz_tasks.models.wan import load_wan

    model = load_wan(tiny, torch.device("cpu"))
    yield model
    model.unload()


def _picture(colour: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (40, 24), colour)


@pytest.mark.slow
def test_every_wan_combination_validation_accepts_runs_on_the_model(wan_model: Any) -> None:
    """Job types x reference modes x frame counts x shifts: each either fails validation naming a
    field, or runs on the real (tiny) model without an error and returns the frames promised."""
    from ourvidz_tasks.models.wan import run_wan

    refs = {"image": "http://x/s.png", "first_frame": "http://x/f.png", "last_frame": "http://x/l.png"}
    images = {"single": _picture((250, 0, 0)), "first": _picture((0, 250, 0)), "last": _picture((0, 0, 250))}
    seen: set[tuple[Any, ...]] = set()
    ran = refused = 0
    for kind in ("video_fast", "image_fast"):
        for mode in ("none", "single", "start", "end", "both"):
            for i, frames in enumerate((1, 2, 4, 5)):
                for shift in ((0.1, 5, 50)[i % 3],):  # the shift's range, spread over the runs
                    payload = wan(type=kind, config={"reference_mode": mode, "frames": frames, "width": 32,
                                                     "height": 16, "num_inference_steps": 1, "sample_shift": shift,
                                                     **refs})
                    try:
                        p = params(payload)
                    except InvalidJob as exc:
                        assert exc.field in ("config.frames", "config.reference_mode"), exc
                        refused += 1
                        continue
                    key = (p.output, p.reference_mode, p.frames, p.shift)
                    if key in seen:
                        continue
                    seen.add(key)
                    clip = run_wan(wan_model, prompt=p.prompt, negative_prompt=None, width=p.width, height=p.height,
                                   num_frames=p.frames, steps=p.steps, guidance_scale=p.guidance_scale, seed=p.seed,
                                   reference_mode=p.reference_mode, reference=images["single"],
                                   first_frame=images["first"], last_frame=images["last"], shift=p.shift)
                    assert clip.shape == (p.frames, 16, 32, 3) and clip.dtype == np.uint8
                    ran += 1
    assert ran >= 12 and refused > 0


@pytest.mark.slow
def test_every_sdxl_step_combination_runs_the_steps_reported(tiny: Settings) -> None:
    """Raised single steps, a 49-step schedule and 1000-step exact-copy schedules run on the real
    (tiny) SDXL exactly the steps the job reports, counted by the pipeline's own step callback."""
    from ourvidz_tasks.models.sdxl import load_sdxl, run_sdxl

    model = load_sdxl(tiny, torch.device("cpu"))
    try:
        cases = [sdxl(config={"num_inference_steps": n, "denoise_strength": d, "image": "http://x/r.png"})
                 for n, d in ((49, 0.0), (1, 0.3), (150, 0.001), (49, 1 / 49), (103, 1 / 103))]
        cases += [sdxl(prompt="", metadata={"exact_copy_mode": True, "denoise_strength": 1e-6},
                       config={"num_inference_steps": n, "image": "http://x/r.png"}) for n in (6, 10)]
        for payload in cases:
            payload["config"].update(width=64, height=64)
            p = params(payload)
            steps: list[int] = []
            run_sdxl(model, prompt=p.prompt, negative_prompt=p.negative_prompt, width=64, height=64, steps=p.steps,
                     guidance_scale=p.guidance_scale, seeds=p.seeds, image=_picture((9, 99, 199)),
                     strength=p.denoise_strength, on_step=lambda i, n, seen=steps: seen.append(i))
            assert len(steps) == p.steps_run >= 1, (payload["config"], p.steps, p.denoise_strength)
            assert p.steps <= MAX_SCHEDULE
    finally:
        model.unload()


@pytest.mark.parametrize("field", ["guidance_scale", "sample_guide_scale", "denoise_strength", "sample_shift"])
def test_invalid_job_message_names_the_field_even_for_number_fields(field: str) -> None:
    """Fields typed ``float | int`` once reported ``config.<field>.float``."""
    error = invalid(wan(config={field: "x"}))
    assert error.field == f"config.{field}" and error.message.startswith(f"`config.{field}`")


@pytest.mark.slow
def test_wan_output_is_one_uint8_conversion_of_a_tensor(wan_model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pipeline is asked for a tensor (not float32 numpy, ~388 MB at 81x480x832) and the
    clip equals what the float path gave, pixel for pixel."""
    from ourvidz_tasks.models.wan import run_wan

    pipe_class = type(wan_model.pipe)
    original = pipe_class.__call__
    calls: list[tuple[str, type]] = []

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        output = original(self, *args, **kwargs)
        calls.append((kwargs.get("output_type"), type(output.frames)))
        return output

    monkeypatch.setattr(pipe_class, "__call__", spy)
    args = {"prompt": "waves", "negative_prompt": None, "width": 32, "height": 16, "num_frames": 5, "steps": 2,
            "guidance_scale": 5.0, "seed": 3}
    clip = run_wan(wan_model, **args)
    assert calls == [("pt", torch.Tensor)] and clip.dtype == np.uint8 and clip.shape == (5, 16, 32, 3)
    as_float = original(wan_model.pipe, prompt="waves", negative_prompt=None, width=32, height=16, num_frames=5,
                        num_inference_steps=2, guidance_scale=5.0, generator=torch.Generator("cpu").manual_seed(3),
                        output_type="np").frames[0]
    assert np.array_equal(clip, np.clip(np.rint(as_float * 255.0), 0, 255).astype(np.uint8))


def test_thumbnails_are_never_upscaled() -> None:
    from ourvidz_tasks.services.media import ImageOutput, VideoOutput, encode_thumbnail

    for size, expected in (((1024, 768), (256, 192)), ((64, 48), (64, 48)), ((200, 300), (171, 256))):
        thumb = Image.open(io.BytesIO(encode_thumbnail(ImageOutput(Image.new("RGB", size), {}))))
        assert thumb.size == expected and thumb.format == "WEBP"
    frames = np.zeros((5, 32, 48, 3), np.uint8)
    frames[2] = 255  # the middle frame
    thumb = Image.open(io.BytesIO(encode_thumbnail(VideoOutput(frames, 8, {}))))
    assert thumb.size == (48, 32) and np.asarray(thumb.convert("L")).min() > 200


@pytest.mark.slow
def test_a_message_without_a_usable_id_is_dead_lettered_with_its_reason(
        sdxl_worker: WorkerProcess, store: redis.Redis, sink: Sink) -> None:
    from ourvidz_tasks.services.guard import DEAD_LETTERS

    before = store.llen(DEAD_LETTERS)
    task_id = publish(store, "ourvidz.sdxl.generate", sdxl(id="../../etc"), "sdxl")
    wait_for(lambda: store.llen(DEAD_LETTERS) > before, 120, what="a dead letter")
    letters = [json.loads(raw) for raw in store.lrange(DEAD_LETTERS, 0, -1)]  # newest first
    assert any(letter.get("task_id") == task_id and letter.get("reason") for letter in letters), letters
    assert not any("../../etc" in path for path in (r["path"] for r in sink.requests()))


@pytest.mark.slow
def test_a_bare_storage_path_reference_is_fetched_with_the_service_key(
        sdxl_worker: WorkerProcess, store: redis.Redis, sink: Sink) -> None:
    rel = f"private-refs/s6/{new_id()}.png"
    reference_png_at(sink, rel)
    payload = sdxl(config={"image": rel, "width": 64, "height": 64, "num_inference_steps": 4, "denoise_strength": 0.5})
    body = job_body(store, sink, payload, "ourvidz.sdxl.generate", "sdxl")
    assert body["status"] == "completed" and "fallback" not in body["metadata"], body
    assert body["assets"][0]["metadata"]["pipeline"] == "img2img"
    fetched = [r for r in sink.requests() if r["path"] == f"/storage/v1/object/{rel}"]
    assert fetched and fetched[-1]["method"] == "GET"


def reference_png_at(sink: Sink, rel: str) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, "PNG")
    return sink.put(rel, buffer.getvalue())
