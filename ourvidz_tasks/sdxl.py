"""``ourvidz.sdxl.generate``: SDXL text-to-image and image-to-image.

Section 6 of the contract decides the parameters (:func:`~ourvidz_tasks.jobs.sdxl_params`);
this module fetches the reference, picks the pipeline, applies the fallbacks
and describes each image. The lifecycle around it is :class:`~ourvidz_tasks.lifecycle.JobTask`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Any

from PIL import Image

from .app import app
from .errors import I2IPipelineError, InvalidJob, OutOfMemory, ReferenceUnavailable, UnsafeReference
from .jobs import Job, SdxlParams, sdxl_params
from .lifecycle import Generated, JobTask, Progress, as_job_error
from .media import ImageOutput
from .models import release_memory
from .worker import Runtime

log = logging.getLogger(__name__)


@app.task(base=JobTask, bind=True, name="ourvidz.sdxl.generate")
def generate(self: JobTask, job: dict[str, Any]) -> dict[str, Any]:
    """Generate 1, 3 or 6 images for a job; returns the callback body sent."""
    return self.execute(job, "sdxl", work)


def work(rt: Runtime, job: Job, progress: Progress) -> Generated:
    from .models.sdxl import run_sdxl

    params = sdxl_params(job, rt.settings)
    model = rt.model("sdxl")
    reference, fallback = _reference(rt, params)
    pipeline = "img2img" if reference is not None else "txt2img"
    pipe = partial(
        run_sdxl, model, prompt=params.prompt, negative_prompt=params.negative_prompt, width=params.width,
        height=params.height, steps=params.steps, guidance_scale=params.guidance_scale,
        on_step=progress, compel=params.compel, compel_weights=params.compel_weights,
    )
    images: list[Image.Image] | None = None
    if reference is not None:
        try:
            images = pipe(seeds=params.seeds, image=reference, strength=params.denoise_strength)
        except Exception as exc:
            error = as_job_error(exc)
            if error is not None and not isinstance(error, I2IPipelineError):
                raise error from exc
            if params.exact_copy:
                raise I2IPipelineError(f"img2img failed: {type(exc).__name__}") from exc
            log.warning("job %s: img2img failed (%s), falling back to txt2img", params.job_id, type(exc).__name__)
            fallback = {"code": "I2I_PIPELINE_ERROR", "reason": f"img2img failed: {type(exc).__name__}", "used": "txt2img"}
            pipeline = "txt2img"
    if images is None:
        images, stepped = _stepping_down(rt, model, partial(pipe), params.seeds)
    else:
        stepped = None
    generated = _describe(params, images, pipeline, fallback)
    if stepped:
        generated.metadata["oom_step_down"] = stepped
    return generated


def _stepping_down(rt: Runtime, model: Any, pipe: Callable[..., list[Image.Image]],
                   seeds: list[int]) -> tuple[list[Image.Image], dict[str, Any] | None]:
    """Run the batch; on out-of-memory free memory and step down, keeping every image's seed.

    A batch of 6 runs whole, then as 3+3, then one by one; then one by one
    with VAE tiling and slicing; then (CUDA only) with model CPU offload,
    after which the model is unloaded so the next job starts clean. The
    images are those of an un-stepped run: each image has its own generator.
    """
    import torch

    vae = model.t2i.vae
    plans: list[tuple[str, int]] = [("batch", size) for size in sorted({len(seeds), -(-len(seeds) // 2), 1}, reverse=True)]
    plans.append(("vae_tiling", 1))
    if model.device.type == "cuda":
        plans.append(("cpu_offload", 1))
    failed: list[str] = []
    try:
        for remedy, size in plans:
            if remedy == "vae_tiling":
                vae.enable_tiling()
                vae.enable_slicing()
            elif remedy == "cpu_offload":
                model.t2i.enable_model_cpu_offload(device=model.device)
            try:
                images: list[Image.Image] = []
                for start in range(0, len(seeds), size):
                    chunk = seeds[start:start + size]
                    if rt.settings.fault_oom_batch and len(chunk) >= rt.settings.fault_oom_batch:
                        raise torch.OutOfMemoryError(f"simulated by OURVIDZ_FAULT_OOM_BATCH={rt.settings.fault_oom_batch}")
                    images += pipe(seeds=chunk)
                return images, ({"failed": failed, "batch": size, "remedy": remedy} if failed else None)
            except (OutOfMemory, torch.OutOfMemoryError):
                failed.append(f"{remedy}:{size}")
                release_memory(model.device)
        raise OutOfMemory(f"SDXL ran out of memory even one image at a time ({len(seeds)} image(s), {', '.join(failed)})")
    finally:
        if any(f.startswith("batch:1") for f in failed):
            vae.disable_tiling()
            vae.disable_slicing()
        if any(f.startswith(("vae_tiling", "cpu_offload")) for f in failed):
            rt.models["sdxl"].unload()  # offload hooks stay on the modules


def _reference(rt: Runtime, params: SdxlParams) -> tuple[Image.Image | None, dict[str, Any] | None]:
    """The reference image, or why there is none (a fallback, or an error)."""
    if params.pipeline != "img2img":
        return None, None
    if params.reference is None:
        reason = "no reference image given"
    else:
        try:
            return rt.fetcher.fetch_image(params.reference), None
        except UnsafeReference as exc:
            raise InvalidJob(f"`{params.reference_field}`: {exc}", field=params.reference_field) from None
        except ReferenceUnavailable as exc:
            reason = f"reference unavailable: {exc}"
    if params.exact_copy:
        raise I2IPipelineError(f"exact copy needs a usable reference image ({reason})")
    return None, {"code": "I2I_PIPELINE_ERROR", "reason": reason, "used": "txt2img"}


def _describe(params: SdxlParams, images: list[Image.Image], pipeline: str, fallback: dict[str, Any] | None) -> Generated:
    i2i = pipeline == "img2img"
    outputs = [
        ImageOutput(image, {
            "seed": seed, "steps": params.steps, "steps_run": params.steps_run if i2i else params.steps,
            "guidance_scale": params.guidance_scale,
            "denoise_strength": params.denoise_strength if i2i else None, "pipeline": pipeline,
            "negative_prompt_used": params.negative_prompt is not None,
            **({"resize_policy": "center_crop"} if i2i else {}),
        })
        for image, seed in zip(images, params.seeds, strict=True)
    ]
    metadata: dict[str, Any] = {
        "pipeline": pipeline, "seeds": params.seeds, "seed_was_random": params.seed_was_random,
        "exact_copy_mode": params.exact_copy, "resolution": f"{params.width}x{params.height}",
    }
    if params.steps_raised and i2i:
        metadata["steps_raised"] = {"reason": "int(steps * denoise_strength) < 1", "steps_run": 1}
    if fallback:
        metadata["fallback"] = fallback
    return Generated(list(outputs), metadata, shape=f"{params.width}x{params.height}x{params.num_images}")
