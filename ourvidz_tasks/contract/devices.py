"""Device names: ``OURVIDZ_DEVICE`` spelled one way, and the node name it gives (CONTRACT section 5).

One spelling per device, so every pool of one card finds the same memory ledger
(``ourvidz:ledger:{host}:{device}``) however its environment wrote it:

- ``cuda``, ``cuda:0``, ``cuda:00`` -> ``cuda:0``; ``cuda:N`` -> ``cuda:N`` (CUDA always with its index);
- ``cpu``, ``cpu:0`` -> ``cpu``; ``cpu:N`` -> ``cpu:N`` (a simulated device N, for tests of several
  devices on one host: its own ledger, its own node name, the same CPU).

Node names: ``{family}@{host}`` on device 0 (``cuda``, ``cuda:0``, ``cpu``), ``{family}.gpuN@{host}`` on
``cuda:N`` and ``{family}.cpuN@{host}`` on ``cpu:N`` with N > 0.

``cuda:N`` names card N of the host (nvidia-smi's index). A container that reserved only some cards
sees them renumbered from 0; when ``NVIDIA_VISIBLE_DEVICES`` lists the host's indices of the cards
the process sees (docker-compose.yml sets it beside ``device_ids``), card N is the one at N's
position in that list (:func:`local_cuda_index`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

_DEVICE = re.compile(r"^(cpu|cuda)(?::(\d+))?$")


def canonical_device(name: str) -> str:
    """The one spelling of ``name`` (see the module doc); ValueError naming what is allowed."""
    match = _DEVICE.match(name.strip().lower())
    if match is None:
        raise ValueError(f"must be 'cpu', 'cpu:N' (a simulated device) or 'cuda:N', got {name!r}")
    kind, index = match.group(1), int(match.group(2) or 0)
    if kind == "cpu":
        return "cpu" if index == 0 else f"cpu:{index}"
    return f"cuda:{index}"


def device_index(name: str | None) -> int:
    """N of ``cuda:N`` / ``cpu:N`` (0 for ``cpu``, ``cuda`` and no device)."""
    if not name:
        return 0
    device = canonical_device(name)
    return int(device.split(":")[1]) if ":" in device else 0


def node_name(family: str, host: str, device: str | None) -> str:
    """``{family}@{host}``, ``{family}.gpuN@{host}`` (``cuda:N``) or ``{family}.cpuN@{host}`` (``cpu:N``), N > 0."""
    index = device_index(device)
    if index == 0:
        return f"{family}@{host}"
    kind = "gpu" if canonical_device(device or "").startswith("cuda") else "cpu"
    return f"{family}.{kind}{index}@{host}"


def local_cuda_index(index: int, environ: Mapping[str, str]) -> int:
    """The process's own CUDA index of the host's card ``index``.

    ``NVIDIA_VISIBLE_DEVICES`` of plain integers (what compose sets beside ``device_ids``) maps the
    host's indices to the container's (``"1"``: card 1 is the container's ``cuda:0``); anything else
    there (unset, ``all``, UUIDs) leaves ``index`` as it is, and so does an index that is not in the
    list but within it (``cuda:0`` with ``"3"``: the container's own numbering, as before the mapping).
    ValueError when ``index`` is neither.
    """
    visible = [part.strip() for part in environ.get("NVIDIA_VISIBLE_DEVICES", "").split(",") if part.strip()]
    if not visible or not all(part.isdigit() for part in visible):
        return index
    cards = [int(part) for part in visible]
    if index in cards:
        return cards.index(index)
    if index < len(cards):
        return index
    raise ValueError(f"card {index} is not among NVIDIA_VISIBLE_DEVICES={','.join(visible)}")
