"""SDXL text-to-image and image-to-image.

:func:`~ourvidz_tasks.models.tiny.sdxl.build_tiny` writes a complete,
random-weight SDXL diffusers folder (a few MB, seeded, offline) that loads
through exactly the same ``from_pretrained`` call as a real local folder.
``load_sdxl`` reads a diffusers folder or a single ``.safetensors``
checkpoint (with ``OURVIDZ_SDXL_CONFIG`` giving the component configs) and
``run_sdxl`` renders one image per seed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..contract.errors import ConfigError, I2IPipelineError, InvalidJob, ModelLoadError, OutOfMemory
from . import brief_error, build_once, compute_dtype, module_bytes, release_memory
from .diffusion import StepCallback, check_run_args, fit_image, is_seed, step_callback
from .previews import LatentsHook, load_decoder
from .tiny.sdxl import build_tiny, build_tiny_preview

if TYPE_CHECKING:
    import PIL.Image
    import torch
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    from ..contract.settings import Settings

#: The torch modules whose weights make up the model (``nbytes``, ``unload``).
_MODULES = ("unet", "vae", "text_encoder", "text_encoder_2")


@dataclass
class SdxlModel:
    """A loaded SDXL: text-to-image and image-to-image pipelines sharing one set of weights."""

    t2i: StableDiffusionXLPipeline
    #: made with ``from_pipe(t2i)``: the same module objects, no copy
    i2i: StableDiffusionXLImg2ImgPipeline
    device: torch.device
    dtype: torch.dtype
    #: where the weights came from, e.g. ``tiny:/cache/sdxl``; never a secret
    source: str
    #: the live previews' tiny decoder (TAESD's); None: previews are off
    preview: torch.nn.Module | None = None
    _unloaded: bool = field(default=False, repr=False)

    def nbytes(self) -> int:
        """Parameter and buffer bytes of the UNet, VAE, both text encoders and the preview decoder (0 once unloaded)."""
        if self._unloaded:
            return 0
        return module_bytes([*(getattr(self.t2i, name, None) for name in _MODULES), self.preview])

    def unload(self) -> int:
        """Drop every reference to the weights and release device memory; return the bytes freed.

        The model cannot run afterwards; a second call returns 0.
        """
        freed = self.nbytes()
        if not self._unloaded:
            for pipe in (self.i2i, self.t2i):
                for name in _MODULES:
                    # DiffusionPipeline.__setattr__ also updates its config for registered modules.
                    setattr(pipe, name, None)
            self.preview = None
            self._unloaded = True
        release_memory(self.device)
        return freed


# -- loading ----------------------------------------------------------------------


def load_sdxl(settings: Settings, device: torch.device) -> SdxlModel:
    """Load SDXL as ``settings`` say and move it to ``device``.

    ``OURVIDZ_MODEL_SOURCE=tiny`` builds the tiny model once into
    ``tiny_cache/sdxl`` and loads it like any local folder. ``local`` reads
    ``OURVIDZ_SDXL_MODEL``: a diffusers folder, or one ``.safetensors``
    checkpoint (original SDXL layout) whose component configs and tokenizers
    come from the diffusers folder ``OURVIDZ_SDXL_CONFIG``. Nothing is ever
    downloaded. Half precision on CUDA (the VAE is upcast to float32 to decode
    when its config says ``force_upcast``, as SDXL's does), float32 on CPU.

    Raises ConfigError for a missing or wrong setting, ModelLoadError when the
    files cannot be loaded and OutOfMemory when the device cannot hold them.
    """
    dtype = compute_dtype(device, "float16")
    _quiet_diffusers()
    if settings.model_source == "tiny":
        folder = build_once(settings.tiny_cache / "sdxl", build_tiny)
        t2i = _load_folder(folder, dtype)
        source = f"tiny:{folder}"
    else:
        path = settings.sdxl_model
        if path is None:
            raise ConfigError("OURVIDZ_SDXL_MODEL is not set (needed when OURVIDZ_MODEL_SOURCE=local)")
        if path.is_dir():
            t2i = _load_folder(path, dtype)
        elif path.is_file() and path.suffix == ".safetensors":
            t2i = _load_single_file(path, settings.sdxl_config, dtype)
        elif path.exists():
            raise ConfigError(f"OURVIDZ_SDXL_MODEL: {path} is neither a diffusers folder nor a .safetensors file")
        else:
            raise ConfigError(f"OURVIDZ_SDXL_MODEL: {path} does not exist")
        source = f"local:{path}"
    model = _finish(t2i, device, dtype, source)
    model.preview = _load_preview(settings, device, dtype)
    return model


def _load_preview(settings: Settings, device: torch.device, dtype: torch.dtype) -> torch.nn.Module | None:
    """TAESD's decoder for live previews: ``OURVIDZ_SDXL_PREVIEW_MODEL`` (a tiny model source
    builds a tiny one when it is unset); None: previews are off."""
    if not settings.previews:
        return None
    folder = settings.sdxl_preview_model
    if folder is None and settings.model_source == "tiny":
        folder = build_once(settings.tiny_cache / "taesdxl", build_tiny_preview)
    return load_decoder(folder, device, dtype, "SDXL")


def _load_folder(folder: Path, dtype: torch.dtype) -> StableDiffusionXLPipeline:
    """``from_pretrained`` of a local diffusers folder; failures become ModelLoadError."""
    from diffusers import StableDiffusionXLPipeline

    # A folder holding only the fp16 variant (``*.fp16.safetensors``) needs ``variant``.
    unet = folder / "unet"
    fp16_only = any(unet.glob("*.fp16.safetensors")) and not any(
        p for p in unet.glob("*.safetensors") if ".fp16." not in p.name
    )
    try:
        return StableDiffusionXLPipeline.from_pretrained(
            folder,
            dtype=dtype,  # diffusers 0.42 name of ``torch_dtype`` (deprecated, and it warns on .to())
            local_files_only=True,
            add_watermarker=False,
            variant="fp16" if fp16_only else None,
        )
    except Exception as exc:
        raise _load_error(f"SDXL folder {folder.name!r}", exc) from exc


def _load_single_file(path: Path, config: Path | None, dtype: torch.dtype) -> StableDiffusionXLPipeline:
    """``from_single_file`` of one checkpoint with a local diffusers config folder."""
    from diffusers import StableDiffusionXLPipeline

    if config is None:
        raise ConfigError(
            "OURVIDZ_SDXL_CONFIG is not set: a diffusers config folder is required "
            "when OURVIDZ_SDXL_MODEL is a .safetensors file"
        )
    if not (config / "model_index.json").is_file():
        raise ConfigError(f"OURVIDZ_SDXL_CONFIG: {config} is not a diffusers folder (no model_index.json)")
    try:
        return StableDiffusionXLPipeline.from_single_file(
            str(path),
            config=str(config),
            local_files_only=True,
            dtype=dtype,
            add_watermarker=False,
        )
    except Exception as exc:
        raise _load_error(f"SDXL checkpoint {path.name!r}", exc) from exc


def _load_error(what: str, exc: BaseException) -> ModelLoadError:
    """A one-line ModelLoadError: what failed and the first line of why."""
    return ModelLoadError(f"{what} could not be loaded: {brief_error(exc)}")


class _NoEmptyFp32Warning(logging.Filter):
    """Drops diffusers 0.42's warning on every ``.to(dtype=...)`` that names no module.

    ``ModelMixin.to`` warns "There are modules ... that should be kept in
    float32: []" whenever a dtype is passed, even with that list empty; the
    img2img pipeline does so on each call (VAE ``force_upcast``).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


