"""The tiny SDXL: a complete random-weight diffusers folder built offline.

It has the layout and classes of stable-diffusion-xl-base-1.0 and loads
through exactly the same ``from_pretrained`` call as a real local folder
(:func:`ourvidz_tasks.models.sdxl.load_sdxl` with ``OURVIDZ_MODEL_SOURCE=tiny``).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import CLIPTextConfig

_TEXT_HIDDEN = 32  # text_encoder (CLIP ViT-L stand-in)
_TEXT2_HIDDEN = 64  # text_encoder_2 (OpenCLIP bigG stand-in); must differ from _TEXT_HIDDEN
_TEXT2_PROJECTION = 32
_TIME_EMBED = 8  # UNet addition_time_embed_dim; SDXL adds 6 time ids
_MAX_TOKENS = 77
#: Words that get whole-word BPE merges in the tiny tokenizer (others split into bytes).
_TINY_WORDS = (
    "a an the of and in on with at photo portrait painting picture image cat dog man woman girl boy "
    "red blue green white black sky sea tree house city street light dark night day sun face hair "
    "eyes beautiful detailed high quality best worst low blurry ugly"
)
#: SDXL base's scheduler (``scheduler/scheduler_config.json`` of stable-diffusion-xl-base-1.0).
SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}


def build_tiny(dest: Path) -> None:
    """Write a complete random-weight SDXL diffusers folder into ``dest``.

    Same layout and classes as stable-diffusion-xl-base-1.0 (UNet with
    ``text_time`` added conditioning, 8x VAE with 4 latent channels, CLIP and
    CLIP-with-projection text encoders, CLIP BPE tokenizers, Euler scheduler)
    but tiny (about 1.5M parameters, 2 MB): three UNet levels with attention
    only at the lowest, no attention in the VAE.
    Weights come from ``torch.manual_seed(0)`` so every machine builds the same
    model; nothing is downloaded.
    """
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    write_tiny_tokenizer(dest / "tokenizer", pad_token="<|endoftext|>")
    write_tiny_tokenizer(dest / "tokenizer_2", pad_token="!")  # as SDXL's tokenizer_2
    tokenizer = CLIPTokenizer.from_pretrained(dest / "tokenizer", local_files_only=True)
    tokenizer_2 = CLIPTokenizer.from_pretrained(dest / "tokenizer_2", local_files_only=True)
    vocab_size = len(tokenizer)
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        # Attention only at 1/4 of the latent size (32x32 tokens for 1024x1024): on
        # 2 CPU cores a step costs ~0.05 s where (32, 64) with attention at 1/2 costs ~0.4 s.
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        transformer_layers_per_block=1,
        attention_head_dim=(2, 2, 4),
        norm_num_groups=8,
        cross_attention_dim=_TEXT_HIDDEN + _TEXT2_HIDDEN,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=_TIME_EMBED,
        projection_class_embeddings_input_dim=6 * _TIME_EMBED + _TEXT2_PROJECTION,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=1024,
        scaling_factor=0.13025,
        force_upcast=True,
        mid_block_add_attention=False,
    )
    text_encoder = CLIPTextModel(
        _clip_config(vocab_size, ids, hidden=_TEXT_HIDDEN, intermediate=64, heads=2, act="quick_gelu",
                     projection=_TEXT_HIDDEN)
    )
    text_encoder_2 = CLIPTextModelWithProjection(
        _clip_config(vocab_size, ids, hidden=_TEXT2_HIDDEN, intermediate=128, heads=4, act="gelu",
                     projection=_TEXT2_PROJECTION)
    )
    scheduler = EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG)
    pipe: Any = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.save_pretrained(dest, safe_serialization=True)


def _clip_config(vocab_size: int, ids: dict[str, Any], *, hidden: int, intermediate: int, heads: int, act: str,
                 projection: int) -> CLIPTextConfig:
    """A two-layer CLIP text encoder config over the tiny tokenizer's vocabulary."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
        num_attention_heads=heads, max_position_embeddings=_MAX_TOKENS, hidden_act=act, projection_dim=projection,
        **ids,
    )


def _byte_chars() -> list[str]:
    """GPT-2/CLIP's printable stand-in for each of the 256 bytes, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def write_tiny_tokenizer(folder: Path, *, pad_token: str) -> None:
    """A small CLIP BPE tokenizer: every byte, a few whole-word merges, CLIP's special tokens."""
    chars = _byte_chars()
    vocab: dict[str, int] = {}
    for token in chars + [c + "</w>" for c in chars]:
        vocab[token] = len(vocab)
    ranks: dict[tuple[str, str], int] = {}
    for word in _TINY_WORDS.split():
        # Tokenize with the merges so far (lowest rank first, as BPE does), then add
        # merges joining what is left, so each word ends as one token.
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            pairs = [(ranks.get(pair), i) for i, pair in enumerate(itertools.pairwise(pieces))]
            known = [(rank, i) for rank, i in pairs if rank is not None]
            if known:
                i = min(known)[1]
            else:
                i = 0
                ranks[(pieces[0], pieces[1])] = len(ranks)
                vocab.setdefault(pieces[0] + pieces[1], len(vocab))
            pieces[i : i + 2] = [pieces[i] + pieces[i + 1]]
    merges = [f"{a} {b}" for (a, b), _ in sorted(ranks.items(), key=lambda item: item[1])]
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": _MAX_TOKENS,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    specials = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2), encoding="utf-8")


def build_tiny_preview(dest: Path) -> None:
    """Write a random-weight ``AutoencoderTiny`` folder in the taesdxl layout (SDXL's preview decoder).

    The classes and file names of ``madebyollin/taesdxl`` (``config.json``,
    ``diffusion_pytorch_model.safetensors``), 4 latent channels, 8x upsampling,
    but 8 channels per block and one block per level; seeded, nothing downloaded.
    """
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    taesd: Any = AutoencoderTiny(  # diffusers' ModelMixin is untyped where it matters (save_pretrained)
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
        latent_channels=4,
    )
    taesd.save_pretrained(Path(dest), safe_serialization=True)
    # diffusers records a ``block_out_channels`` it then warns about on load; taesdxl's config has none
    config_file = Path(dest) / "config.json"
    config = json.loads(config_file.read_text())
    config.pop("block_out_channels", None)
    config_file.write_text(json.dumps(config, indent=2))
