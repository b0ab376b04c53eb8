"""The SDXL loader and runner, on the real tiny model built offline."""

from __future__ import annotations

import gc
import json
import os
import shutil
import socket
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from ourvidz_tasks.contract.errors import ConfigError, I2IPipelineError, InvalidJob, ModelLoadError
from ourvidz_tasks.contract.settings import Settings, load_settings
from ourvidz_tasks.models import module_bytes
from ourvidz_tasks.models.previews import decode_image
from ourvidz_tasks.models.sdxl import SdxlModel, build_tiny, load_sdxl, run_sdxl
from ourvidz_tasks.tools.sdxl_layout import to_original_layout

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a hub

CPU = torch.device("cpu")
SMALL: dict[str, Any] = {"negative_prompt": "blurry", "width": 256, "height": 256, "steps": 3, "guidance_scale": 5.0}
PROMPT = "a photo of a red cat"


@pytest.fixture(scope="module")
def tiny_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return load_settings(model_source="tiny", tiny_cache=tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def model(tiny_settings: Settings) -> Iterator[SdxlModel]:
    loaded = load_sdxl(tiny_settings, CPU)
    yield loaded
    loaded.unload()


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def max_diff(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


# -- build and load ------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.usefixtures("no_network")
def test_tiny_builds_and_loads_offline(tmp_path: Path) -> None:
    settings = load_settings(model_source="tiny", tiny_cache=tmp_path)
    loaded = load_sdxl(settings, CPU)
    try:
        folder = tmp_path / "sdxl"
        for name in (
            "model_index.json", ".complete", "scheduler/scheduler_config.json",
            "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors", "text_encoder_2/model.safetensors",
            "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer_2/vocab.json", "tokenizer_2/merges.txt",
        ):
            assert (folder / name).is_file(), name
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        assert size < 8 * 1024 * 1024
        index = json.loads((folder / "model_index.json").read_text())
        assert index["_class_name"] == "StableDiffusionXLPipeline"
        assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
        assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
        assert index["scheduler"] == ["diffusers", "EulerDiscreteScheduler"]

        t2i: Any = loaded.t2i  # diffusers pipelines' components are untyped
        i2i: Any = loaded.i2i
        assert loaded.source == f"tiny:{folder}"
        assert loaded.device == CPU and loaded.dtype == torch.float32
        assert t2i.unet.dtype == torch.float32
        assert loaded.nbytes() > 0
        # img2img shares the very same modules
        for name in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
            assert getattr(i2i, name) is getattr(t2i, name), name
        unet = t2i.unet
        assert unet.config.addition_embed_type == "text_time"
        assert unet.config.projection_class_embeddings_input_dim == (
            6 * unet.config.addition_time_embed_dim + t2i.text_encoder_2.config.projection_dim
        )
        assert unet.config.cross_attention_dim == (
            t2i.text_encoder.config.hidden_size + t2i.text_encoder_2.config.hidden_size
        )
        assert not t2i.vae.config.mid_block_add_attention
        assert t2i.vae_scale_factor == 8 and t2i.vae.config.latent_channels == 4
        assert {type(p).__name__ for p in unet.attn_processors.values()} == {"AttnProcessor2_0"}
        assert t2i._progress_bar_config == {"disable": True}
        assert i2i._progress_bar_config == {"disable": True}
        assert t2i.watermark is None
    finally:
        loaded.unload()


def test_tiny_build_is_reproducible(tmp_path: Path, tiny_settings: Settings, model: SdxlModel) -> None:
    build_tiny(tmp_path)
    built = tiny_settings.tiny_cache / "sdxl"
    for name in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors", "text_encoder_2/model.safetensors", "tokenizer/vocab.json",
                 "tokenizer/merges.txt"):
        assert (tmp_path / name).read_bytes() == (built / name).read_bytes(), name


def test_tiny_tokenizers_are_clip_bpe(model: SdxlModel) -> None:
    t2i: Any = model.t2i
    tokenizer, tokenizer_2 = t2i.tokenizer, t2i.tokenizer_2
    assert type(tokenizer).__name__ == "CLIPTokenizer"
    assert tokenizer.model_max_length == 77
    ids = tokenizer("A photo of a CAT").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.convert_ids_to_tokens(ids[1:-1]) == ["a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>"]
    # a word without merges falls back to byte-level characters
    assert tokenizer.convert_ids_to_tokens(tokenizer("zq").input_ids[1:-1]) == ["z", "q</w>"]
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer_2.pad_token == "!"
    assert t2i.text_encoder.config.vocab_size == len(tokenizer)


def test_unload_drops_every_reference(tiny_settings: Settings) -> None:
    loaded = load_sdxl(tiny_settings, CPU)
    before = loaded.nbytes()
    refs = [weakref.ref(getattr(loaded.t2i, name)) for name in ("unet", "vae", "text_encoder", "text_encoder_2")]
    refs.append(weakref.ref(loaded.preview))
    assert loaded.unload() == before > 0
    gc.collect()
    assert all(ref() is None for ref in refs)
    assert loaded.nbytes() == 0
    assert loaded.unload() == 0
    with pytest.raises(ModelLoadError, match="unloaded"):
        run_sdxl(loaded, prompt=PROMPT, seeds=[1], **SMALL)


def test_half_precision_path(tiny_settings: Settings, model: SdxlModel) -> None:
    """The CUDA dtype path, run on CPU (fp16 convolutions work there, slowly).

    img2img must not cast the shared fp16 modules back to float32 (``from_pipe``
    does unless given the dtype); the VAE is upcast to decode (``force_upcast``)
    and back; a VAE left in float32 by an interrupted run is put back.
    """
    from diffusers import StableDiffusionXLPipeline

    from ourvidz_tasks.models.sdxl import _finish

    folder = tiny_settings.tiny_cache / "sdxl"
    half: Any = StableDiffusionXLPipeline.from_pretrained(folder, dtype=torch.float16, local_files_only=True)
    loaded = _finish(half, CPU, torch.float16, "test")
    try:
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            assert getattr(loaded.t2i, name).dtype == torch.float16, name
            assert getattr(loaded.i2i, name) is getattr(loaded.t2i, name)
        assert half.vae.config.force_upcast
        kwargs: dict[str, Any] = {"prompt": PROMPT, "seeds": [0], **{**SMALL, "width": 64, "height": 64, "steps": 2}}
        assert run_sdxl(loaded, **kwargs)[0].size == (64, 64)
        assert half.vae.dtype == torch.float16
        reference = Image.new("RGB", (64, 64), "red")
        assert run_sdxl(loaded, image=reference, strength=0.5, **{**kwargs, "steps": 4})[0].size == (64, 64)
        assert half.vae.dtype == torch.float16
        half.vae.to(torch.float32)  # as an out-of-memory error mid-decode leaves it
        assert run_sdxl(loaded, **kwargs)[0].size == (64, 64)
        assert half.vae.dtype == torch.float16
    finally:
        loaded.unload()


# -- configuration errors --------------------------------------------------------


def test_local_without_model_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="OURVIDZ_SDXL_MODEL"):
        load_sdxl(load_settings(model_source="local", sdxl_model=None), CPU)
    with pytest.raises(ConfigError, match="OURVIDZ_SDXL_MODEL"):
        load_sdxl(load_settings(model_source="local", sdxl_model=tmp_path / "absent.safetensors"), CPU)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ConfigError, match="OURVIDZ_SDXL_MODEL"):
        load_sdxl(load_settings(model_source="local", sdxl_model=tmp_path / "weights.bin"), CPU)


