"""img2img step arithmetic that diffusers agrees with (CONTRACT.md section 6, "Steps").

``num_inference_steps`` is the schedule length; img2img runs
``int(steps * strength)`` of it, computed in floating point by diffusers. Any
strength chosen here is the float that diffusers' own expression counts as
the intended number of steps: ``1 / n`` is not (``int(49 * (1 / 49)) == 0``).
"""

from __future__ import annotations

import math

#: the longest img2img schedule (the SDXL scheduler's training steps)
MAX_SCHEDULE = 1000


def steps_run_of(steps: int, strength: float) -> int:
    """The denoising steps diffusers' img2img runs: ``min(int(steps * strength), steps)``."""
    return min(int(steps * strength), steps)


def strength_for(steps: int, run: int) -> float:
    """The smallest strength with which a schedule of ``steps`` runs exactly ``run`` steps.

    ``run / steps`` itself can fall one step short in floating point
    (``int(49 * (1 / 49)) == 0``), so the float is nudged up to the first
    value diffusers' own ``int(steps * strength)`` counts as ``run``.
    """
    if not 1 <= run <= steps:
        raise ValueError(f"`run` must be between 1 and steps ({steps}); got {run}")
    strength = run / steps
    while steps_run_of(steps, strength) < run:
        strength = math.nextafter(strength, math.inf)
    while strength > 0 and steps_run_of(steps, math.nextafter(strength, 0.0)) >= run:
        strength = math.nextafter(strength, 0.0)
    return min(strength, 1.0)


def img2img_steps(steps: int, strength: float) -> tuple[float, int, bool]:
    """``(strength, steps_run, raised)``: at least one step always runs.

    diffusers runs ``int(steps * strength)`` steps; below 1 it refuses, so the
    strength is raised to exactly one step's worth and that is reported.
    """
    run = steps_run_of(steps, strength)
    if run >= 1:
        return strength, run, False
    return strength_for(steps, 1), 1, True


def exact_copy_plan(run: int, strength: float) -> tuple[int, float]:
    """``(schedule length, strength)`` that run exactly ``run`` steps with strength <= ``strength``.

    The schedule is at most :data:`MAX_SCHEDULE` (diffusers refuses longer);
    ``strength`` is kept as given when a schedule runs exactly ``run`` steps
    with it (6 / 0.05 → 120), otherwise the strength is that schedule's exact
    one (:func:`strength_for`), never above ``strength`` unless even the
    longest schedule needs more.
    """
    longest = min(MAX_SCHEDULE, max(run, math.ceil(run / strength)))
    for n in (round(run / strength), longest):
        if run <= n <= MAX_SCHEDULE and steps_run_of(n, strength) == run:
            return n, strength
    for n in (longest, longest + 1):  # run / n <= strength; the nudge may cross it at the boundary
        exact = strength_for(n, run) if n <= MAX_SCHEDULE else math.inf
        if exact <= strength:
            return n, exact
    return MAX_SCHEDULE, strength_for(MAX_SCHEDULE, run)  # raised: even the longest schedule needs more
