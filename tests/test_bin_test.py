"""``bin/test`` itself: what it reports when the run proves nothing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .support import tools
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


def _pytest_without_tools(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """pytest on a test that runs ``openssl``, with no tool on ``PATH``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST") and k not in ("CI", "OURVIDZ_TEST_TOOLS")}
    return subprocess.run([sys.executable, "-m", "pytest", "-n", "0", "-p", "no:cacheprovider", "-q",
                           "tests/test_fetch.py", "-k", "sni", *args], env={**base, "PATH": "/nonexistent", **env},
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_a_missing_tool_fails_under_bin_test_and_in_ci() -> None:
    """bin/test installs the tools first (bin/_tools) and sets OURVIDZ_TEST_TOOLS=require: a missing one is red."""
    done = _pytest_without_tools(OURVIDZ_TEST_TOOLS="require")
    assert done.returncode == 1 and "1 error" in done.stdout, done.stdout[-3000:]
    assert "openssl is not installed (bin/test installs it: apt-get install openssl)" in done.stdout
    bare = _pytest_without_tools()  # a bare pytest run elsewhere: skipped, saying how to install it
    assert bare.returncode == 0 and "1 skipped" in bare.stdout, bare.stdout[-3000:]
    assert "OURVIDZ_TEST_TOOLS=require" in (ROOT / "bin" / "test").read_text()


def test_no_test_installs_system_packages() -> None:
    """Every tool is installed by bin/test's setup (bin/_tools), never by a test mid-run."""
    installs = ("apt-get " + "update", "apt-get install " + "-y")  # spelled apart: this file is under tests/ too
    offenders = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "tests").rglob("*.py"))
                 if any(words in p.read_text() for words in installs)]
    assert offenders == []
    setup = (ROOT / "bin" / "_tools").read_text()
    for command in ("chromium", "docker-compose", "openssl", "node", "npm", "redis-server"):
        assert f'"{command}:' in setup, command


def test_ci_requires_the_tools_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OURVIDZ_TEST_TOOLS", raising=False)
    monkeypatch.delenv("CI", raising=False)
    assert not tools.required()
    monkeypatch.setenv("CI", "true")  # .ci/run's environment
    assert tools.required()
    with pytest.raises(pytest.fail.Exception, match="no-such-tool is not installed"):
        tools.tool("no-such-tool", "no-such-package")
