"""The one retry pause of the project: exponential backoff with full jitter.

Try ``n`` (0 for the first retry) waits ``uniform(0, min(cap, base * 2**n))``
("full jitter", AWS Architecture Blog, *Exponential Backoff And Jitter*):
the ceiling doubles per try up to ``cap`` and the pause is spread over all of
it, so processes that failed together (an edge or Redis restart) do not
come back together. Used by Celery task retries, HTTP retries, the outbox
drainer, the bridge and the worker's warm-up.
"""

from __future__ import annotations

import random

#: exponents above this would only overflow; every realistic cap is reached long before
_MAX_EXPONENT = 60


def full_jitter(attempt: int, base: float, cap: float) -> float:
    """The pause before retry ``attempt`` (0-based): ``uniform(0, min(cap, base * 2**attempt))``."""
    return random.uniform(0.0, min(cap, base * 2.0 ** min(max(attempt, 0), _MAX_EXPONENT)))


class Backoff:
    """The pauses of one retry loop: :meth:`next` before each retry, :meth:`reset` after a success."""

    def __init__(self, base: float, cap: float) -> None:
        self.base, self.cap = base, cap
        self.attempt = 0

    def next(self) -> float:
        """The pause before the next retry (:func:`full_jitter` of the tries so far)."""
        pause = full_jitter(self.attempt, self.base, self.cap)
        self.attempt += 1
        return pause

    def reset(self) -> None:
        """It worked: the next failure starts from ``base`` again."""
        self.attempt = 0

    @property
    def backing_off(self) -> bool:
        """True between a failure and the next :meth:`reset`."""
        return self.attempt > 0
