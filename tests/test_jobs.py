"""Section 6 of the contract, as pure functions: precedence, ranges, messages."""

from __future__ import annotations

from typing import Any

import pytest

from ourvidz_tasks.contract.errors import InvalidJob
from ourvidz_tasks.contract.jobs import parse_chat, parse_job, usable_id
from ourvidz_tasks.contract.params import frame_count, sdxl_params, wan_params
from ourvidz_tasks.contract.settings import Settings
from ourvidz_tasks.contract.steps import exact_copy_plan, img2img_steps

S = Settings()


def sdxl(**fields: Any) -> dict[str, Any]:
    job = {"id": "job-1", "type": "sdxl_image_fast", "user_id": "user_123", "prompt": "a red fox"}
    job.update(fields)
    return job


def wan(**fields: Any) -> dict[str, Any]:
    job = {"id": "job-2", "type": "video_fast", "user_id": "user_123", "prompt": "waves"}
    job.update(fields)
    return job


def params(payload: dict[str, Any]):
    job = parse_job(payload, S)
    return sdxl_params(job, S) if job.family == "sdxl" else wan_params(job, S)


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"id": "a", "type": "sdxl_image_fast", "prompt": "x"}, "user_id"),
        (sdxl(id="../x"), "id"),
        (sdxl(id="x" * 129), "id"),
        (sdxl(user_id="a/b"), "user_id"),
        (sdxl(type="sdxl_image_ultra"), "type"),
        (sdxl(type=None), "type"),
        (sdxl(config={"resolution": "abc"}), "config.resolution"),
        (sdxl(config={"num_images": 4}), "config.num_images"),
        (sdxl(config={"denoise_strength": 1.5}), "config.denoise_strength"),
        (sdxl(metadata={"reference_strength": -0.2}), "metadata.reference_strength"),
        (sdxl(config={"width": 1000, "height": 1001}), "config.height"),
        (sdxl(config={"width": 1024}), "config.height"),
        (sdxl(config={"num_inference_steps": 0}), "config.num_inference_steps"),
        (sdxl(config={"steps": 500}), "config.steps"),
        (sdxl(config={"guidance_scale": 99}), "config.guidance_scale"),
        (sdxl(config={"seed": -1}), "config.seed"),
        (sdxl(seed=2**31), "seed"),
        (sdxl(config={"num_images": "many"}), "config.num_images"),
        (sdxl(prompt=["not", "text"]), "prompt"),
        (sdxl(config={"pipeline": "video"}), "config.pipeline"),
        (wan(config={"frames": 0}), "config.frames"),
        (wan(config={"frames": 200}), "config.frames"),
        (wan(config={"fps": 60}), "config.fps"),
        (wan(config={"reference_mode": "middle"}), "config.reference_mode"),
        (wan(config={"reference_mode": "both", "first_frame": "http://h/a.png"}), "config.last_frame"),
        (wan(config={"reference_mode": "single"}), "config.image"),
        (wan(config={"width": 481, "height": 832}), "config.width"),
        (wan(config={"size": "480x"}), "config.size"),
    ],
)
def test_bad_payload_names_the_field(payload: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidJob) as info:
        params(payload)
    assert info.value.field == field
    assert field.split(".")[-1] in str(info.value)
    assert str(info.value).startswith("INVALID_JOB: ")


def test_wrong_family_is_invalid_naming_type() -> None:
    with pytest.raises(InvalidJob) as info:
        parse_job(wan(), S, "sdxl")
    assert info.value.field == "type"


def test_unknown_fields_and_legacy_aliases() -> None:
    job = parse_job({"job_id": "old-1", "job_type": "sdxl_image_high", "user_id": "u", "prompt": "p",
                     "quality": "high", "format": "png", "content_type": "image", "brand_new": {"x": 1},
                     "config": {"steps": 20}, "seed": 7}, S)
    p = sdxl_params(job, S)
    assert (p.job_id, p.job_type, p.steps, p.seeds) == ("old-1", "sdxl_image_high", 20, [7])


def test_precedence() -> None:
    p = params(sdxl(
        negative_prompt="top", seed=1,
        config={"num_inference_steps": 11, "steps": 22, "sample_steps": 33, "guidance_scale": 3,
                "sample_guide_scale": 9, "seed": 5, "width": 512, "height": 768, "resolution": "640x640",
                "negative_prompt": "config", "image": "http://a/c.png", "denoise_strength": 0.4},
        metadata={"reference_image_url": "http://a/m.png", "denoise_strength": 0.9, "reference_strength": 0.1,
                  "negative_prompt": "meta"},
        reference_image_url="http://a/t.png",
    ))
    assert (p.steps, p.guidance_scale, p.seeds, p.width, p.height) == (11, 3.0, [5], 512, 768)
    assert (p.negative_prompt, p.reference, p.reference_field, p.denoise_strength) == ("top", "http://a/c.png", "config.image", 0.4)
    assert p.steps_run == int(11 * 0.4)


