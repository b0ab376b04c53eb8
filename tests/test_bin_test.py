"""``bin/test`` itself: what it reports when the run proves nothing."""

from __future__ import annotations

import os
import subprocess

from .support.process import ROOT


def bin_test(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    return subprocess.run([str(ROOT / "bin" / "test"), *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_a_run_that_collects_nothing_fails() -> None:
    """A mistyped ``-k`` or ``-m`` (or an empty ``--stress``) runs no test: that is red, not green."""
    done = bin_test("-n", "0", "tests/test_layers.py", "-k", "no_test_is_named_like_this")
    assert done.returncode != 0, done.stdout + done.stderr
    assert "bin/test: pytest collected no tests" in done.stderr
