"""The WAN loader and runner, on a real tiny WAN 2.1 VACE model built offline."""

from __future__ import annotations

import json
import math
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch

from ourvidz_tasks.contract.errors import ConfigError, ModelLoadError
from ourvidz_tasks.contract.settings import Settings, load_settings
from ourvidz_tasks.models import wan
from ourvidz_tasks.models.diffusion import fit_image
from ourvidz_tasks.models.wan import ReferenceMode, WanModel, build_tiny, load_wan, run_wan, valid_frame_count

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a hub

CPU = torch.device("cpu")
#: small and non-square, so a swapped width/height shows
W, H, F = 48, 32, 5
MODES: list[ReferenceMode] = ["none", "single", "start", "end", "both"]


def _image(color: tuple[int, int, int], size: tuple[int, int] = (80, 40)) -> PIL.Image.Image:
    """A two-tone image, so cropping and scaling have something to move."""
    image = PIL.Image.new("RGB", size, color)
    image.paste((255 - color[0], 255 - color[1], 255 - color[2]), (0, 0, size[0] // 2, size[1]))
    return image


RED, BLUE = _image((230, 20, 20)), _image((20, 20, 230), (30, 90))


def _run(model: WanModel, **overrides: Any) -> np.ndarray:
    args: dict[str, Any] = {
        "prompt": "a cat walking on the beach, cinematic",
        "negative_prompt": "blurry, low quality",
        "width": W, "height": H, "num_frames": F, "steps": 2, "guidance_scale": 5.0, "seed": 7,
        "reference": RED, "first_frame": RED, "last_frame": BLUE,
    }
    args.update(overrides)
    return run_wan(model, **args)


@pytest.fixture(scope="module")
def tiny_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return load_settings(model_source="tiny", tiny_cache=tmp_path_factory.mktemp("tiny"), wan_kind="auto")


def _no_network(*_args: object, **_kwargs: object) -> None:
    raise AssertionError("the WAN model tried to reach the network")


@pytest.fixture(scope="module")
def model(tiny_settings: Settings) -> Iterator[WanModel]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", _no_network)
        loaded = load_wan(tiny_settings, CPU)
    yield loaded
    loaded.unload()


@pytest.fixture(scope="module")
def t2v_folder(model: WanModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ``WanPipeline`` (text-to-video only) sharing the VACE folder's other parts."""
    from diffusers import WanPipeline, WanTransformer3DModel

    pipe: Any = model.pipe
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=256, ffn_dim=64, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
        )
    folder = tmp_path_factory.mktemp("wan-t2v")
    t2v: Any = WanPipeline(
        tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae, scheduler=pipe.scheduler,
        transformer=transformer,
    )
    t2v.save_pretrained(str(folder))
    return folder


# -- build and load ------------------------------------------------------------


def test_tiny_builds_and_loads_offline(model: WanModel, tiny_settings: Settings) -> None:
    from diffusers import WanVACEPipeline, WanVACETransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    folder = tiny_settings.tiny_cache / "wan"
    pipe: Any = model.pipe
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "WanVACEPipeline"
    assert index["scheduler"] == ["diffusers", "UniPCMultistepScheduler"]
    for part in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (folder / part).is_dir(), part

    assert isinstance(model.pipe, WanVACEPipeline)
    assert isinstance(getattr(pipe, "transformer", None), WanVACETransformer3DModel)
    assert isinstance(getattr(pipe, "text_encoder", None), UMT5EncoderModel)
    assert model.kind == "vace" and model.conditions_on_frames
    assert model.source == f"tiny:{folder}"
    assert model.device == CPU and model.dtype == torch.float32
    assert pipe.vae.dtype == torch.float32
    assert pipe.transformer.dtype == torch.float32
    assert pipe._progress_bar_config == {"disable": True}
    assert 0 < model.nbytes() < 2_000_000

    # A T5-style tokenizer that loads like the real one: pad 0, eos 1 appended, unk 2.
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    ids = tokenizer("a cat in the sky", padding="max_length", max_length=12).input_ids
    assert ids[5] == 1 and ids[6:] == [0] * 6 and 2 not in ids
    assert len(tokenizer) <= pipe.text_encoder.config.vocab_size


def test_load_reuses_the_built_folder(model: WanModel, tiny_settings: Settings) -> None:
    stamp = (tiny_settings.tiny_cache / "wan" / ".complete").stat().st_mtime_ns
    again = load_wan(tiny_settings, CPU)
    try:
        assert again.source == model.source
        assert (tiny_settings.tiny_cache / "wan" / ".complete").stat().st_mtime_ns == stamp
    finally:
        again.unload()


def test_tiny_build_is_reproducible(tmp_path: Path, tiny_settings: Settings, model: WanModel) -> None:
    build_tiny(tmp_path)
    for part in ("transformer", "vae", "text_encoder"):
        built = sorted((tmp_path / part).glob("*.safetensors"))
        cached = sorted((tiny_settings.tiny_cache / "wan" / part).glob("*.safetensors"))
        assert built and [p.read_bytes() for p in built] == [p.read_bytes() for p in cached], part


def test_local_folder_loads_through_the_same_path(model: WanModel, tiny_settings: Settings) -> None:
    folder = tiny_settings.tiny_cache / "wan"
    local = load_wan(load_settings(model_source="local", wan_model=folder, wan_kind="vace"), CPU)
    try:
        assert local.kind == "vace" and local.source == f"local:{folder}"
        assert np.array_equal(_run(local), _run(model))
    finally:
        local.unload()


def test_unload_frees_and_refuses_to_run(tiny_settings: Settings) -> None:
    loaded = load_wan(tiny_settings, CPU)
    size = loaded.nbytes()
    assert loaded.unload() == size > 0
    assert loaded.nbytes() == 0 and loaded.unload() == 0
    with pytest.raises(ModelLoadError, match="unloaded"):
        _run(loaded)


def test_wan_model_unset_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="OURVIDZ_WAN_MODEL"):
        load_wan(load_settings(model_source="local", wan_model=None), CPU)


def test_wan_model_missing_folder_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="OURVIDZ_WAN_MODEL"):
        load_wan(load_settings(model_source="local", wan_model=tmp_path / "absent"), CPU)