def test_single_file_without_config_is_config_error(tmp_path: Path) -> None:
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"not read")
    with pytest.raises(ConfigError, match="OURVIDZ_SDXL_CONFIG"):
        load_sdxl(load_settings(model_source="local", sdxl_model=checkpoint, sdxl_config=None), CPU)
    with pytest.raises(ConfigError, match="OURVIDZ_SDXL_CONFIG"):
        load_sdxl(load_settings(model_source="local", sdxl_model=checkpoint, sdxl_config=tmp_path), CPU)


# -- local weights -----------------------------------------------------------------


def test_local_folder_loads_like_tiny(tiny_settings: Settings, model: SdxlModel) -> None:
    folder = tiny_settings.tiny_cache / "sdxl"
    loaded = load_sdxl(load_settings(model_source="local", sdxl_model=folder), CPU)
    try:
        assert loaded.source == f"local:{folder}"
        kwargs: dict[str, Any] = {"prompt": PROMPT, "seeds": [5], **SMALL}
        assert max_diff(run_sdxl(loaded, **kwargs)[0], run_sdxl(model, **kwargs)[0]) == 0
    finally:
        loaded.unload()


@pytest.mark.usefixtures("no_network")
def test_single_file_checkpoint_in_original_layout(tmp_path: Path, tiny_settings: Settings, model: SdxlModel) -> None:
    """One .safetensors in the original (ldm/sgm) SDXL key layout loads back weight for weight."""
    from safetensors.torch import save_file

    folder = tiny_settings.tiny_cache / "sdxl"
    checkpoint = tmp_path / "sdxl.safetensors"
    state = to_original_layout(folder)
    assert "model.diffusion_model.input_blocks.0.0.weight" in state
    assert "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight" in state
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in state
    assert "first_stage_model.decoder.up.0.block.0.conv1.weight" in state
    save_file(state, str(checkpoint))
    # the config folder holds configs and tokenizers but no weights: every weight must come from the file
    config = tmp_path / "config"
    shutil.copytree(folder, config, ignore=shutil.ignore_patterns("*.safetensors", ".complete"))
    loaded = load_sdxl(load_settings(model_source="local", sdxl_model=checkpoint, sdxl_config=config), CPU)
    try:
        assert loaded.source == f"local:{checkpoint}"
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            got = getattr(loaded.t2i, name).state_dict()
            want = getattr(model.t2i, name).state_dict()
            assert got.keys() == want.keys(), name
            assert all(torch.equal(got[k], want[k]) for k in want), name
        kwargs: dict[str, Any] = {"prompt": PROMPT, "seeds": [5], **SMALL}
        assert max_diff(run_sdxl(loaded, **kwargs)[0], run_sdxl(model, **kwargs)[0]) == 0
    finally:
        loaded.unload()


