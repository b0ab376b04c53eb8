"""The system tools some tests run (``chromium``, ``docker-compose``, ``openssl``, ``node``, ``npm``).

``bin/test`` installs them before the run (``bin/_tools``) and sets ``OURVIDZ_TEST_TOOLS=require``;
there, and in CI (``CI`` set), a missing tool fails the test that needs it. A plain ``pytest``
elsewhere skips it, saying how to install it. No test installs anything.
"""

from __future__ import annotations

import os
import shutil

import pytest


def required() -> bool:
    """Whether a missing tool is a failure (``bin/test``, CI) rather than a skip."""
    return os.environ.get("OURVIDZ_TEST_TOOLS") == "require" or bool(os.environ.get("CI"))


def tool(command: str, package: str) -> str:
    """The path of ``command``; fails (``bin/test``, CI) or skips the test where it is missing."""
    found = shutil.which(command)
    if found is not None:
        return found
    why = f"{command} is not installed (bin/test installs it: apt-get install {package})"
    if required():
        pytest.fail(why, pytrace=False)
    pytest.skip(why)