def _quiet_diffusers() -> None:
    """Install :class:`_NoEmptyFp32Warning` once."""
    logger = logging.getLogger("diffusers.models.modeling_utils")
    if not any(isinstance(f, _NoEmptyFp32Warning) for f in logger.filters):
        logger.addFilter(_NoEmptyFp32Warning())


def _finish(t2i: StableDiffusionXLPipeline, device: torch.device, dtype: torch.dtype, source: str) -> SdxlModel:
    """Move to ``device``, use SDPA attention, derive the img2img pipeline."""
    import torch
    from diffusers import StableDiffusionXLImg2ImgPipeline
    from diffusers.models.attention_processor import AttnProcessor2_0

    pipe: Any = t2i  # diffusers registers the components dynamically: untyped
    try:
        pipe.to(device)
    except torch.OutOfMemoryError as exc:  # the slot releases memory once this traceback is gone
        raise OutOfMemory(f"SDXL does not fit on {device}") from exc
    _quiet_diffusers()
    # diffusers' default on torch 2, made explicit: a checkpoint's config cannot turn it off.
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    pipe.vae.set_attn_processor(AttnProcessor2_0())
    pipe.set_progress_bar_config(disable=True)
    # from_pipe casts the shared modules to ``dtype`` (float32 unless given): pass ours.
    i2i = StableDiffusionXLImg2ImgPipeline.from_pipe(t2i, dtype=dtype, add_watermarker=False)
    i2i.set_progress_bar_config(disable=True)
    return SdxlModel(t2i=t2i, i2i=i2i, device=device, dtype=dtype, source=source)