def test_corrupt_files_are_model_load_errors(tmp_path: Path, tiny_settings: Settings, model: SdxlModel) -> None:
    folder = tiny_settings.tiny_cache / "sdxl"
    config = tmp_path / "config"
    shutil.copytree(folder, config, ignore=shutil.ignore_patterns("*.safetensors", ".complete"))
    checkpoint = tmp_path / "broken.safetensors"
    checkpoint.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match=r"broken\.safetensors"):
        load_sdxl(load_settings(model_source="local", sdxl_model=checkpoint, sdxl_config=config), CPU)

    broken = tmp_path / "folder"
    shutil.copytree(folder, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="could not be loaded"):
        load_sdxl(load_settings(model_source="local", sdxl_model=broken), CPU)


# -- running -------------------------------------------------------------------------


def test_t2i_returns_rgb_images_of_the_requested_size(model: SdxlModel) -> None:
    images = run_sdxl(model, prompt=PROMPT, seeds=[3, 4], **{**SMALL, "width": 256, "height": 192})
    assert len(images) == 2
    assert all(img.size == (256, 192) and img.mode == "RGB" for img in images)
    assert max_diff(images[0], images[1]) > 0


def test_same_seed_same_pixels(model: SdxlModel) -> None:
    for seed in (0, 2**63 + 5):
        first = run_sdxl(model, prompt=PROMPT, seeds=[seed], **SMALL)[0]
        again = run_sdxl(model, prompt=PROMPT, seeds=[seed], **SMALL)[0]
        assert first.tobytes() == again.tobytes(), seed
    other = run_sdxl(model, prompt=PROMPT, seeds=[1], **SMALL)[0]
    assert max_diff(first, other) > 0


def test_batch_equals_single_runs(model: SdxlModel) -> None:
    seeds = [0, 7, 123]
    batch = run_sdxl(model, prompt=PROMPT, seeds=seeds, **SMALL)
    singles = [run_sdxl(model, prompt=PROMPT, seeds=[seed], **SMALL)[0] for seed in seeds]
    for together, alone in zip(batch, singles, strict=True):
        assert max_diff(together, alone) <= 2
    assert max_diff(batch[0], batch[1]) > 10


def test_no_negative_prompt(model: SdxlModel) -> None:
    without = run_sdxl(model, prompt=PROMPT, seeds=[2], **{**SMALL, "negative_prompt": None})[0]
    with_negative = run_sdxl(model, prompt=PROMPT, seeds=[2], **SMALL)[0]
    assert without.size == (256, 256)
    assert max_diff(without, with_negative) > 0