def test_broken_folder_is_a_model_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"model_index\.json"):
        load_wan(load_settings(model_source="local", wan_model=tmp_path, wan_kind="auto"), CPU)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "WanImageToVideoPipeline"}))
    with pytest.raises(ModelLoadError, match="WanImageToVideoPipeline"):
        load_wan(load_settings(model_source="local", wan_model=tmp_path, wan_kind="auto"), CPU)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "WanVACEPipeline"}))
    with pytest.raises(ModelLoadError, match="could not be loaded"):
        load_wan(load_settings(model_source="local", wan_model=tmp_path, wan_kind="auto"), CPU)


# -- frame counts ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("requested", "expected"),
    [(1, 1), (2, 1), (4, 1), (5, 5), (8, 5), (9, 9), (32, 29), (33, 33), (80, 77), (81, 81), (83, 81), (85, 85)],
)
def test_valid_frame_count(requested: int, expected: int) -> None:
    assert valid_frame_count(requested) == expected


@pytest.mark.parametrize("requested", [0, -3, True, 2.5])
def test_valid_frame_count_refuses_non_positive(requested: Any) -> None:
    with pytest.raises(ValueError, match="num_frames"):
        valid_frame_count(requested)


# -- conditioning -------------------------------------------------------------------


def test_images_are_scaled_to_cover_and_center_cropped() -> None:
    wide = PIL.Image.new("RGB", (90, 30), (0, 0, 255))
    wide.paste((255, 0, 0), (0, 0, 30, 30))  # red left third: cropped away
    wide.paste((0, 255, 0), (60, 0, 90, 30))  # green right third: cropped away
    fitted = fit_image(wide, 32, 32)
    assert fitted.size == (32, 32) and fitted.mode == "RGB"
    middle = np.asarray(fitted).astype(int)[:, 3:-3]  # (Lanczos rings a little at the seams)
    assert np.abs(middle - [0, 0, 255]).max() <= 8
    tall = fit_image(PIL.Image.new("RGBA", (10, 100), (9, 9, 9, 0)), 48, 16)
    assert tall.size == (48, 16) and tall.mode == "RGB"


