"""The prompt policy and media encoding, decoded back with real decoders."""

from __future__ import annotations

import io
import subprocess
import tempfile

import cv2
import numpy as np
import pytest
from PIL import Image

from ourvidz_tasks.contract.errors import ConfigError, InvalidPrompt
from ourvidz_tasks.services import media
from ourvidz_tasks.services.policy import default_policy, load_policy


@pytest.mark.parametrize("prompt", [
    "a nude child", "explicit photo of a 12 year old", "LOLI art", "sexy schoolgirl, 15yo",
    "naked   TODDLER", "Ｎｕｄｅ ｃｈｉｌｄ",
])
def test_default_policy_refuses_sexual_content_involving_minors(prompt: str) -> None:
    with pytest.raises(InvalidPrompt) as info:
        default_policy(prompt)
    assert info.value.code == "INVALID_PROMPT" and not info.value.retryable
    assert prompt not in str(info.value)


@pytest.mark.parametrize("prompt", [
    "a child flying a kite on the beach", "nude figure study, marble statue", "a sexy red sports car",
    "portrait of a 30 year old woman", "", "kids birthday party with balloons",
])
def test_default_policy_allows_the_rest(prompt: str) -> None:
    default_policy(prompt)


def test_policy_is_pluggable() -> None:
    assert load_policy("ourvidz_tasks.services.policy:allow_all")("anything") is None
    with pytest.raises(ConfigError, match="OURVIDZ_PROMPT_POLICY"):
        load_policy("nowhere.module:nothing")


@pytest.mark.parametrize(("size", "thumb"), [((1024, 1024), (256, 256)), ((832, 1216), (175, 256)),
                                             ((1216, 832), (256, 175)), ((200, 100), (200, 100))])
def test_thumbnail_sizes(size: tuple[int, int], thumb: tuple[int, int]) -> None:
    data = media.thumbnail_webp(Image.new("RGB", size, "red"))
    decoded = Image.open(io.BytesIO(data))
    assert decoded.format == "WEBP" and decoded.size == thumb


def test_png_round_trip() -> None:
    pixels = np.random.default_rng(0).integers(0, 255, (64, 48, 3), dtype=np.uint8)
    decoded = Image.open(io.BytesIO(media.encode_png(Image.fromarray(pixels))))
    assert np.array_equal(np.asarray(decoded), pixels)


def test_mp4_is_h264_yuv420p_with_the_frame_count() -> None:
    frames = np.zeros((33, 64, 80, 3), dtype=np.uint8)
    frames[:, :, :, 0] = np.linspace(0, 255, 33, dtype=np.uint8)[:, None, None]
    data = media.encode_mp4(frames, 16)
    with tempfile.NamedTemporaryFile(suffix=".mp4") as handle:
        handle.write(data)
        handle.flush()
        cap = cv2.VideoCapture(handle.name)
        assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 33
        assert cap.get(cv2.CAP_PROP_FPS) == 16
        assert (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))) == (80, 64)
        fourcc = int(cap.get(cv2.CAP_PROP_FOURCC)).to_bytes(4, "little").decode()
        assert fourcc in ("avc1", "h264", "H264")
        read = 0
        while cap.read()[0]:
            read += 1
        assert read == 33
    assert data.find(b"moov") < data.find(b"mdat")  # faststart: the index comes first
    assert_yuv420p(data, frames=33, width=80, height=64)


def assert_yuv420p(data: bytes, *, frames: int, width: int, height: int) -> None:
    """Decoded by ffmpeg in the stream's own pixel format: 4:2:0 planes (a full-size Y, quarter-size U and V),
    and the colours of the red ramp (BT.601, limited range) in them."""
    import imageio_ffmpeg

    with tempfile.NamedTemporaryFile(suffix=".mp4") as handle:
        handle.write(data)
        handle.flush()
        reader = imageio_ffmpeg.read_frames(handle.name)
        meta = next(reader)
        reader.close()
        assert meta["codec"] == "h264" and meta["pix_fmt"].split("(")[0] == "yuv420p", meta
        # no -pix_fmt: ffmpeg writes each frame as decoded (yuv444p or rgb24 would be 2 or 3 bytes a pixel)
        raw = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", handle.name, "-f", "rawvideo", "-"],
                             capture_output=True, check=True, timeout=60).stdout
    luma, chroma = width * height, (width // 2) * (height // 2)
    assert len(raw) == frames * (luma + 2 * chroma)
    planes = np.frombuffer(raw, np.uint8).reshape(frames, luma + 2 * chroma).astype(int)
    y, u, v = planes[:, :luma], planes[:, luma:luma + chroma], planes[:, luma + chroma:]
    assert abs(y[0].mean() - 16) <= 2 and abs(u[0].mean() - 128) <= 2 and abs(v[0].mean() - 128) <= 2  # black
    assert abs(y[-1].mean() - 81) <= 3 and abs(u[-1].mean() - 90) <= 3 and abs(v[-1].mean() - 240) <= 3  # pure red


def test_mid_frame_thumbnail() -> None:
    frames = np.zeros((9, 32, 32, 3), dtype=np.uint8)
    frames[4] = 200
    output = media.VideoOutput(frames, 8, {})
    asset = media.encode_output(output, 0)
    thumb = np.asarray(Image.open(io.BytesIO(media.encode_thumbnail(output))))
    assert thumb.mean() > 150
    assert asset.metadata["width"] == 32 and asset.kind == "video" and asset.name == "0.mp4"
