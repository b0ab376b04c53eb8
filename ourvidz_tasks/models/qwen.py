"""Qwen2.5 chat models: the instruct model and the base model.

Real weights and tiny ones go through the same :func:`_load_folder`
(``from_pretrained`` with ``local_files_only=True``): ``OURVIDZ_MODEL_SOURCE=tiny``
builds a small random-weight ``Qwen2ForCausalLM`` and a locally trained
byte-level BPE tokenizer once into ``OURVIDZ_TINY_CACHE`` (:func:`build_tiny`),
``local`` reads ``OURVIDZ_QWEN_INSTRUCT_MODEL`` / ``OURVIDZ_QWEN_BASE_MODEL``.

Prompt rendering (:func:`render_prompt`) is a pure function of the messages:
the instruct model uses its tokenizer's chat template, the base model a plain
ChatML completion text; neither adds a system prompt of its own.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast, get_args

from ..contract.errors import ConfigError, InvalidJob, ModelLoadError
from . import build_once, compute_dtype, module_bytes, release_memory

if TYPE_CHECKING:
    import torch
    from transformers import GenerationConfig, GenerationMixin, PreTrainedModel, PreTrainedTokenizerBase

    from ..contract.settings import Settings

QwenName = Literal["qwen_instruct", "qwen_base"]

_NAMES: tuple[str, ...] = get_args(QwenName)
_ENV = {"qwen_instruct": "OURVIDZ_QWEN_INSTRUCT_MODEL", "qwen_base": "OURVIDZ_QWEN_BASE_MODEL"}
_ROLES = ("system", "user", "assistant")

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

#: Qwen2.5's ChatML turns, without the default system prompt Qwen's own
#: template invents when the caller sends none (and without tool calls).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

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


@dataclass
class QwenModel:
    """A loaded Qwen model, its tokenizer, and where it lives."""

    name: QwenName
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    #: ``"tiny:/path"`` or ``"local:/path"``
    source: str

    def nbytes(self) -> int:
        """Bytes of the model's parameters and buffers (0 once unloaded)."""
        return module_bytes([self.model])

    def unload(self) -> int:
        """Drop the model and tokenizer and release memory; return the bytes freed."""
        freed = self.nbytes()
        self.model = None  # type: ignore[assignment]  # unloaded: nbytes() is 0, generate refuses
        self.tokenizer = None  # type: ignore[assignment]
        release_memory(self.device)
        return freed


@dataclass
class ChatOutput:
    """One chat completion."""

    response: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"]
    #: seconds spent in ``model.generate``
    generation_time: float


# -- tiny models ---------------------------------------------------------------


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

    if name not in _NAMES:
        raise ValueError(f"name: expected one of {', '.join(_NAMES)}, got {name!r}")
    instruct = name == "qwen_instruct"
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)

    tokenizer = _build_tokenizer(eos=IM_END if instruct else ENDOFTEXT)
    tokenizer.save_pretrained(dest)
    endoftext, im_end = _token_id(tokenizer, ENDOFTEXT), _token_id(tokenizer, IM_END)
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


def _build_tokenizer(eos: str) -> PreTrainedTokenizerBase:
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


def _token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    found = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(found, int) or found == tokenizer.unk_token_id:
        raise ValueError(f"token: {token!r} is not in the vocabulary")
    return found


# -- loading -------------------------------------------------------------------


def load_qwen(settings: Settings, name: QwenName, device: torch.device) -> QwenModel:
    """Load ``name`` on ``device`` from the tiny cache or the configured local folder.

    Raises :class:`ConfigError` when the local folder is unset or missing and
    :class:`ModelLoadError` when the folder (or the tiny build) cannot be loaded.
    """
    if name not in _NAMES:
        raise ValueError(f"name: expected one of {', '.join(_NAMES)}, got {name!r}")
    if settings.model_source == "tiny":
        try:
            folder = build_once(settings.tiny_cache / name, lambda d: build_tiny(d, name))
        except Exception as exc:
            raise ModelLoadError(f"{name}: could not build the tiny model: {type(exc).__name__}") from exc
        return _load_folder(folder, name, device, source=f"tiny:{folder}")
    env = _ENV[name]
    path = settings.qwen_instruct_model if name == "qwen_instruct" else settings.qwen_base_model
    if path is None:
        raise ConfigError(f"{env} is not set (needed with OURVIDZ_MODEL_SOURCE=local)")
    if not Path(path).is_dir():
        raise ConfigError(f"{env}: {path} is not a folder")
    return _load_folder(Path(path), name, device, source=f"local:{path}")