# -- running ------------------------------------------------------------------------


def run_sdxl(
    model: SdxlModel,
    *,
    prompt: str,
    negative_prompt: str | None,
    width: int,
    height: int,
    steps: int,
    guidance_scale: float,
    seeds: list[int],
    image: PIL.Image.Image | None = None,
    strength: float | None = None,
    on_step: StepCallback | None = None,
    on_latents: LatentsHook | None = None,
    compel: bool = False,
    compel_weights: str | None = None,
) -> list[PIL.Image.Image]:
    """Render one RGB ``width`` x ``height`` image per seed, in the order of ``seeds``.

    Each image has its own CPU generator seeded with its seed, so image i
    depends only on ``seeds[i]``: one batch of three equals three runs of one
    (within float noise) and the same seed gives the same pixels on one device.

    With ``image`` it is image-to-image: the reference is center-cropped to the
    aspect of ``width`` x ``height``, resized to exactly that size (Lanczos),
    and noised by ``strength`` (0 < strength <= 1; about ``steps * strength``
    steps run). ``negative_prompt=None`` means none (SDXL then uses zeros).
    ``on_step(step, total)`` is called after every denoising step (1-based);
    whatever it raises stops the run and propagates unchanged; then ``on_latents(step, total,
    latents)`` (a live preview, :func:`~ourvidz_tasks.models.previews.latents_hook`) reads the
    latents, which go on unchanged. ``compel=True``
    builds the embeddings with compel, so ``(cat)1.3`` style weights work;
    ``compel_weights``, a compel-syntax string, then replaces ``prompt`` as the
    text embedded.

    Raises ValueError naming the argument for a bad size, step count, guidance
    or seed list, I2IPipelineError for an unusable reference or strength, and
    OutOfMemory when the device runs out of memory.
    """
    import torch

    _check_args(width=width, height=height, steps=steps, guidance_scale=guidance_scale, seeds=seeds)
    if model._unloaded:
        raise ModelLoadError("SDXL model was unloaded; load it again")
    kwargs: dict[str, Any] = {
        "num_inference_steps": steps,
        "guidance_scale": guidance_scale,
        "num_images_per_prompt": len(seeds),
        "generator": [torch.Generator("cpu").manual_seed(seed) for seed in seeds],
        "output_type": "pil",
    }
    pipe: Any  # diffusers pipelines are untyped where it matters (components, __call__)
    _reset_vae(model)
    if image is None:
        pipe = model.t2i
        kwargs.update(width=width, height=height)
    else:
        pipe = model.i2i
        kwargs.update(image=_fit(image, width, height), strength=_check_strength(strength, steps))
    if on_step is not None or on_latents is not None:
        kwargs.update(callback_on_step_end=step_callback(on_step, on_latents),
                      callback_on_step_end_tensor_inputs=["latents"] if on_latents is not None else [])
    try:
        with torch.inference_mode():
            if compel:
                kwargs.update(_compel_embeddings(
                    pipe, compel_weights or prompt, "compel_weights" if compel_weights else "prompt", negative_prompt))
            else:
                kwargs.update(prompt=prompt, negative_prompt=negative_prompt)
            images = pipe(**kwargs).images
    except torch.OutOfMemoryError as exc:
        raise _oom(model, width, height, len(seeds)) from exc
    except RuntimeError as exc:
        if "can't allocate memory" not in str(exc):  # the CPU allocator's OOM
            raise
        raise _oom(model, width, height, len(seeds)) from exc
    return [img if img.mode == "RGB" else img.convert("RGB") for img in images]


