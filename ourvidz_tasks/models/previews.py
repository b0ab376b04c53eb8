"""Live previews: tiny decoders that turn a running job's latents into small pictures.

SDXL's is TAESD (diffusers' ``AutoencoderTiny``, the ``taesdxl`` folder layout), of
which only the decoder is kept; WAN's is TAEHV's decoder (:mod:`.taehv`, the ``taew2_1``
weights), decoded without temporal upsampling into a short animated preview. :func:`load_decoder` loads one like every model
(a local folder, or the tiny random-weight one built offline); a missing or broken
one turns previews off with one warning and never fails a load. :func:`latents_hook`
is what a pipeline's step callback calls with the current latents: when the job's
:class:`~ourvidz_tasks.services.previews.PreviewStream` says a preview is due, it
decodes the first image of the batch and hands the pixels over; the stream encodes,
uploads and announces it off the denoising thread. Whatever the decode raises is
logged (job id only) and ends the job's previews, never the job; it reads the
latents and changes nothing, so the outputs are the same with previews on and off.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from . import brief_error

if TYPE_CHECKING:
    import numpy as np
    import torch

log = logging.getLogger(__name__)

#: decode at most this many pixels on the long side (latents are scaled down first): the preview's
#: own edge, so the decode is as small as the picture (a quarter of the work of decoding at twice it)
DECODE_EDGE = 256

#: ``hook(step, total, latents)``, called by a pipeline's step callback after each step
LatentsHook = Callable[[int, int, "torch.Tensor"], None]


class Stream(Protocol):
    """What :func:`latents_hook` needs of :class:`~ourvidz_tasks.services.previews.PreviewStream`."""

    job_id: str

    def due(self, step: int, total: int) -> bool: ...
    def offer(self, step: int, total: int, pixels: np.ndarray, fps: int | None = None) -> None: ...
    def stop(self) -> None: ...


def load_decoder(folder: Path | None, device: torch.device, dtype: torch.dtype, what: str) -> torch.nn.Module | None:
    """The decoder of the ``AutoencoderTiny`` folder ``folder`` on ``device``, or None (one warning)."""
    if folder is None:
        log.warning("%s previews are off: no preview decoder configured", what)
        return None
    if not (folder / "config.json").is_file():
        log.warning("%s previews are off: no AutoencoderTiny folder at %s", what, folder)
        return None
    try:
        from diffusers import AutoencoderTiny

        taesd: Any = AutoencoderTiny.from_pretrained(folder, local_files_only=True)
        decoder: torch.nn.Module = taesd.decoder
        decoder.to(device=device, dtype=dtype).eval()
    except Exception as exc:  # previews are optional: a missing file is a warning, never a failed load
        log.warning("%s previews are off: decoder %r not loaded (%s)", what, folder.name, brief_error(exc))
        return None
    return decoder


def decode_image(decoder: torch.nn.Module, latents: torch.Tensor, edge: int = DECODE_EDGE) -> np.ndarray:
    """The first latent image of a batch, ``(B, C, h, w)``, as uint8 pixels ``(H, W, 3)``.

    Latents are scaled down (area) first so the long side decodes to at most ``edge`` pixels.
    """
    import torch
    import torch.nn.functional as F

    param = next(decoder.parameters())
    with torch.inference_mode():
        x = latents[:1].to(device=param.device, dtype=param.dtype)
        h, w = x.shape[-2:]
        longest = edge // 8
        if max(h, w) > longest:
            size = (max(1, round(h * longest / max(h, w))), max(1, round(w * longest / max(h, w))))
            x = F.interpolate(x, size=size, mode="area")
        image = decoder(x)  # [-1, 1]
        pixels = ((image[0].float() + 1) * 127.5).clamp(0, 255).round().to(torch.uint8)
        return pixels.permute(1, 2, 0).cpu().numpy()


def decode_video(decoder: torch.nn.Module, latents: torch.Tensor, edge: int = DECODE_EDGE) -> np.ndarray:
    """The first clip of WAN latents ``(B, 16, T, h, w)`` as uint8 frames ``(T, H, W, 3)``
    (:class:`~ourvidz_tasks.models.taehv.TinyVideoDecoder`: one frame per latent frame, about [0, 1]).

    Latents are scaled down (area) first so the long side decodes to at most ``edge`` pixels.
    """
    import torch
    import torch.nn.functional as F

    param = next(decoder.parameters())
    with torch.inference_mode():
        x = latents[0].permute(1, 0, 2, 3).to(device=param.device, dtype=param.dtype)  # (T, 16, h, w)
        h, w = x.shape[-2:]
        longest = edge // 8
        if max(h, w) > longest:
            size = (max(1, round(h * longest / max(h, w))), max(1, round(w * longest / max(h, w))))
            x = F.interpolate(x, size=size, mode="area")
        frames = decoder(x)
        pixels = (frames.float() * 255).clamp(0, 255).round().to(torch.uint8)
        return pixels.permute(0, 2, 3, 1).cpu().numpy()


def latents_hook(stream: Stream, decode: Callable[[torch.Tensor], np.ndarray], fps: int | None = None) -> LatentsHook:
    """The step callback's latents hook: decode when a preview is due and offer it to ``stream``."""

    def hook(step: int, total: int, latents: torch.Tensor) -> None:
        if not stream.due(step, total):
            return
        try:
            pixels = decode(latents)
        except Exception as exc:  # a preview never fails the job: the job's previews end here
            log.warning("job %s: preview decode failed, previews off for this job (%s)", stream.job_id,
                        type(exc).__name__)
            stream.stop()
            return
        stream.offer(step, total, pixels, fps)

    return hook