def test_i2i_runs_and_differs_from_t2i(model: SdxlModel) -> None:
    # a reference of another size and aspect: center-cropped and resized to 256x256
    gradient = np.linspace(0, 255, 300 * 200 * 3).reshape(200, 300, 3).astype(np.uint8)
    reference = Image.fromarray(gradient)
    steps: list[tuple[int, int]] = []
    kwargs: dict[str, Any] = {"prompt": PROMPT, "seeds": [0, 1], **{**SMALL, "steps": 4}}
    i2i = run_sdxl(model, image=reference, strength=0.5, on_step=lambda i, n: steps.append((i, n)), **kwargs)
    t2i = run_sdxl(model, **kwargs)
    assert [img.size for img in i2i] == [(256, 256), (256, 256)]
    assert all(img.mode == "RGB" for img in i2i)
    assert max_diff(i2i[0], t2i[0]) > 10
    assert steps == [(1, 2), (2, 2)]  # strength 0.5 of 4 steps
    again = run_sdxl(model, image=reference.convert("L"), strength=0.5, **kwargs)
    assert max_diff(again[0], i2i[0]) > 0  # the reference matters (grey version differs)
    single = run_sdxl(model, image=reference, strength=0.5, **{**kwargs, "seeds": [1]})
    assert max_diff(single[0], i2i[1]) <= 2


def test_i2i_needs_a_usable_strength(model: SdxlModel) -> None:
    reference = Image.new("RGB", (64, 64), "red")
    kwargs: dict[str, Any] = {"prompt": PROMPT, "seeds": [0], "image": reference, **SMALL}
    with pytest.raises(I2IPipelineError, match="strength"):
        run_sdxl(model, **kwargs)
    with pytest.raises(I2IPipelineError, match="strength"):
        run_sdxl(model, strength=1.5, **kwargs)
    with pytest.raises(I2IPipelineError, match="strength"):
        run_sdxl(model, strength=0.1, **kwargs)  # int(3 * 0.1) == 0 steps


def test_on_step_sees_every_step(model: SdxlModel) -> None:
    calls: list[tuple[int, int]] = []
    run_sdxl(model, prompt=PROMPT, seeds=[0], on_step=lambda i, n: calls.append((i, n)), **{**SMALL, "steps": 4})
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_preview_decoder_is_counted_and_reads_the_latents_unchanged(tiny_settings: Settings, model: SdxlModel) -> None:
    decoder = model.preview
    assert decoder is not None
    parts = [getattr(model.t2i, name) for name in ("unet", "vae", "text_encoder", "text_encoder_2")]
    assert model.nbytes() == module_bytes(parts) + module_bytes([decoder]) > module_bytes(parts)
    seen: list[tuple[int, int, tuple[int, ...]]] = []
    previews: list[np.ndarray] = []

    def on_latents(step: int, total: int, latents: torch.Tensor) -> None:
        seen.append((step, total, tuple(latents.shape)))
        previews.append(decode_image(decoder, latents))

    args: dict[str, Any] = {**SMALL, "width": 512, "height": 256, "steps": 3}
    plain = run_sdxl(model, prompt=PROMPT, seeds=[4, 5], **args)
    watched = run_sdxl(model, prompt=PROMPT, seeds=[4, 5], on_latents=on_latents, **args)
    assert seen == [(1, 3, (2, 4, 32, 64)), (2, 3, (2, 4, 32, 64)), (3, 3, (2, 4, 32, 64))]
    assert all(p.shape == (128, 256, 3) and p.dtype == np.uint8 for p in previews)  # decoded at most 256 px
    assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(plain, watched, strict=True))
    off = load_sdxl(load_settings(model_source="tiny", tiny_cache=tiny_settings.tiny_cache, previews=False), CPU)
    assert off.preview is None and off.nbytes() == model.nbytes() - module_bytes([decoder])
    off.unload()