def _load_folder(folder: Path, name: QwenName, device: torch.device, *, source: str) -> QwenModel:
    """The one loading path of tiny and real checkpoints."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {
        "dtype": compute_dtype(device),
        "device_map": {"": device},  # weights go straight to the device
        "local_files_only": True,
    }
    if device.type == "cuda":
        kwargs["attn_implementation"] = "sdpa"
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        model.eval()
    except torch.OutOfMemoryError:
        raise  # the slot releases memory once this traceback is gone (faults.load_failure)
    except Exception as exc:
        raise ModelLoadError(f"{name}: could not load {folder}: {type(exc).__name__}: {_short(exc)}") from exc
    if name == "qwen_instruct" and not tokenizer.chat_template:
        raise ModelLoadError(f"{name}: {folder} has no chat template")
    model.generation_config = plain_generation_config(model.generation_config)
    return QwenModel(name=name, model=model, tokenizer=tokenizer, device=device, source=source)


def _short(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- prompting and generation --------------------------------------------------


def render_prompt(model: QwenModel, messages: list[dict[str, str]]) -> str:
    """The prompt text for ``messages``, ending where the assistant's reply begins.

    * instruct: ``tokenizer.apply_chat_template(..., chat_template=CHAT_TEMPLATE, add_generation_prompt=True)``.
    * base: the same ChatML turns, rendered here, plus ``<|im_start|>assistant\\n``.
      Qwen2.5 base checkpoints share the instruct vocabulary (ChatML tokens
      included) and continue ChatML well; the turn markers are single special
      tokens, so the roles stay unambiguous, unlike ``"role: content"`` lines,
      where a message's text could look like another turn. Generation for it
      also stops at ``<|im_end|>`` (see :func:`generate_chat`).

    Nothing is added that the caller did not send: the instruct model renders
    with :data:`CHAT_TEMPLATE`, not the checkpoint's own template, because
    Qwen2.5-Instruct's invents a system prompt when the caller sends none.
    """
    _check_messages(messages)
    if model.name == "qwen_instruct":
        rendered = model.tokenizer.apply_chat_template(
            messages, chat_template=CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True
        )
        if not isinstance(rendered, str):
            raise ModelLoadError(f"{model.name}: the chat template did not render text")
        return rendered
    turns = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return f"{turns}{IM_START}assistant\n"


def generate_chat(
    model: QwenModel,
    messages: list[dict[str, str]],
    *,
    max_tokens: int,
    temperature: float,
    top_p: float,
    seed: int | None = None,
) -> ChatOutput:
    """Reply to ``messages``: sample when ``temperature > 0``, greedy when 0.

    ``seed`` makes sampling reproducible (``torch.manual_seed`` semantics inside
    a forked RNG, so the process's global RNG is left as it was).
    ``finish_reason`` is ``"length"`` when ``max_tokens`` tokens were made and the
    last one is not an end token, else ``"stop"``. Only the new tokens are
    decoded, special tokens skipped.
    """
    import torch

    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise InvalidJob(f"max_tokens: must be an integer >= 1, got {max_tokens!r}", field="max_tokens")
    if not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise InvalidJob(f"temperature: must be >= 0, got {temperature!r}", field="temperature")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise InvalidJob(f"top_p: must be in (0, 1], got {top_p!r}", field="top_p")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise InvalidJob(f"seed: must be an integer, got {seed!r}", field="seed")
    if model.model is None or model.tokenizer is None:
        raise ModelLoadError(f"{model.name}: the model was unloaded")

    prompt = render_prompt(model, messages)
    encoded = model.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    input_ids = encoded["input_ids"].to(model.device)
    attention_mask = encoded["attention_mask"].to(model.device)
    stop_ids = _stop_ids(model)
    config = sampling_config(max_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p),
                             stop_ids=stop_ids, pad_id=_pad_id(model, stop_ids))

    devices = [model.device.index or 0] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=seed is not None), torch.inference_mode():
        if seed is not None:
            torch.manual_seed(seed)
        start = time.perf_counter()
        output = cast("GenerationMixin", model.model).generate(
            input_ids=input_ids, attention_mask=attention_mask, generation_config=config
        )
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        elapsed = time.perf_counter() - start

    sequence = output[0] if isinstance(output, torch.Tensor) else output.sequences[0]
    prompt_tokens = int(input_ids.shape[1])
    new_ids = sequence[prompt_tokens:].tolist()
    completion_tokens = len(new_ids)
    hit_limit = completion_tokens >= max_tokens and (not new_ids or new_ids[-1] not in stop_ids)
    response = model.tokenizer.decode(new_ids, skip_special_tokens=True)
    if not isinstance(response, str):
        raise TypeError("decode: expected text")
    return ChatOutput(
        response=response,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        finish_reason="length" if hit_limit else "stop",
        generation_time=elapsed,
    )


def plain_generation_config(loaded: GenerationConfig) -> GenerationConfig:
    """The checkpoint's generation config with only its token ids kept.

    Qwen2.5 ships sampling defaults (``top_k``, ``top_p``, ``temperature``,
    ``repetition_penalty``) that ``generate`` would merge into every call where
    a parameter is left unset; chat is pure inference on what the caller sends,
    so nothing but the bos/eos/pad ids survives loading.
    """
    from transformers import GenerationConfig

    return GenerationConfig(bos_token_id=loaded.bos_token_id, eos_token_id=loaded.eos_token_id,
                            pad_token_id=loaded.pad_token_id)


def sampling_config(*, max_tokens: int, temperature: float, top_p: float, stop_ids: list[int],
                    pad_id: int | None) -> GenerationConfig:
    """Every parameter that shapes the next token, set explicitly (README "Chat sampling").

    Greedy when ``temperature`` is 0, else plain sampling with ``temperature``
    and ``top_p``; no top-k, min-p, typical-p, repetition penalty or n-gram ban.
    """
    from transformers import GenerationConfig

    neutral: dict[str, Any] = {
        "max_new_tokens": max_tokens, "min_new_tokens": 0, "num_beams": 1, "repetition_penalty": 1.0,
        "no_repeat_ngram_size": 0, "eos_token_id": stop_ids, "pad_token_id": pad_id,
    }
    if temperature > 0:
        return GenerationConfig(do_sample=True, temperature=temperature, top_p=top_p, top_k=0, typical_p=1.0,
                                **neutral)
    return GenerationConfig(do_sample=False, **neutral)


def _check_messages(messages: list[dict[str, str]]) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidJob("messages: must be a non-empty list", field="messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidJob(f"messages[{index}]: must be an object", field="messages")
        role, content = message.get("role"), message.get("content")
        if role not in _ROLES:
            raise InvalidJob(f"messages[{index}].role: must be one of {', '.join(_ROLES)}", field="messages")
        if not isinstance(content, str):
            raise InvalidJob(f"messages[{index}].content: must be a string", field="messages")


def _stop_ids(model: QwenModel) -> list[int]:
    """End-of-reply token ids: the checkpoint's eos ids plus ``<|im_end|>`` (ChatML turn end)."""
    ids: list[int] = []
    configured = model.model.generation_config.eos_token_id
    if configured is None:
        configured = model.tokenizer.eos_token_id
    candidates = configured if isinstance(configured, list) else [configured]
    im_end = model.tokenizer.convert_tokens_to_ids(IM_END)  # absent: None (or unk)
    for token in [*candidates, im_end]:
        if isinstance(token, int) and token >= 0 and token != model.tokenizer.unk_token_id and token not in ids:
            ids.append(token)
    return ids


def _pad_id(model: QwenModel, stop_ids: list[int]) -> int | None:
    pad = model.model.generation_config.pad_token_id
    if pad is None:
        pad = model.tokenizer.pad_token_id
    if isinstance(pad, int):
        return pad
    return stop_ids[0] if stop_ids else None
