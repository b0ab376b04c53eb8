"""SDXL's diffusers weights as one state dict keyed like the original (ldm/sgm) single-file checkpoint.

The inverse of diffusers' single-file conversion
(``diffusers.loaders.single_file_utils``: ``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``,
``convert_open_clip_checkpoint``): what ``StableDiffusionXLPipeline.from_single_file``
reads back, weight for weight. ``bin/gpu-check``'s service section writes the
SDXL checkpoint this way (``OURVIDZ_SDXL_MODEL=...safetensors`` with its
config folder), at full size or tiny; the suite checks the keys and shapes of
the full-size model against diffusers' own conversion on the meta device.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

State = Mapping[str, "torch.Tensor"]

_RESNET = (
    ("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"),
)
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
}
_OPEN_CLIP = (
    ("text_model.encoder.layers.", "transformer.resblocks."), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
    ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"), ("self_attn.", "attn."),
)
#: the VAE's mid-block attention: diffusers' Linear names and the original 1x1 convolutions' names
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."


def original_layout(unet: State, unet_config: Mapping[str, Any], vae: State, vae_config: Mapping[str, Any],
                    text_encoder: State, text_encoder_2: State) -> dict[str, torch.Tensor]:
    """The four components' state dicts (diffusers keys) as one original-layout state dict."""
    import torch

    out: dict[str, torch.Tensor] = {}
    for key, value in unet.items():
        out["model.diffusion_model." + _unet_key(key, unet_config)] = value
    levels = len(vae_config["down_block_types"])
    for key, value in vae.items():
        new = _vae_key(key, levels)
        if ".mid.attn_1." in new and value.ndim == 2:  # Linear in diffusers, a 1x1 conv in the original
            value = value[:, :, None, None]
        out["first_stage_model." + new] = value
    for key, value in text_encoder.items():
        key = key if key.startswith("text_model.") else "text_model." + key
        out["conditioner.embedders.0.transformer." + key] = value
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    simple = {
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
    }
    for key, value in text_encoder_2.items():
        if key == "text_projection.weight":
            out[OPEN_CLIP_PREFIX + "text_projection"] = value.T.contiguous()
        elif key in simple:
            out[OPEN_CLIP_PREFIX + simple[key]] = value
        elif key.endswith(".position_ids"):
            continue  # a buffer the original file does not carry
        elif key.rsplit(".", 2)[1] in ("q_proj", "k_proj", "v_proj"):
            layer, proj, kind = key.rsplit(".", 2)
            qkv.setdefault(_open_clip(f"{layer}.in_proj_{kind}"), {})[proj[0]] = value
        else:
            out[OPEN_CLIP_PREFIX + _open_clip(key)] = value
    for key, parts in qkv.items():
        out[OPEN_CLIP_PREFIX + key] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def to_original_layout(folder: Path) -> dict[str, torch.Tensor]:
    """A diffusers SDXL folder's weights as one original-layout state dict."""
    import json

    from safetensors.torch import load_file

    def config(name: str) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads((folder / name / "config.json").read_text())
        return loaded

    return original_layout(
        load_file(folder / "unet" / "diffusion_pytorch_model.safetensors"), config("unet"),
        load_file(folder / "vae" / "diffusion_pytorch_model.safetensors"), config("vae"),
        load_file(folder / "text_encoder" / "model.safetensors"), load_file(folder / "text_encoder_2" / "model.safetensors"),
    )


def _open_clip(key: str) -> str:
    for old, new in _OPEN_CLIP:
        key = key.replace(old, new)
    return key


def _resnet(sub: str) -> str:
    for old, new in _RESNET:
        if sub.startswith(old + "."):
            return new + sub[len(old):]
    raise KeyError(sub)


def _unet_key(key: str, config: Mapping[str, Any]) -> str:
    per = config["layers_per_block"] + 1
    parts = key.split(".")
    head = ".".join(parts[:-1])
    if head in _UNET_TOP:
        return f"{_UNET_TOP[head]}.{parts[-1]}"
    if parts[0] == "mid_block":
        sub = ".".join(parts[3:])
        if parts[1] == "resnets":
            return f"middle_block.{2 * int(parts[2])}.{_resnet(sub)}"
        return f"middle_block.1.{sub}"
    block, what, j, sub = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
    if parts[0] == "down_blocks":
        if what == "resnets":
            return f"input_blocks.{per * block + j + 1}.0.{_resnet(sub)}"
        if what == "attentions":
            return f"input_blocks.{per * block + j + 1}.1.{sub}"
        return f"input_blocks.{per * (block + 1)}.0.op.{parts[-1]}"
    if what == "resnets":
        return f"output_blocks.{per * block + j}.0.{_resnet(sub)}"
    if what == "attentions":
        return f"output_blocks.{per * block + j}.1.{sub}"
    has_attention = config["up_block_types"][block].startswith("CrossAttn")
    return f"output_blocks.{per * block + per - 1}.{2 if has_attention else 1}.conv.{parts[-1]}"


def _vae_key(key: str, levels: int) -> str:
    key = key.replace("conv_norm_out", "norm_out")
    parts = key.split(".")
    if parts[1] not in ("down_blocks", "up_blocks", "mid_block"):
        return key
    side, what = parts[0], parts[1]
    if what == "mid_block":
        if parts[2] == "attentions":
            name = ".".join(parts[4:-1])
            return f"{side}.mid.attn_1.{_VAE_ATTENTION[name]}.{parts[-1]}"
        rest = ".".join(parts[4:]).replace("conv_shortcut", "nin_shortcut")
        return f"{side}.mid.block_{int(parts[3]) + 1}.{rest}"
    down = what == "down_blocks"
    level = int(parts[2]) if down else levels - 1 - int(parts[2])
    name = "down" if down else "up"
    if parts[3] == "resnets":
        rest = ".".join(parts[5:]).replace("conv_shortcut", "nin_shortcut")
        return f"{side}.{name}.{level}.block.{parts[4]}.{rest}"
    return f"{side}.{name}.{level}.{'downsample' if down else 'upsample'}.conv.{parts[-1]}"
