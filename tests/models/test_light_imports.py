"""The model layer imports without torch, diffusers, transformers, numpy or PIL (a light install plans memory)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

#: needs torch at import by design: it subclasses transformers' continuous-batching logits processor
NEEDS_TORCH = {"ourvidz_tasks.models.chat_sampler"}

SCRIPT = textwrap.dedent(
    """
    import importlib, importlib.abc, pkgutil, sys

    HEAVY = {"torch", "diffusers", "transformers", "tokenizers", "accelerate", "compel", "numpy", "PIL"}

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in HEAVY:
                raise ImportError(f"{name} is not installed here")
            return None

    sys.meta_path.insert(0, Refuse())
    import ourvidz_tasks.models as models

    skip = set(sys.argv[1:])
    for info in pkgutil.walk_packages(models.__path__, "ourvidz_tasks.models."):
        if info.name not in skip:
            importlib.import_module(info.name)
    from ourvidz_tasks.models import memplan

    print(memplan.format_plan(memplan.plan(memplan.card_mib("h100-80gb"))).splitlines()[0])
    """
)


def test_every_model_module_imports_and_plans_memory_without_torch() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, *NEEDS_TORCH], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("card 81559 MB: budget")
