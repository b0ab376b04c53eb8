"""``ourvidz.sdxl.generate``: SDXL text-to-image and image-to-image.

Section 6 of the contract decides the parameters (:func:`~ourvidz_tasks.contract.params.sdxl_params`);
this module fetches the reference, picks the pipeline, applies the fallbacks
and describes each image. The lifecycle around it is :func:`~ourvidz_tasks.runtime.lifecycle.run_job`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Any

from PIL import Image

from .celery import app
from .contract import names
from .contract.errors import I2IPipelineError, InvalidJob, ReferenceUnavailable, UnsafeReference
from .contract.jobs import Job
from .contract.params import SdxlParams, sdxl_params
from .models.previews import decode_image
from .models.sdxl import run_sdxl
from .runtime import signals  # noqa: F401  (a worker registers its signal handlers with its task module)
from .runtime.faults import Remedy, exit_on_device_fault
from .runtime.lifecycle import Generated, Progress, as_job_error
from .runtime.previews import live_previews
from .runtime.remedies import DiffusionRemedies, run_with_remedies, sdxl_ladder
from .runtime.runtime import Runtime
from .runtime.tasks import JobTask
from .services.media import ImageOutput

log = logging.getLogger(__name__)


@app.task(base=JobTask, bind=True, name=names.SDXL_GENERATE)
def generate(self: JobTask, job: dict[str, Any]) -> dict[str, Any]:
    """Generate 1, 3 or 6 images for a job; returns the callback body sent."""
    return self.execute(job, "sdxl", work)


def work(rt: Runtime, job: Job, progress: Progress) -> Generated:
    params = sdxl_params(job, rt.settings)
    reference, fallback = _reference(rt, params)  # before the model: a job that must fail fails first
    shape = f"{params.width}x{params.height}x{params.num_images}"
    model = rt.model("sdxl", shape)  # the reservation grown to this job's shape before any model call
    with live_previews(rt, job, progress, getattr(model, "preview", None), decode_image) as on_latents:
        return _generate(rt, model, params, reference, fallback, partial(
            run_sdxl, model, prompt=params.prompt, negative_prompt=params.negative_prompt, width=params.width,
            height=params.height, steps=params.steps, guidance_scale=params.guidance_scale,
            on_step=progress, on_latents=on_latents, compel=params.compel, compel_weights=params.compel_weights,
        ))


def _generate(rt: Runtime, model: Any, params: SdxlParams, reference: Image.Image | None,
              fallback: dict[str, Any] | None, pipe: Callable[..., list[Image.Image]]) -> Generated:
    """img2img (falling back to txt2img where the job allows it) or txt2img, stepping down on OOM."""
    pipeline = "img2img" if reference is not None else "txt2img"
    images: list[Image.Image] | None = None
    stepped: dict[str, Any] | None = None
    if reference is not None:
        i2i = partial(pipe, image=reference, strength=params.denoise_strength)
        try:
            images, stepped = _stepping_down(rt, model, i2i, params.seeds, "img2img", params.job_id)
        except Exception as exc:
            exit_on_device_fault(exc, f"job {params.job_id}")  # a device fault ends the process here
            error = as_job_error(exc)
            if error is not None and not isinstance(error, I2IPipelineError):
                raise  # out of memory after every remedy, cancelled, timed out: not a reason to fall back
            if params.exact_copy:
                raise I2IPipelineError(f"img2img failed: {type(exc).__name__}") from exc
            log.warning("job %s: img2img failed (%s), falling back to txt2img", params.job_id, type(exc).__name__)
            fallback = {"code": I2IPipelineError.code, "reason": f"img2img failed: {type(exc).__name__}", "used": "txt2img"}
            pipeline = "txt2img"
    if images is None:
        images, stepped = _stepping_down(rt, model, pipe, params.seeds, "txt2img", params.job_id)
    generated = _describe(params, images, pipeline, fallback)
    if stepped:
        generated.metadata["oom_step_down"] = stepped
        ran_batch = stepped["remedy"] == "batch"
        generated.shape = f"{params.width}x{params.height}x{stepped['batch']}" if ran_batch else None
    return generated


def _stepping_down(rt: Runtime, model: Any, pipe: Callable[..., list[Image.Image]], seeds: list[int],
                   stage: str, job_id: str) -> tuple[list[Image.Image], dict[str, Any] | None]:
    """Run the batch through SDXL's remedies (:func:`~ourvidz_tasks.runtime.remedies.sdxl_ladder`).

    6 images run whole, then as 3+3, then one by one, then one by one with
    VAE tiling and slicing, then with model CPU offload (after which the
    model is unloaded, so the next job starts clean). The images are those
    of an un-stepped run: each image has its own generator.
    """
    remedies = DiffusionRemedies(model.i2i if stage == "img2img" else model.t2i, model.device,
                                 rt.models["sdxl"].unload)

    def run(remedy: Remedy) -> list[Image.Image]:
        size = remedy.batch or len(seeds)
        images: list[Image.Image] = []
        for start in range(0, len(seeds), size):
            images += pipe(seeds=seeds[start:start + size])
        return images

    return run_with_remedies(remedies, sdxl_ladder(remedies, len(seeds)), run, family="sdxl", stage=stage,
                             total=len(seeds), hooks=rt.attempt_hooks, what=f"job {job_id}")


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
    return None, {"code": I2IPipelineError.code, "reason": reason, "used": "txt2img"}


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
