"""bin/worker refuses a wrong configuration with status 2 and one line naming the variable; each role's
worker imports its own task module only."""

from __future__ import annotations

import os
import subprocess

import pytest

from ourvidz_tasks.contract.names import ROLES
from ourvidz_tasks.tools.launcher import USAGE, task_modules

from .support.process import ROOT


def worker(*args: str, **env: str | None) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    for key, value in env.items():
        if value is None:
            full.pop(key, None)
        else:
            full[key] = value
    return subprocess.run([str(ROOT / "bin" / "worker"), *args], env=full, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        ((), {}, "usage: bin/worker sdxl|chat|wan|outbox"),
        (("painter",), {}, "usage: bin/worker"),
        (("sdxl",), {"SUPABASE_URL": None}, "SUPABASE_URL is not set"),
        (("sdxl",), {"SUPABASE_SERVICE_KEY": ""}, "SUPABASE_SERVICE_KEY is not set"),
        (("sdxl",), {"OURVIDZ_MODEL_SOURCE": "local", "OURVIDZ_SDXL_MODEL": None}, "OURVIDZ_SDXL_MODEL is required"),
        (("wan",), {"OURVIDZ_MODEL_SOURCE": "local", "OURVIDZ_WAN_MODEL": "/nonexistent/wan"}, "OURVIDZ_WAN_MODEL: /nonexistent/wan does not exist"),
        (("sdxl",), {"OURVIDZ_MODEL_SOURCE": "local", "OURVIDZ_SDXL_MODEL": str(ROOT / "README.md").replace(".md", ".safetensors")}, "OURVIDZ_SDXL_MODEL"),
        (("sdxl",), {"OURVIDZ_DEVICE": "gpu"}, "OURVIDZ_DEVICE"),
        (("chat",), {"OURVIDZ_MODEL_SOURCE": "remote"}, "OURVIDZ_MODEL_SOURCE"),
        (("sdxl",), {"OURVIDZ_BROKER_URL": "kafka://x"}, "OURVIDZ_BROKER_URL"),
        (("sdxl",), {"OURVIDZ_PROMPT_POLICY": "no.such:thing"}, "OURVIDZ_PROMPT_POLICY"),
        (("sdxl",), {"OURVIDZ_FETCH_ALLOW": "10.0.0.0/99"}, "OURVIDZ_FETCH_ALLOW"),
    ],
)
def test_wrong_configuration_exits_2_with_one_line(args: tuple[str, ...], env: dict[str, str | None], needle: str) -> None:
    result = worker(*args, **{"SUPABASE_URL": "http://127.0.0.1:9", **env})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert "test-service-key" not in result.stderr


def test_each_role_imports_its_own_task_module_only() -> None:
    """Celery's ``include`` per role: the outbox consumer never imports a pool's module (nor torch;
    tests/test_light_install.py runs it without)."""
    assert USAGE.startswith(f"usage: bin/worker {'|'.join(ROLES)} ")
    for role in ROLES:
        assert task_modules(role) == [f"ourvidz_tasks.{role}"]
        assert (ROOT / "ourvidz_tasks" / f"{role}.py").is_file()
