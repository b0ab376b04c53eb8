"""Encoding of outputs: PNG images, H.264 mp4 videos, 256 px WEBP thumbnails.

Pure functions from pixels to bytes; nothing here touches the network.
"""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from PIL import Image

THUMB_EDGE = 256
THUMB_QUALITY = 85


@dataclass
class ImageOutput:
    """One generated image and its asset metadata."""

    image: Image.Image
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class VideoOutput:
    """One generated clip: uint8 frames (F, H, W, 3) and its asset metadata."""

    frames: np.ndarray
    fps: int
    metadata: dict[str, Any] = field(default_factory=dict)


Output = ImageOutput | VideoOutput


@dataclass
class EncodedAsset:
    """The main file of one output, ready for storage, with its asset metadata."""

    kind: Literal["image", "video"]
    name: str
    data: bytes
    content_type: str
    metadata: dict[str, Any]


def encode_png(image: Image.Image, compress_level: int = 1) -> bytes:
    """PNG bytes; level 1 is several times faster than PIL's 6 for a few % more bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def thumbnail_size(width: int, height: int, edge: int = THUMB_EDGE) -> tuple[int, int]:
    """Longest edge ``min(edge, longest)``, aspect kept, never upscaled."""
    longest = max(width, height)
    if longest <= edge:
        return width, height
    scale = edge / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


def thumbnail_webp(image: Image.Image, edge: int = THUMB_EDGE, quality: int = THUMB_QUALITY) -> bytes:
    """A WEBP thumbnail whose longest edge is ``min(edge, the image's)``."""
    size = thumbnail_size(image.width, image.height, edge)
    thumb = image.convert("RGB")
    if size != (image.width, image.height):
        thumb = thumb.resize(size, Image.Resampling.LANCZOS, reducing_gap=2.0)
    buffer = io.BytesIO()
    thumb.save(buffer, format="WEBP", quality=quality, method=4)
    return buffer.getvalue()


def encode_mp4(frames: np.ndarray, fps: int) -> bytes:
    """H.264 (yuv420p, faststart) mp4 bytes of uint8 frames (F, H, W, 3)."""
    import imageio_ffmpeg

    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"`frames` must be uint8 (F, H, W, 3); got {frames.dtype} {frames.shape}")
    _, height, width, _ = frames.shape
    if width % 2 or height % 2:
        raise ValueError(f"`frames` width and height must be even for yuv420p; got {width}x{height}")
    fd, path = tempfile.mkstemp(suffix=".mp4")
    os.close(fd)
    try:
        writer = imageio_ffmpeg.write_frames(
            path, (width, height), fps=fps, codec="libx264", pix_fmt_in="rgb24", pix_fmt_out="yuv420p",
            quality=None, bitrate=None, macro_block_size=1,
            output_params=["-crf", "18", "-preset", "veryfast", "-movflags", "+faststart"],
            ffmpeg_log_level="error",
        )
        writer.send(None)
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
        writer.close()
        with open(path, "rb") as handle:
            return handle.read()
    finally:
        os.unlink(path)


def encode_output(output: Output, index: int, png_level: int = 1) -> EncodedAsset:
    """The main file: ``{index}.png`` for an image, ``{index}.mp4`` for a video."""
    if isinstance(output, ImageOutput):
        data = encode_png(output.image, png_level)
        kind: Literal["image", "video"] = "image"
        name, content_type, fmt = f"{index}.png", "image/png", "png"
        width, height = output.image.width, output.image.height
    else:
        data = encode_mp4(output.frames, output.fps)
        kind, name, content_type, fmt = "video", f"{index}.mp4", "video/mp4", "mp4"
        _, height, width, _ = output.frames.shape
    metadata = {**output.metadata, "width": width, "height": height, "format": fmt, "file_size_bytes": len(data)}
    return EncodedAsset(kind, name, data, content_type, metadata)


def encode_thumbnail(output: Output) -> bytes:
    """The WEBP thumbnail of an image, or of a video's middle frame."""
    if isinstance(output, ImageOutput):
        return thumbnail_webp(output.image)
    return thumbnail_webp(Image.fromarray(output.frames[len(output.frames) // 2]))


PREVIEW_EDGE = 256
PREVIEW_QUALITY = 70


def preview_webp(pixels: np.ndarray, fps: int | None = None, edge: int = PREVIEW_EDGE) -> tuple[bytes, int, int]:
    """A live preview: ``(webp bytes, width, height)``, its longest edge at most ``edge``.

    ``pixels`` is one uint8 image (H, W, 3) or frames (F, H, W, 3), which make an
    animated WEBP at ``fps``. Fast settings (``method=0``): it is sent while the job runs.
    """
    frames = pixels[None] if pixels.ndim == 3 else pixels
    height, width = frames.shape[1:3]
    size = thumbnail_size(width, height, edge)
    images = [Image.fromarray(frame, "RGB") for frame in frames]
    if size != (width, height):
        images = [image.resize(size, Image.Resampling.BILINEAR) for image in images]
    buffer = io.BytesIO()
    if len(images) == 1:
        images[0].save(buffer, format="WEBP", quality=PREVIEW_QUALITY, method=0)
    else:
        images[0].save(buffer, format="WEBP", quality=PREVIEW_QUALITY, method=0, save_all=True,
                       append_images=images[1:], duration=round(1000 / (fps or 8)), loop=0)
    return buffer.getvalue(), size[0], size[1]