def test_on_step_exception_stops_the_run(model: SdxlModel) -> None:
    class Stop(Exception):
        pass

    calls: list[int] = []

    def on_step(step: int, total: int) -> None:
        calls.append(step)
        if step == 2:
            raise Stop("cancelled")

    with pytest.raises(Stop):
        run_sdxl(model, prompt=PROMPT, seeds=[0], on_step=on_step, **{**SMALL, "steps": 5})
    assert calls == [1, 2]
    # the model still works afterwards
    assert len(run_sdxl(model, prompt=PROMPT, seeds=[0], **SMALL)) == 1


def test_compel(model: SdxlModel) -> None:
    kwargs: dict[str, Any] = {"seeds": [4], **SMALL}
    plain = run_sdxl(model, prompt=PROMPT, **kwargs)[0]
    # without weights compel builds the embeddings SDXL builds itself
    assert max_diff(run_sdxl(model, prompt=PROMPT, compel=True, **kwargs)[0], plain) <= 1
    assert max_diff(
        run_sdxl(model, prompt=PROMPT, compel=True, **{**kwargs, "negative_prompt": None})[0],
        run_sdxl(model, prompt=PROMPT, **{**kwargs, "negative_prompt": None})[0],
    ) <= 1
    weighted = run_sdxl(model, prompt="a photo of a red (cat)1.5", compel=True, **kwargs)[0]
    assert weighted.size == (256, 256) and max_diff(weighted, plain) > 0
    # compel_weights replaces the prompt text
    replaced = run_sdxl(model, prompt="ignored", compel=True, compel_weights="a photo of a red (cat)1.5", **kwargs)[0]
    assert replaced.tobytes() == weighted.tobytes()
    # a form feed or a vertical tab, which compel's parser refuses, is what the tokenizers make of it: a space
    spaced = run_sdxl(model, prompt="a photo\x0cof a red\x0b (cat)1.5 ", compel=True, **kwargs)[0]
    assert spaced.tobytes() == weighted.tobytes()
    # longer than 77 tokens, against a short negative: not truncated, padded
    long = run_sdxl(model, prompt=", ".join(["a red cat on the sea"] * 20), compel=True, **kwargs)[0]
    assert long.size == (256, 256)


def test_a_prompt_compel_cannot_parse_fails_the_job_naming_its_field(
        model: SdxlModel, monkeypatch: pytest.MonkeyPatch) -> None:
    import compel

    def refuse(text: str) -> None:  # compel's parser, refusing (no known prompt fails once spaces are fixed)
        raise ValueError("Expected end of text")

    monkeypatch.setattr(compel.Compel, "parse_prompt_string", staticmethod(refuse))
    for extra, field in (({"compel_weights": "(cat)1.5"}, "compel_weights"), ({}, "prompt")):
        with pytest.raises(InvalidJob) as refused:
            run_sdxl(model, prompt=PROMPT, compel=True, seeds=[0], **extra, **SMALL)
        assert refused.value.field == field and f"`{field}`" in str(refused.value)
        assert PROMPT not in str(refused.value) and "cat" not in str(refused.value)


def test_out_of_memory_becomes_job_error(model: SdxlModel, monkeypatch: pytest.MonkeyPatch) -> None:
    from ourvidz_tasks.contract.errors import OutOfMemory

    def exhausted(*args: object, **kwargs: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(type(model.t2i), "__call__", exhausted)
    with pytest.raises(OutOfMemory, match="256x256"):
        run_sdxl(model, prompt=PROMPT, seeds=[0, 1], **SMALL)


@pytest.mark.parametrize(
    ("change", "name"),
    [({"width": 250}, "width"), ({"height": 0}, "height"), ({"steps": 0}, "steps"),
     ({"guidance_scale": -1.0}, "guidance_scale"), ({"seeds": []}, "seeds"), ({"seeds": [-1]}, "seeds")],
)
def test_bad_arguments_name_themselves(model: SdxlModel, change: dict[str, Any], name: str) -> None:
    kwargs: dict[str, Any] = {"prompt": PROMPT, "seeds": [0], **SMALL, **change}
    with pytest.raises(ValueError, match=name):
        run_sdxl(model, **kwargs)


@pytest.mark.slow
def test_full_size_smoke(model: SdxlModel) -> None:
    images = run_sdxl(
        model, prompt=PROMPT, negative_prompt="blurry", width=1024, height=1024, steps=15, guidance_scale=7.0,
        seeds=[42],
    )
    assert images[0].size == (1024, 1024) and images[0].mode == "RGB"
