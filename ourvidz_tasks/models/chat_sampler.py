"""The chat engine's per-request token choice, as a ``transformers`` continuous-batching logits processor.

:class:`RequestSampler` turns each row of the batch's scores into a one-hot
choice: greedy rows take the argmax, sampled rows draw with the request's own
``torch.Generator`` (seeded from ``seed``), so a request's tokens depend only
on its own logits, not on its neighbours in the batch or their order. It needs
torch at import; :mod:`~ourvidz_tasks.models.chat_engine` imports it when an
engine starts.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import torch
from transformers.generation.continuous_batching.cb_logits_processors import ContinuousBatchingLogitsProcessor

from .chat_common import Sampling

if TYPE_CHECKING:
    from transformers.generation.continuous_batching.requests import FutureRequestState


class RequestSampler(ContinuousBatchingLogitsProcessor):
    """Per-request token choice: each row of the scores becomes one-hot on the chosen token."""

    def __init__(self) -> None:
        self.supported_kwargs: dict[str, type] = {"slot": int}
        self.ignored_kwargs: tuple[str, ...] = ()
        self.rows: dict[int, tuple[Sampling, torch.Generator | None]] = {}

    def add(self, slot: int, sampling: Sampling, device: torch.device) -> None:
        generator = None
        if sampling.temperature > 0:
            seed = sampling.seed if sampling.seed is not None else random.getrandbits(63)
            generator = torch.Generator(device=device).manual_seed(seed)
        self.rows[slot] = (sampling, generator)

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.fill_(-1)

    def prepare_tensor_args(self, requests_with_new_token: list[FutureRequestState]) -> torch.Tensor:
        slots = [int(r.state.logit_processor_kwargs.get("slot", -1)) for r in requests_with_new_token]
        return torch.tensor(slots, dtype=torch.int32, device="cpu")

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        chosen = scores.argmax(dim=-1)
        for row, slot in enumerate(tensor_arg[: scores.size(0)].tolist()):
            sampling, generator = self.rows.get(slot, (None, None))
            if sampling is not None and generator is not None:
                chosen[row] = _draw(scores[row], sampling, generator)
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, chosen.unsqueeze(1), 0.0)
        return out


def _draw(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> torch.Tensor:
    """Temperature, then nucleus (top-p) filtering as ``TopPLogitsWarper`` does, then one draw."""
    scores = logits / sampling.temperature
    if sampling.top_p < 1.0:
        ordered, order = torch.sort(scores, descending=False)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - sampling.top_p)
        remove[-1:] = False
        scores = scores.masked_fill(remove.scatter(0, order, remove), float("-inf"))
    return torch.multinomial(scores.softmax(dim=-1), 1, generator=generator)[0]
