"""A runtime plug-in (``OURVIDZ_RUNTIME_PLUGINS=tests.warmup_gate:hold_first_load``) for startup tests.

The pool's first model load waits, after its GPU memory is reserved, until the file named by
``OURVIDZ_TEST_WARMUP_GATE`` exists: a test can take Redis away at a known point of the warmup.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

log = logging.getLogger(__name__)
HELD = "warmup gate: first load held"


def hold_first_load(rt: Any) -> None:
    gate = os.environ.get("OURVIDZ_TEST_WARMUP_GATE")
    if not gate:
        return
    for slot in rt.models.values():
        def held(loader: Any = slot._loader) -> Any:
            if not os.path.exists(gate):
                log.warning(HELD)
                while not os.path.exists(gate):
                    time.sleep(0.1)
            return loader()

        slot._loader = held
