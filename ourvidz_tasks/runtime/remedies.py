"""Out-of-memory remedies of each family: the rungs :func:`~ourvidz_tasks.runtime.faults.step_down` climbs.

* **SDXL** (txt2img and img2img): the batch whole, then halves, then one
  image at a time (each image keeps its own seed, so the pictures do not
  change); then VAE tiling (512 px tiles, so 1024² really tiles) and
  slicing; then model CPU offload.
* **WAN**: VAE tiling; then the text encoder moved off the GPU once the
  prompt is encoded; then model CPU offload.
* **Chat**: a request longer than the model's window is refused up front by
  the engine (``INVALID_JOB`` naming ``max_tokens`` or ``messages``, never
  truncated); an OOM is retried once after cleanup
  (:func:`~ourvidz_tasks.runtime.faults.retry_once`, in the chat tasks).

A remedy stays on for the later rungs and is undone by ``restore`` after
the job: tiling is switched off; after CPU offload the model is unloaded
(accelerate's hooks stay on the modules), so the next job loads it clean.
On CPU every rung runs the same code (offload from CPU to CPU changes
nothing), so the CPU tests reach each of them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from ..models import release_memory
from .faults import AttemptHook, Remedy, is_oom, step_down

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

T = TypeVar("T")

#: SDXL's VAE tile (px) on the tiling rung: 1024² decodes as 3 x 3 overlapping 512² tiles
TILE_PX = 512


def batch_sizes(count: int) -> list[int]:
    """The batch rungs of ``count`` images: whole, halves, ones (6 -> 6, 3, 1; 3 -> 3, 2, 1; 1 -> 1)."""
    return sorted({count, -(-count // 2), 1}, reverse=True)


def tile_vae(vae: Any) -> tuple[Any, Any] | None:
    """Tiling and slicing on; an ``AutoencoderKL``'s tiles made :data:`TILE_PX` (returns its own, to restore)."""
    vae.enable_tiling()
    if hasattr(vae, "enable_slicing"):
        vae.enable_slicing()
    if not (hasattr(vae, "tile_sample_min_size") and hasattr(vae, "tile_latent_min_size")):
        return None
    saved = (vae.tile_sample_min_size, vae.tile_latent_min_size)
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    vae.tile_sample_min_size, vae.tile_latent_min_size = TILE_PX, TILE_PX // scale
    return saved


def untile_vae(vae: Any, saved: tuple[Any, Any] | None) -> None:
    """Undo :func:`tile_vae`."""
    vae.disable_tiling()
    if hasattr(vae, "disable_slicing"):
        vae.disable_slicing()
    if saved is not None:
        vae.tile_sample_min_size, vae.tile_latent_min_size = saved


class DiffusionRemedies:
    """The remedies applied to one diffusers pipeline during one job, and their undoing.

    ``pipe`` is the pipeline whose modules run (SDXL's two pipelines share
    them); ``unload`` drops the model when offload hooks were installed.
    """

    def __init__(self, pipe: Any, device: torch.device, unload: Callable[[], object]) -> None:
        self.pipe, self.device, self._unload = pipe, device, unload
        self.tiled = self.encoder_moved = self.offloaded = False
        self._encode: Any = None
        self._tiles: tuple[Any, Any] | None = None

    # -- the rungs ------------------------------------------------------------------
    def vae_tiling(self) -> None:
        """Decode (and encode) tile by tile, one image at a time.

        SDXL's ``AutoencoderKL`` starts tiling only above its config's ``sample_size`` (1024 px), so
        at 1024² tiling would change nothing: its tiles are made :data:`TILE_PX` here (latent tiles
        of ``TILE_PX / 8``), overlapping by a quarter and blended as diffusers does. Wan's VAE tiles
        at 256 px already.
        """
        self._tiles = tile_vae(self.pipe.vae)
        self.tiled = True

    def text_encoder_offload(self) -> None:
        """Wrap ``encode_prompt``: the text encoder encodes on the device, then moves to the CPU
        for the rest of the run (the denoiser and the VAE get its memory)."""
        pipe, device = self.pipe, self.device
        original = pipe.encode_prompt

        def encode_then_offload(*args: Any, **kwargs: Any) -> Any:
            pipe.text_encoder.to(device)
            try:
                return original(*args, **kwargs)
            finally:
                pipe.text_encoder.to("cpu")
                release_memory(device)

        self._encode = original
        pipe.encode_prompt = encode_then_offload  # an instance attribute: the pipeline calls self.encode_prompt
        self.encoder_moved = True

    def cpu_offload(self) -> None:
        self._restore_encoder(move=False)  # offload places every module itself
        self.pipe.enable_model_cpu_offload(device=self.device)
        self.offloaded = True

    # -- undoing --------------------------------------------------------------------
    def _restore_encoder(self, *, move: bool = True) -> None:
        if self._encode is not None:
            del self.pipe.encode_prompt  # the class's method again
            self._encode = None
            if move:
                self.pipe.text_encoder.to(self.device)

    def restore(self) -> None:
        """Put the model back as it was before the job (unloaded, after CPU offload).

        If the text encoder does not fit back on the device, the model is
        unloaded too: the next job loads it clean rather than half on the CPU.
        """
        if not self.offloaded:
            try:
                self._restore_encoder()
            except Exception as exc:
                if not is_oom(exc):
                    raise
                self.offloaded = True
        if self.offloaded:
            log.info("a remedy left the model off the device: it is unloaded and loads clean for the next job")
            self._unload()
            return
        if self.tiled:
            untile_vae(self.pipe.vae, self._tiles)
            self._tiles = None


def run_with_remedies(remedies: DiffusionRemedies, ladder: list[Remedy], run: Callable[[Remedy], T], *,
                      family: str, stage: str, total: int, hooks: Sequence[AttemptHook],
                      what: str) -> tuple[T, dict[str, Any] | None]:
    """:func:`~ourvidz_tasks.runtime.faults.step_down` over ``ladder``, then ``remedies.restore()`` whatever happened.

    Returns the value and ``metadata.oom_step_down`` (None when the first rung worked).
    """
    try:
        value, outcome = step_down(ladder, run, family=family, stage=stage, total=total,
                                   device=remedies.device, hooks=hooks, what=what)
    finally:
        remedies.restore()
    return value, outcome.metadata()


def sdxl_ladder(remedies: DiffusionRemedies, count: int) -> list[Remedy]:
    """SDXL: batches (same seeds), then one image with VAE tiling+slicing, then with CPU offload."""
    ladder = [Remedy("batch", size) for size in batch_sizes(count)]
    ladder.append(Remedy("vae_tiling", 1, remedies.vae_tiling))
    ladder.append(Remedy("cpu_offload", 1, remedies.cpu_offload))
    return ladder


def wan_ladder(remedies: DiffusionRemedies) -> list[Remedy]:
    """WAN: as is, then VAE tiling, then the text encoder off the GPU after encoding, then CPU offload."""
    return [
        Remedy("full"),
        Remedy("vae_tiling", 0, remedies.vae_tiling),
        Remedy("text_encoder_offload", 0, remedies.text_encoder_offload),
        Remedy("cpu_offload", 0, remedies.cpu_offload),
    ]
