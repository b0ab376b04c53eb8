"""The tiny Qwen2 chat models: random weights and a locally trained byte-level BPE tokenizer, built offline.

:func:`ourvidz_tasks.models.qwen.load_qwen` reads them through the same
``from_pretrained`` path as real weights (``OURVIDZ_MODEL_SOURCE=tiny``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..chat_common import CHAT_TEMPLATE, ENDOFTEXT, IM_END, IM_START, QWEN_NAMES, QwenName

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

#: Qwen2's pre-tokenizer split (same as the real tokenizer's).
_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

#: The text the tiny tokenizer's merges are learned from (any text still
#: tokenizes: every byte is in the base alphabet).
_TRAINING_TEXT = """\
You are a helpful assistant. The user asks a question and the assistant answers it.
Write a detailed prompt for an image of a woman standing on a beach at sunset, golden hour,
soft light, cinematic, high detail, photorealistic, 35mm film, shallow depth of field.
A man walks through a busy city street at night, neon lights, rain, reflections on the road.
Describe the scene: the camera slowly pans to the left while the wind moves the trees.
A portrait of a young person with long hair, smiling, looking at the camera, studio lighting.
The quick brown fox jumps over the lazy dog. The dog sleeps in the warm sun by the house.
Enhance this prompt for a video: two people dancing in a room, warm colors, slow motion.
Please make the description more vivid and add details about lighting, color and mood.
The assistant replies with one paragraph and does not repeat the question.
A mountain landscape with snow, a lake, a forest and clouds in a blue sky, wide angle shot.
Close-up of a face, natural skin texture, freckles, green eyes, morning light from a window.
What is the weather like today? It is sunny and warm, with a light breeze from the sea.
Thank you! You're welcome. Let me know if there is anything else I can help you with.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 24 30 60 100 512 768 1024 2025.
Punctuation: commas, periods. Questions? Exclamations! Quotes "like this" and 'this'.
system user assistant message content role prompt response image video style quality
"""


def build_tiny(dest: Path, name: QwenName) -> None:
    """Write a tiny random-weight Qwen2 checkpoint folder for ``name`` into ``dest``.

    The folder holds ``config.json``, ``model.safetensors``,
    ``generation_config.json`` and the tokenizer files, loadable with
    ``AutoModelForCausalLM`` / ``AutoTokenizer`` and ``local_files_only=True``.
    Weights come from ``torch.manual_seed(0)`` (instruct) or ``1`` (base) and the
    tokenizer is trained on a built-in text, so every machine builds the same model.
    The eos token is ``<|im_end|>`` for instruct, ``<|endoftext|>`` for base.
    """
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    if name not in QWEN_NAMES:
        raise ValueError(f"name: expected one of {', '.join(QWEN_NAMES)}, got {name!r}")
    instruct = name == "qwen_instruct"
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer(eos=IM_END if instruct else ENDOFTEXT)
    tokenizer.save_pretrained(dest)
    endoftext, im_end = token_id(tokenizer, ENDOFTEXT), token_id(tokenizer, IM_END)
    # Qwen2.5-Instruct stops on both <|im_end|> and <|endoftext|>; the base on <|endoftext|>.
    eos_ids: int | list[int] = [im_end, endoftext] if instruct else endoftext

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=True,
        bos_token_id=endoftext,
        eos_token_id=im_end if instruct else endoftext,
        pad_token_id=endoftext,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0 if instruct else 1)
        model = Qwen2ForCausalLM(config).eval()
    model.save_pretrained(dest, safe_serialization=True)
    GenerationConfig(bos_token_id=endoftext, eos_token_id=eos_ids, pad_token_id=endoftext).save_pretrained(dest)


def build_tokenizer(eos: str) -> PreTrainedTokenizerBase:
    """Train a small byte-level BPE (Qwen2's pre-tokenizer) and wrap it as ``Qwen2Tokenizer``."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()  # type: ignore[assignment]  # tokenizers' stubs lack setters
    bpe.pre_tokenizer = pre_tokenizers.Sequence(  # type: ignore[assignment]
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()  # type: ignore[assignment]
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([_TRAINING_TEXT], trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = dict(state["vocab"])
    # The special tokens follow the learned ones, in Qwen's order.
    for token in (ENDOFTEXT, IM_START, IM_END):
        vocab[token] = len(vocab)
    options: dict[str, Any] = {
        "vocab": vocab,
        "merges": [tuple(pair) for pair in state["merges"]],  # the BPE model wants pairs
        "unk_token": None,  # byte-level: nothing is unknown
        "eos_token": eos,
        "pad_token": ENDOFTEXT,
        "extra_special_tokens": [IM_START, IM_END],
        "model_max_length": 32768,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
    }
    tokenizer = Qwen2Tokenizer(**options)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    found = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(found, int) or found == tokenizer.unk_token_id:
        raise ValueError(f"token: {token!r} is not in the vocabulary")
    return found
