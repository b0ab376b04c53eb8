"""``ourvidz.wan.generate``: Wan 2.1 text-to-video, image jobs and reference frames.

Section 6 of the contract decides the parameters (:func:`~ourvidz_tasks.contract.params.wan_params`).
``*_enhanced`` types that arrive without enhancement replace themselves with
``enhance → generate``. A reference that cannot be used falls back to plain
text-to-video with ``REFERENCE_FRAME_ERROR`` in the job metadata.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

from PIL import Image

from .celery import app
from .contract import names
from .contract.errors import InvalidJob, ReferenceFrameError, ReferenceUnavailable, UnsafeReference
from .contract.jobs import Job, parse_job
from .contract.params import WanParams, wan_params
from .models.previews import decode_video
from .models.wan import run_wan
from .runtime import signals  # noqa: F401  (a worker registers its signal handlers with its task module)
from .runtime.lifecycle import Generated, Progress
from .runtime.previews import live_previews
from .runtime.remedies import DiffusionRemedies, run_with_remedies, wan_ladder
from .runtime.runtime import Runtime, runtime
from .runtime.tasks import JobTask
from .services.media import ImageOutput, Output, VideoOutput

log = logging.getLogger(__name__)


@app.task(base=JobTask, bind=True, name=names.WAN_GENERATE)
def generate(self: JobTask, job: dict[str, Any]) -> dict[str, Any] | None:
    """Generate a clip or an image for a job; returns the callback body sent."""
    if _needs_enhancement(self, job):
        log.info("job %s: %s, enhancing first", job.get("id"), job.get("type"))
        # by name: a wan pool imports no chat code (the enhancement runs on a chat pool)
        raise self.replace(app.signature(names.CHAT_ENHANCE, args=(job,)) | generate.s())
    return self.execute(job, "wan", work)


def _needs_enhancement(task: JobTask, payload: Any) -> bool:
    try:
        job = parse_job(payload, runtime(task.app).settings, "wan")
    except InvalidJob:
        return False  # execute() reports it
    return job.the_type.endswith("_enhanced") and not job.is_enhanced


def work(rt: Runtime, job: Job, progress: Progress) -> Generated:
    params = wan_params(job, rt.settings)
    model = rt.model("wan", f"{params.width}x{params.height}x{params.frames}")  # reserved for this shape first
    references, fallback = _references(rt, params, model.conditions_on_frames)
    mode = params.reference_mode if fallback is None else "none"
    conditioning: dict[str, Any] = {}
    # previews: one frame per latent frame (4 of the clip's), shown at a quarter of its fps
    with live_previews(rt, job, progress, getattr(model, "preview", None), decode_video,
                       fps=max(1, params.fps // 4)) as on_latents:
        run = partial(
            run_wan, model, prompt=params.prompt, negative_prompt=params.negative_prompt, width=params.width,
            height=params.height, num_frames=params.frames, steps=params.steps,
            guidance_scale=params.guidance_scale, seed=params.seed, reference_mode=mode,
            reference=references.get("single"), first_frame=references.get("first"),
            last_frame=references.get("last"), on_step=progress, on_latents=on_latents, shift=params.shift,
            on_conditioning=conditioning.update,
        )
        remedies = DiffusionRemedies(model.pipe, model.device, rt.models["wan"].unload)  # OOM: step down
        frames, stepped = run_with_remedies(remedies, wan_ladder(remedies), lambda _remedy: run(), family="wan",
                                            stage=params.output, total=1, hooks=rt.attempt_hooks,
                                            what=f"job {params.job_id}")
    described: dict[str, Any] = {
        "seed": params.seed, "steps": params.steps, "guidance_scale": params.guidance_scale,
        "pipeline": "vace" if mode != "none" else "t2v", "reference_mode": mode, "sample_shift": params.shift,
    }
    output: Output
    if params.output == "image":
        output = ImageOutput(Image.fromarray(frames[0]), described)
    else:
        count = int(frames.shape[0])
        output = VideoOutput(frames, params.fps, {
            **described, "frames": count, "fps": params.fps, "duration": round(count / params.fps, 3),
        })
    metadata: dict[str, Any] = {
        "frame_num": int(frames.shape[0]), "frames_requested": params.frames_requested,
        "reference_mode": params.reference_mode, "seed": params.seed, "seed_was_random": params.seed_was_random,
        "resolution": f"{params.width}x{params.height}", "sample_shift": params.shift,
        "conditioning": conditioning,
    }
    if fallback:
        metadata["fallback"] = fallback
    if stepped:
        metadata["oom_step_down"] = stepped
    # a stepped-down run (tiling, offload) says nothing of the shape's working memory
    return Generated([output], metadata, shape=None if stepped else f"{params.width}x{params.height}x{params.frames}")


def _references(
    rt: Runtime, params: WanParams, conditions_on_frames: bool
) -> tuple[dict[str, Image.Image], dict[str, Any] | None]:
    """Fetch the reference frames; a fallback instead when any can't be used."""
    if not params.references:
        return {}, None
    images: dict[str, Image.Image] = {}
    for role, (field, url) in params.references.items():
        try:
            images[role] = rt.fetcher.fetch_image(url)
        except UnsafeReference as exc:
            raise InvalidJob(f"`{field}`: {exc}", field=field) from None
        except ReferenceUnavailable as exc:
            return {}, {"code": ReferenceFrameError.code, "reason": f"`{field}`: {exc}", "used": "t2v"}
    if not conditions_on_frames:
        reason = "the configured Wan checkpoint (text-to-video) cannot condition on frames"
        return {}, {"code": ReferenceFrameError.code, "reason": reason, "used": "t2v"}
    return images, None