def test_reference_strength_means_one_minus_denoise() -> None:
    p = params(sdxl(metadata={"reference_image_url": "http://a/r.png", "reference_strength": 0.85}))
    assert p.pipeline == "img2img" and p.denoise_strength == pytest.approx(0.15)
    p = params(sdxl(reference_image_url="http://a/r.png", reference_strength=0.7))
    assert p.denoise_strength == pytest.approx(0.3)


def test_seed_zero_is_a_seed_and_batches_count_up() -> None:
    p = params(sdxl(config={"seed": 0, "num_images": 6}))
    assert p.seeds == [0, 1, 2, 3, 4, 5] and not p.seed_was_random
    p = params(sdxl(config={"seed": 2**31 - 2, "num_images": 3}))
    assert p.seeds == [2**31 - 2, 2**31 - 1, 0]
    p = params(sdxl())
    assert p.seed_was_random and 0 <= p.seeds[0] < 2**31


def test_resolution_string() -> None:
    p = params(sdxl(config={"resolution": "832x1216"}))
    assert (p.width, p.height) == (832, 1216)


def test_exact_copy_mode() -> None:
    p = params(sdxl(prompt="", negative_prompt="blurry",
                    config={"guidance_scale": 9, "num_inference_steps": 30, "denoise_strength": 0.3},
                    metadata={"exact_copy_mode": True, "reference_image_url": "http://a/r.png"}))
    assert p.exact_copy and p.pipeline == "img2img"
    assert p.denoise_strength == 0.05 and p.guidance_scale == 1.0 and p.negative_prompt is None
    assert 6 <= p.steps_run <= 10 and int(p.steps * p.denoise_strength) == p.steps_run


def test_modify_mode_uses_parameters_as_given() -> None:
    p = params(sdxl(negative_prompt="blurry", config={"guidance_scale": 9, "num_inference_steps": 30, "denoise_strength": 0.3},
                    metadata={"exact_copy_mode": True, "reference_image_url": "http://a/r.png"}))
    assert not p.exact_copy
    assert (p.guidance_scale, p.steps, p.denoise_strength, p.negative_prompt) == (9.0, 30, 0.3, "blurry")


def test_steps_times_strength_below_one_is_raised_to_one_step() -> None:
    p = params(sdxl(config={"num_inference_steps": 10, "denoise_strength": 0.05, "image": "http://a/r.png"}))
    assert p.steps_run == 1 and p.steps_raised and int(p.steps * p.denoise_strength) >= 1
    assert img2img_steps(15, 0.5) == (0.5, 7, False)


@pytest.mark.parametrize(("run", "strength"), [(6, 0.05), (10, 0.05), (7, 0.03), (6, 0.01), (8, 0.049)])
def test_exact_copy_schedule(run: int, strength: float) -> None:
    schedule, used = exact_copy_plan(run, strength)
    assert int(schedule * used) == run and used == strength  # these strengths are kept as given
    assert exact_copy_plan(6, 0.05) == (120, 0.05)


def test_wan_frames_sizes_and_references() -> None:
    assert [frame_count(n) for n in (1, 4, 5, 33, 80, 83)] == [1, 1, 5, 33, 77, 81]
    p = params(wan(config={"frames": 83, "fps": 24, "size": "480*832"}))
    assert (p.frames, p.frames_requested, p.fps, p.width, p.height, p.output) == (81, 83, 24, 480, 832, "video")
    p = params(wan(type="image_high", config={"frames": 50}))
    assert p.frames == 1 and p.output == "image" and p.steps == S.wan_high_steps
    p = params(wan(metadata={"start_reference_url": "http://a/s.png", "end_reference_url": "http://a/e.png"}))
    assert p.reference_mode == "both" and p.references["first"][0] == "metadata.start_reference_url"
    p = params(wan(config={"reference_mode": "single", "image": "http://a/i.png"}, metadata={"reference_image_url": "http://a/m.png"}))
    assert p.references == {"single": ("config.image", "http://a/i.png")}
    p = params(wan(type="video7b_fast_enhanced"))
    assert p.enhanced_type and p.reference_mode == "none"


def test_usable_id() -> None:
    assert usable_id({"id": "abc"}) == "abc"
    assert usable_id({"job_id": "abc"}) == "abc"
    assert usable_id({"id": "../x"}) is None
    assert usable_id({"id": 5}) is None
    assert usable_id(["id"]) is None


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "wizard", "content": "x"}]}, "messages[1].role"),
        ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt"}, "model"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "top_p"),
        ({"messages": [{"role": "user", "content": "x" * 40000}]}, "messages"),
        ({"messages": [{"role": "user"}]}, "messages.0.content"),
    ],
)
def test_bad_chat_requests(payload: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidJob) as info:
        parse_chat(payload, S)
    assert info.value.field == field


def test_chat_message_names_role_error_as_in_contract() -> None:
    with pytest.raises(InvalidJob) as info:
        parse_chat({"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}, S)
    assert str(info.value) == "INVALID_JOB: messages[1].role must be one of system, user, assistant"


def test_chat_ignores_unknown_fields() -> None:
    req = parse_chat({"messages": [{"role": "user", "content": "a"}], "sfw_mode": False}, S)
    assert req.model == "qwen_instruct" and req.max_tokens == 512