@pytest.mark.parametrize(
    ("mode", "kept"), [("start", [0]), ("end", [F - 1]), ("both", [0, F - 1])],
)
def test_frame_modes_build_video_and_mask(mode: ReferenceMode, kept: list[int]) -> None:
    args = wan._conditioning(mode, reference=None, first_frame=RED, last_frame=BLUE, width=W, height=H, num_frames=F)
    assert set(args) == {"video", "mask"}
    video, mask = args["video"], args["mask"]
    assert len(video) == len(mask) == F
    for index in range(F):
        assert video[index].size == mask[index].size == (W, H) and mask[index].mode == "L"
        expected_mask = 0 if index in kept else 255
        assert set(np.asarray(mask[index]).ravel().tolist()) == {expected_mask}
        if index in kept:
            source = RED if index == 0 and mode != "end" else BLUE
            assert np.array_equal(np.asarray(video[index]), np.asarray(fit_image(source, W, H)))
        else:
            assert set(np.asarray(video[index]).ravel().tolist()) == {128}


def test_single_mode_is_a_reference_image_not_a_frame() -> None:
    args = wan._conditioning("single", reference=RED, first_frame=None, last_frame=None, width=W, height=H, num_frames=F)
    assert list(args) == ["reference_images"] and len(args["reference_images"]) == 1
    assert args["reference_images"][0].size == (W, H)
    assert wan._conditioning("none", reference=RED, first_frame=RED, last_frame=RED, width=W, height=H, num_frames=F) == {}


# -- running -----------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_returns_uint8_frames(model: WanModel, mode: ReferenceMode) -> None:
    frames = _run(model, reference_mode=mode)
    assert frames.shape == (F, H, W, 3) and frames.dtype == np.uint8
    assert frames.std() > 0


def test_single_frame_clip(model: WanModel) -> None:
    assert _run(model, num_frames=1, reference_mode="start").shape == (1, H, W, 3)


def test_same_seed_same_clip_other_seed_other_clip(model: WanModel) -> None:
    first = _run(model, reference_mode="both")
    assert np.array_equal(first, _run(model, reference_mode="both"))
    assert not np.array_equal(first, _run(model, reference_mode="both", seed=8))


@pytest.mark.parametrize("mode", ["single", "start", "end", "both"])
def test_images_reach_the_model(model: WanModel, mode: ReferenceMode) -> None:
    plain = _run(model, reference_mode="none")
    conditioned = _run(model, reference_mode=mode)
    assert not np.array_equal(plain, conditioned)
    # ...and which image it is matters too.
    swapped = _run(model, reference_mode=mode, reference=BLUE, first_frame=BLUE, last_frame=RED)
    assert not np.array_equal(conditioned, swapped)


def test_start_and_end_fall_back_to_reference(model: WanModel) -> None:
    assert np.array_equal(
        _run(model, reference_mode="start", first_frame=None, reference=RED),
        _run(model, reference_mode="start", first_frame=RED, reference=BLUE),
    )
    assert np.array_equal(
        _run(model, reference_mode="end", last_frame=None, reference=BLUE),
        _run(model, reference_mode="end", last_frame=BLUE, reference=RED),
    )


def test_unused_images_are_ignored(model: WanModel) -> None:
    assert np.array_equal(
        _run(model, reference_mode="none"),
        _run(model, reference_mode="none", reference=None, first_frame=None, last_frame=None),
    )


