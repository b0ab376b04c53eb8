"""Qwen2.5 chat models: the instruct model and the base model.

Real weights and tiny ones go through the same :func:`_load_folder`
(``from_pretrained`` with ``local_files_only=True``): ``OURVIDZ_MODEL_SOURCE=tiny``
builds a small random-weight ``Qwen2ForCausalLM`` and a locally trained
byte-level BPE tokenizer once into ``OURVIDZ_TINY_CACHE``
(:func:`~ourvidz_tasks.models.tiny.qwen.build_tiny`), ``local`` reads
``OURVIDZ_QWEN_INSTRUCT_MODEL`` / ``OURVIDZ_QWEN_BASE_MODEL``.

Prompt rendering (:func:`render_prompt`) is a pure function of the messages:
the instruct model uses its tokenizer's chat template, the base model a plain
ChatML completion text; neither adds a system prompt of its own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from ..contract.errors import ConfigError, ModelLoadError
from . import brief_error, build_once, compute_dtype, module_bytes, release_memory
from .chat_common import (
    CHAT_TEMPLATE,
    IM_END,
    QWEN_NAMES,
    ChatOutput,
    QwenName,
    Sampling,
    chatml,
    check_messages,
    check_sampling,
)
from .tiny.qwen import build_tiny

if TYPE_CHECKING:
    import torch
    from transformers import GenerationConfig, GenerationMixin, PreTrainedModel, PreTrainedTokenizerBase

    from ..contract.settings import Settings

_ENV = {"qwen_instruct": "OURVIDZ_QWEN_INSTRUCT_MODEL", "qwen_base": "OURVIDZ_QWEN_BASE_MODEL"}


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


# -- loading -------------------------------------------------------------------


def load_qwen(settings: Settings, name: QwenName, device: torch.device) -> QwenModel:
    """Load ``name`` on ``device`` from the tiny cache or the configured local folder.

    Raises :class:`ConfigError` when the local folder is unset or missing and
    :class:`ModelLoadError` when the folder (or the tiny build) cannot be loaded.
    """
    if name not in QWEN_NAMES:
        raise ValueError(f"name: expected one of {', '.join(QWEN_NAMES)}, got {name!r}")
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
        raise ModelLoadError(f"{name}: could not load {folder}: {brief_error(exc)}") from exc
    if name == "qwen_instruct" and not tokenizer.chat_template:
        raise ModelLoadError(f"{name}: {folder} has no chat template")
    model.generation_config = plain_generation_config(model.generation_config)
    return QwenModel(name=name, model=model, tokenizer=tokenizer, device=device, source=source)


# -- prompting and generation --------------------------------------------------


def render_prompt(model: QwenModel, messages: list[dict[str, str]]) -> str:
    """The prompt text for ``messages``, ending where the assistant's reply begins.

    * instruct: ``tokenizer.apply_chat_template(..., chat_template=CHAT_TEMPLATE, add_generation_prompt=True)``.
    * base: the same ChatML turns (:func:`~ourvidz_tasks.models.chat_common.chatml`), plus ``<|im_start|>assistant\\n``.
      Qwen2.5 base checkpoints share the instruct vocabulary (ChatML tokens
      included) and continue ChatML well; the turn markers are single special
      tokens, so the roles stay unambiguous, unlike ``"role: content"`` lines,
      where a message's text could look like another turn. Generation for it
      also stops at ``<|im_end|>`` (see :func:`generate_chat`).

    Nothing is added that the caller did not send: the instruct model renders
    with :data:`CHAT_TEMPLATE`, not the checkpoint's own template, because
    Qwen2.5-Instruct's invents a system prompt when the caller sends none.
    """
    if model.name != "qwen_instruct":
        return chatml(messages)
    check_messages(messages)
    rendered = model.tokenizer.apply_chat_template(
        messages, chat_template=CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True
    )
    if not isinstance(rendered, str):
        raise ModelLoadError(f"{model.name}: the chat template did not render text")
    return rendered


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

    check_sampling(Sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed))
    if model.model is None or model.tokenizer is None:
        raise ModelLoadError(f"{model.name}: the model was unloaded")

    prompt = render_prompt(model, messages)
    encoded = model.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    input_ids = encoded["input_ids"].to(model.device)
    attention_mask = encoded["attention_mask"].to(model.device)
    stop_ids = stop_token_ids(model)
    config = sampling_config(max_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p),
                             stop_ids=stop_ids, pad_id=pad_token_id(model, stop_ids))

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


def stop_token_ids(model: QwenModel) -> list[int]:
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


def pad_token_id(model: QwenModel, stop_ids: list[int]) -> int | None:
    """The checkpoint's pad id, else the tokenizer's, else the first stop id."""
    pad = model.model.generation_config.pad_token_id
    if pad is None:
        pad = model.tokenizer.pad_token_id
    if isinstance(pad, int):
        return pad
    return stop_ids[0] if stop_ids else None
