"""The tiny WAN 2.1 VACE: a random-weight diffusers folder built offline (seed 0, seconds).

:func:`ourvidz_tasks.models.wan.load_wan` reads it through the same
``from_pretrained`` path as real weights (``OURVIDZ_MODEL_SOURCE=tiny``).
"""

from __future__ import annotations

import math
import string
from pathlib import Path
from typing import Any

from ..diffusion import quiet_progress

#: Words the tiny tokenizer knows whole; anything else is spelled out by characters.
_TINY_WORDS = """
a an the and or of in on at to from with by for into over under through near is are
cat dog bird fish horse man woman girl boy person people child face hand eye hair
car city street road house room forest tree flower grass sea ocean river lake beach
mountain sky cloud sun moon star night day morning evening rain snow fire water light
dark red blue green yellow white black gold silver pink purple orange brown
walking running flying dancing smiling looking sitting standing turning swimming
slow motion camera close up wide shot cinematic realistic portrait style video frame
beautiful bright soft warm cold high low quality detailed blurry static
"""


def tiny_tokenizer() -> Any:
    """A small T5-style Unigram tokenizer (pad 0, eos 1, unk 2), built without any download."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(char, -8.0) for char in string.ascii_letters + string.digits + string.punctuation]
    vocab += [("\u2581" + word, -4.0) for word in dict.fromkeys(_TINY_WORDS.split())]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def build_tiny(dest: Path) -> None:
    """Write a random-weight WAN 2.1 VACE diffusers folder to ``dest`` (seed 0, offline).

    Same classes and layout as ``Wan2.1-VACE-1.3B-diffusers``: UMT5 text encoder
    (d_model 32, 2 layers) with a local T5-style tokenizer, ``AutoencoderKLWan``
    (base_dim 4, 8x spatial / 4x temporal compression, z_dim 16),
    ``WanVACETransformer3DModel`` (2 layers, 2 heads x 16, VACE on layer 0,
    patch 1x2x2) and the flow-matching UniPC scheduler (flow_shift 3). Sizes
    must be multiples of 16 and clips 4k+1 frames, as with the real model.
    """
    import torch
    from diffusers import (
        AutoencoderKLWan,
        UniPCMultistepScheduler,
        WanVACEPipeline,
        WanVACETransformer3DModel,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tokenizer = tiny_tokenizer()
        vocab_size = 64 * math.ceil(len(tokenizer) / 64)
        config = UMT5Config(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
        text_encoder = UMT5EncoderModel(config).eval()
        vae = AutoencoderKLWan(
            base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
        )
        transformer = WanVACETransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=256, ffn_dim=64, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", vace_layers=[0], vace_in_channels=96,
        )
        scheduler = UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, num_train_timesteps=1000
        )
        pipe: Any = WanVACEPipeline(
            tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer
        )
        with quiet_progress():
            pipe.save_pretrained(str(dest), safe_serialization=True)

