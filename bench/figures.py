"""One row of the benchmark table: a figure, ours beside its reference, and its target.

Every bench script returns its figures with ``figure(...)`` and writes them with
``harness.write(name, data, figures)``; ``bench/report.py`` gathers them all
into one table and one plot. A figure has either a reference (a bare library,
the old design, the first job) and a ratio target, or an absolute target.
"""

from __future__ import annotations

from typing import Any


def figure(name: str, ours: float, unit: str, *, reference: float | None = None, against: str = "",
           max_ratio: float | None = None, max_value: float | None = None, note: str = "") -> dict[str, Any]:
    """``ours`` (and ``reference``) in ``unit``; the target is ``ours / reference ≤ max_ratio`` or ``ours ≤ max_value``."""
    ratio = ours / reference if reference else None
    if max_ratio is not None:
        met: bool | None = ratio is not None and ratio <= max_ratio
        target = f"≤ {max_ratio:g}x"
    elif max_value is not None:
        met = ours <= max_value
        target = f"≤ {max_value:g} {unit}"
    else:
        met, target = None, ""
    return {"figure": name, "ours": ours, "unit": unit, "reference": reference, "against": against,
            "ratio": ratio, "target": target, "max_ratio": max_ratio, "max_value": max_value, "met": met,
            "note": note}
