"""WAN's live-preview decoder: the decoder half of TAEHV, loading the published ``taew2_1`` weights.

diffusers has no class for TAEHV (github.com/madebyollin/taehv, Apache-2.0), so this
is a small module of ours with the published state-dict layout: ``decoder.{i}...``
keys of one ``nn.Sequential`` (clamp, conv, three stages of three memory blocks,
upsample, temporal grow, conv; then ReLU, conv). ``.pth`` and ``.safetensors`` files
load alike; the encoder's keys are ignored.

Previews decode without the temporal upsampling (one frame per latent frame, the
cheaper mode the weights allow: a temporal-grow layer keeps the last timestep's
output channels), so a clip of 21 latent frames previews as 21 frames.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from . import brief_error, build_once

if TYPE_CHECKING:
    import torch

    from ..contract.settings import Settings

log = logging.getLogger(__name__)

#: channels of the published decoder's stages; the tiny stand-in uses fewer
CHANNELS = (256, 128, 64, 64)
LATENT_CHANNELS = 16
#: the stage convs whose output widths give a file's channels
_STAGE_CONVS = (1, 8, 14, 20)


def video_decoder(channels: tuple[int, int, int, int] = CHANNELS, time_upscale: bool = False) -> torch.nn.Module:
    """TAEHV's decoder, random weights: latents ``(T, 16, h, w)`` of one clip to frames
    ``(T', 3, 8h, 8w)`` in about [0, 1]; ``T' = T`` without temporal upsampling, else ``4T - 3``."""
    module: torch.nn.Module = _network().TinyVideoDecoder(channels, time_upscale)
    return module


@functools.cache
def _network() -> SimpleNamespace:
    """The module classes, defined on first use: importing this file needs no torch."""
    import torch
    from torch import nn

    def conv(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
        return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)

    class Clamp(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(x / 3) * 3

    class MemBlock(nn.Module):
        """A residual block that also sees the previous frame's input (zeros before the first)."""

        def __init__(self, n_in: int, n_out: int) -> None:
            super().__init__()
            self.conv = nn.Sequential(conv(n_in * 2, n_out), nn.ReLU(), conv(n_out, n_out), nn.ReLU(),
                                      conv(n_out, n_out))
            self.skip: nn.Module = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
            self.act = nn.ReLU()

        def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
            return self.act(self.conv(torch.cat([x, past], 1)) + self.skip(x))

    class TGrow(nn.Module):
        """Each frame becomes ``stride`` frames (a 1x1 conv to ``stride`` times the channels)."""

        def __init__(self, channels: int, stride: int) -> None:
            super().__init__()
            self.stride = stride
            self.conv = nn.Conv2d(channels, channels * stride, 1, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            frames, channels, h, w = x.shape
            return self.conv(x).reshape(frames * self.stride, channels, h, w)

    class TinyVideoDecoder(nn.Module):
        def __init__(self, channels: tuple[int, int, int, int], time_upscale: bool) -> None:
            super().__init__()
            grow = 2 if time_upscale else 1
            layers: list[nn.Module] = [Clamp(), conv(LATENT_CHANNELS, channels[0]), nn.ReLU()]
            for stage, stride in enumerate((1, grow, grow)):
                n = channels[stage]
                layers += [MemBlock(n, n), MemBlock(n, n), MemBlock(n, n), nn.Upsample(scale_factor=2),
                           TGrow(n, stride), conv(n, channels[stage + 1], bias=False)]
            layers += [nn.ReLU(), conv(channels[3], 3)]
            self.decoder = nn.Sequential(*layers)
            self.frames_to_trim = grow * grow - 1

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for block in self.decoder:  # all frames at once: a memory block sees each frame's previous one
                x = block(x, torch.cat([torch.zeros_like(x[:1]), x[:-1]])) if isinstance(block, MemBlock) else block(x)
            return x[self.frames_to_trim:]

    return SimpleNamespace(TinyVideoDecoder=TinyVideoDecoder)


def _read(path: Path) -> dict[str, Any]:
    """A published TAEHV file's tensors (``.pth`` or ``.safetensors``)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path)))
    import torch

    return dict(torch.load(path, map_location="cpu", weights_only=True))


def load_preview(settings: Settings, device: torch.device, dtype: torch.dtype) -> torch.nn.Module | None:
    """WAN's preview decoder: ``OURVIDZ_WAN_PREVIEW_MODEL`` (a tiny model source builds a tiny one
    when it is unset); None: previews are off, with one warning, never a failed load."""
    if not settings.previews:
        return None
    path = settings.wan_preview_model
    if path is None and settings.model_source == "tiny":
        path = build_once(settings.tiny_cache / "taew2_1", build_tiny_video_decoder) / "taew2_1.safetensors"
    if path is None or not path.is_file():
        log.warning("WAN previews are off: %s", "no preview decoder configured" if path is None else f"no file {path}")
        return None
    try:
        return load_video_decoder(path, device, dtype)
    except Exception as exc:
        log.warning("WAN previews are off: decoder %r not loaded (%s)", path.name, brief_error(exc))
        return None


def load_video_decoder(path: Path, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The decoder of the published TAEHV file ``path`` (its widths read from the file), without
    temporal upsampling (a temporal-grow layer keeps the last timestep's channels), on ``device``."""
    state = {key: value for key, value in _read(path).items() if key.startswith("decoder.")}
    widths = [int(state[f"decoder.{i}.weight"].shape[0]) for i in _STAGE_CONVS]
    decoder = video_decoder((widths[0], widths[1], widths[2], widths[3]))
    own = decoder.state_dict()
    for key, value in state.items():
        if key in own and key.endswith(".conv.weight") and value.shape[0] > own[key].shape[0]:
            state[key] = value[-own[key].shape[0]:]
    decoder.load_state_dict(state)
    return decoder.to(device=device, dtype=dtype).eval()


def build_tiny_video_decoder(dest: Path) -> None:
    """A random-weight decoder in the published ``taew2_1`` layout (with temporal upsampling, as
    published), 8 channels per stage, as ``taew2_1.safetensors`` in ``dest``; seeded, offline."""
    import torch
    from safetensors.torch import save_file

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        decoder = video_decoder((8, 8, 8, 8), time_upscale=True)
    Path(dest).mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in decoder.state_dict().items()}, str(Path(dest) / "taew2_1.safetensors"))