def _reset_vae(model: SdxlModel) -> None:
    """Put the VAE back in the model's dtype if a failed run left it upcast.

    With ``force_upcast`` the pipelines move the shared VAE to float32 to
    decode (and img2img to encode) and back afterwards; an error in between
    (out of memory) would leave it in float32, and every later run would then
    fail on half-precision latents.
    """
    vae: Any = getattr(model.t2i, "vae", None)
    if vae is not None and vae.dtype != model.dtype:
        vae.to(dtype=model.dtype)


def _check_args(*, width: int, height: int, steps: int, guidance_scale: float, seeds: list[int]) -> None:
    """ValueError naming the first bad argument."""
    check_run_args(width=width, height=height, multiple=8, steps=steps, guidance_scale=guidance_scale)
    if not seeds:
        raise ValueError("seeds must hold at least one seed")
    for seed in seeds:
        if not is_seed(seed):
            raise ValueError(f"seeds must be integers in [0, 2**64), got {seed!r}")


def _check_strength(strength: float | None, steps: int) -> float:
    """The img2img strength, or I2IPipelineError when it is missing or runs no step."""
    if strength is None:
        raise I2IPipelineError("strength is required with a reference image", field="strength")
    if not 0 < strength <= 1:
        raise I2IPipelineError(f"strength must be in (0, 1], got {strength!r}", field="strength")
    if int(steps * strength) < 1:
        raise I2IPipelineError(f"strength {strength} with {steps} steps runs no denoising step", field="strength")
    return float(strength)


def _fit(image: PIL.Image.Image, width: int, height: int) -> PIL.Image.Image:
    """:func:`~ourvidz_tasks.models.diffusion.fit_image`, with an unusable image as I2IPipelineError."""
    if image.width < 1 or image.height < 1:
        raise I2IPipelineError("reference image is empty", field="image")
    try:
        return fit_image(image, width, height)
    except (OSError, ValueError) as exc:
        raise I2IPipelineError(f"reference image cannot be used: {type(exc).__name__}", field="image") from exc


def _compel_text(text: str, field: str) -> str:
    """``text`` as compel is given it: each run of whitespace one space, which is what the CLIP
    tokenizers make of it anyway (compel's parser refuses a form feed or a vertical tab), and parsed
    here, so that a prompt compel cannot read fails the job naming its field (never echoing it)."""
    from compel import Compel

    spaced = " ".join(text.split())
    try:
        Compel.parse_prompt_string(spaced)
    except Exception as exc:  # a parser and nothing else: pyparsing's ParseException, compel's own
        raise InvalidJob(f"`{field}` is not valid compel syntax ({type(exc).__name__})", field=field) from None
    return spaced


def _compel_embeddings(pipe: Any, text: str, field: str, negative_prompt: str | None) -> dict[str, Any]:
    """Prompt (and negative) embeddings from compel: both encoders' penultimate layer, pooled from the second.

    ``CompelForSDXL`` is compel 2.5's wrapper for exactly this set-up (one
    ``Compel`` per encoder, ``PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED``, pooled
    only from ``text_encoder_2``, long prompts not truncated). The older form,
    ``Compel`` given both tokenizers/encoders with ``requires_pooled=[False,
    True]``, gives the same embeddings but prints a deprecation notice to stdout
    on every construction and cannot pad a long prompt against its negative
    (``EmbeddingsProviderMulti`` has no ``empty_z``).
    """
    from compel import CompelForSDXL

    text = _compel_text(text, field)
    if negative_prompt is not None:
        negative_prompt = _compel_text(negative_prompt, "negative_prompt")
    conditioning = CompelForSDXL(pipe, device=str(pipe._execution_device))(text, negative_prompt=negative_prompt)
    out = {"prompt_embeds": conditioning.embeds, "pooled_prompt_embeds": conditioning.pooled_embeds}
    if negative_prompt is not None:
        out.update(
            negative_prompt_embeds=conditioning.negative_embeds,
            negative_pooled_prompt_embeds=conditioning.negative_pooled_embeds,
        )
    return out


def _oom(model: SdxlModel, width: int, height: int, count: int) -> OutOfMemory:
    """Describe the failed run (no prompt). Memory is released by the caller once out of its
    ``except`` (:func:`~ourvidz_tasks.runtime.faults.step_down`): here the traceback still holds the run."""
    return OutOfMemory(f"SDXL ran out of memory on {model.device} at {width}x{height} x{count}")
