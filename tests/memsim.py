"""A runtime plug-in (``OURVIDZ_RUNTIME_PLUGINS=tests.memsim:ballast``) for the one-card simulation.

Each loaded tiny model is padded with real weights up to the total named for
its model in ``OURVIDZ_TEST_WEIGHTS_MB`` (JSON ``{"sdxl": 65, ...}``): a
float32 tensor written through on the model's device, so the process really holds it (RSS on CPU,
the card on CUDA) and the model's ``nbytes()`` (what the ledger records as weights at load) counts it.
The models then stand in the real models' ratios, far above the probe's noise,
whatever size the tiny builders give them.
"""

from __future__ import annotations

import json
import os
from typing import Any

MB = 2**20


class Ballasted:
    """A loaded model plus ``mb`` MB of real weights; everything else is the model's own."""

    def __init__(self, inner: Any, total_mb: int) -> None:
        import torch

        self._inner = inner
        pad = max(0, total_mb * MB - int(inner.nbytes()))
        device = getattr(inner, "device", None) or getattr(getattr(inner, "qwen", None), "device", "cpu")
        self._ballast: Any = torch.ones(pad // 4, device=device)  # pages written: resident, not just reserved

    def nbytes(self) -> int:
        extra = self._ballast.numel() * self._ballast.element_size() if self._ballast is not None else 0
        return int(self._inner.nbytes()) + extra

    def unload(self) -> int:
        freed = self.nbytes()
        self._ballast = None
        self._inner.unload()
        return freed

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def ballast(rt: Any) -> None:
    sizes = json.loads(os.environ.get("OURVIDZ_TEST_WEIGHTS_MB") or "{}")
    for name, slot in rt.models.items():
        mb = int(sizes.get(name, 0))
        if mb <= 0:
            continue

        def loaded(loader: Any = slot._loader, mb: int = mb) -> Any:
            return Ballasted(loader(), mb)

        slot._loader = loaded