def test_on_step_sees_every_step(model: WanModel) -> None:
    calls: list[tuple[int, int]] = []
    _run(model, steps=3, on_step=lambda step, total: calls.append((step, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_on_step_exception_stops_the_run(model: WanModel) -> None:
    class Stop(Exception):
        pass

    calls: list[int] = []

    def stop_at_two(step: int, total: int) -> None:
        calls.append(step)
        if step == 2:
            raise Stop

    with pytest.raises(Stop):
        _run(model, steps=4, reference_mode="start", on_step=stop_at_two)
    assert calls == [1, 2]


# -- t2v checkpoints -----------------------------------------------------------------


def test_t2v_kind_is_detected_and_refuses_reference_modes(t2v_folder: Path) -> None:
    from diffusers import WanPipeline

    t2v = load_wan(load_settings(model_source="local", wan_model=t2v_folder, wan_kind="auto"), CPU)
    try:
        assert isinstance(t2v.pipe, WanPipeline) and t2v.kind == "t2v"
        assert not t2v.conditions_on_frames
        assert _run(t2v).shape == (F, H, W, 3)
        for mode in MODES[1:]:
            with pytest.raises(ValueError, match=rf"^reference_mode '{mode}' needs a VACE checkpoint"):
                _run(t2v, reference_mode=mode)
    finally:
        t2v.unload()


def test_explicit_kind_must_match_the_checkpoint(t2v_folder: Path, tiny_settings: Settings) -> None:
    with pytest.raises(ModelLoadError, match="WAN_KIND=vace"):
        load_wan(load_settings(model_source="local", wan_model=t2v_folder, wan_kind="vace"), CPU)
    with pytest.raises(ModelLoadError, match="WAN_KIND=t2v"):
        load_wan(load_settings(model_source="tiny", tiny_cache=tiny_settings.tiny_cache, wan_kind="t2v"), CPU)


# -- validation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "argument"),
    [
        ({"prompt": None}, "prompt"),
        ({"negative_prompt": 3}, "negative_prompt"),
        ({"width": 40}, "width"),
        ({"width": 0}, "width"),
        ({"height": 100}, "height"),
        ({"height": 32.0}, "height"),
        ({"num_frames": 6}, "num_frames"),
        ({"num_frames": 0}, "num_frames"),
        ({"steps": 0}, "steps"),
        ({"guidance_scale": math.nan}, "guidance_scale"),
        ({"guidance_scale": -1.0}, "guidance_scale"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"reference_mode": "middle"}, "reference_mode"),
        ({"reference_mode": "single", "reference": None}, "reference"),
        ({"reference_mode": "single", "reference": "http://example.test/x.png"}, "reference"),
        ({"reference_mode": "start", "first_frame": None, "reference": None}, "first_frame"),
        ({"reference_mode": "end", "last_frame": None, "reference": None}, "last_frame"),
        ({"reference_mode": "both", "last_frame": None}, "last_frame"),
        ({"reference_mode": "both", "first_frame": None}, "first_frame"),
        ({"reference_mode": "both", "num_frames": 1}, "num_frames"),
        ({"reference_mode": "start", "first_frame": PIL.Image.new("RGB", (0, 0))}, "first_frame"),
    ],
)
def test_bad_arguments_name_the_argument(model: WanModel, overrides: dict[str, Any], argument: str) -> None:
    calls: list[int] = []
    with pytest.raises(ValueError, match=rf"^{argument}\b") as caught:
        _run(model, on_step=lambda step, total: calls.append(step), **overrides)
    assert not calls  # refused before any denoising
    assert "cat" not in str(caught.value)  # never echoes the prompt


# -- sizes the worker really runs (timings in the report) -------------------------------


@pytest.mark.parametrize("frames", [33, pytest.param(81, marks=pytest.mark.slow)])
def test_full_length_clip_at_128(model: WanModel, frames: int) -> None:
    out = _run(model, width=128, height=128, num_frames=frames, steps=4, reference_mode="both")
    assert out.shape == (frames, 128, 128, 3) and out.dtype == np.uint8


def test_preview_decoder_is_counted_and_reads_the_latents_unchanged(model: WanModel, tmp_path: Path) -> None:
    from ourvidz_tasks.models import module_bytes
    from ourvidz_tasks.models.previews import decode_video
    from ourvidz_tasks.models.taehv import load_video_decoder, video_decoder

    decoder = model.preview
    assert decoder is not None and type(decoder).__name__ == "TinyVideoDecoder"
    weights = [getattr(model.pipe, name) for name in ("transformer", "vae", "text_encoder")]
    assert model.nbytes() == module_bytes(weights) + module_bytes([decoder]) > module_bytes(weights)
    clips: list[np.ndarray] = []
    plain = _run(model, reference_mode="none")
    watched = _run(model, reference_mode="none", on_latents=lambda step, total, latents: clips.append(
        decode_video(decoder, latents)))
    assert np.array_equal(plain, watched) and len(clips) == 2
    latent_frames = (F - 1) // 4 + 1
    assert all(c.shape == (latent_frames, H, W, 3) and c.dtype == np.uint8 for c in clips)
    # the published layout (a .pth with the encoder's keys too, temporal upsampling) loads into ours
    published = video_decoder((8, 8, 8, 8), time_upscale=True)
    torch.save({"encoder.0.weight": torch.zeros(64, 3, 3, 3), **published.state_dict()}, tmp_path / "taew2_1.pth")
    loaded = load_video_decoder(tmp_path / "taew2_1.pth", CPU, torch.float32)
    grow = published.state_dict()["decoder.13.conv.weight"]
    assert torch.equal(loaded.state_dict()["decoder.13.conv.weight"], grow[-8:])
