"""docker-compose.yml, .env.example and the Dockerfile, checked without a container engine.

Debian's ``docker-compose`` (v1) validates and renders the file (``config``);
the rendered services are then checked against the package: every command
exists in the image (a ``bin/`` script or a console script of setup.cfg) and
takes the arguments given, and every service's environment is one our
settings accept.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from ourvidz_tasks.contract.devices import device_index, local_cuda_index, node_name
from ourvidz_tasks.contract.names import FAMILIES, ROLES
from ourvidz_tasks.services.metrics import port_for

from .support.process import ROOT
from .support.tools import tool

#: the Dockerfile's two targets and the image compose tags each as
IMAGES = {"worker": "ourvidz-tasks:latest", "light": "ourvidz-tasks-light:latest"}
POOLS: tuple[str, ...] = FAMILIES
#: what runs without torch (the light image): everything but the pools
LIGHT = ("outbox", "flower", "metrics", "bridge")
#: the pool set of the host's second card (profile gpu1): service -> role
GPU1 = {f"{name}-gpu1": name for name in POOLS}


@pytest.fixture(scope="module")
def compose() -> str:
    """Debian's docker-compose (``bin/test`` installs it; a failure there, a skip in a bare pytest run)."""
    return tool("docker-compose", "docker-compose")


def run_config(compose: str, env_file: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    # a clean environment: compose prefers the shell's variables over the env file
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root")}
    return subprocess.run([compose, "--env-file", str(env_file), "-f", str(ROOT / "docker-compose.yml"),
                           "--project-directory", str(ROOT), "config", *extra],
                          env=env, capture_output=True, text=True, timeout=120)


def rendered(compose: str, env_file: Path) -> dict[str, Any]:
    result = run_config(compose, env_file)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def env_example(tmp_path: Path, **changes: str | None) -> Path:
    """``.env.example`` with some variables changed (None: removed)."""
    lines = []
    for line in (ROOT / ".env.example").read_text().splitlines():
        name = line.split("=", 1)[0] if "=" in line and not line.startswith("#") else None
        if name in changes:
            if changes[name] is not None:
                lines.append(f"{name}={changes[name]}")
            continue
        lines.append(line)
    path = tmp_path / "env"
    path.write_text("\n".join(lines) + "\n")
    return path


def console_scripts() -> dict[str, str]:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    entries = parser.get("options.entry_points", "console_scripts", fallback="")
    return {name.strip(): target.strip() for name, _, target in
            (line.partition("=") for line in entries.splitlines() if "=" in line)}


def dockerfile_entrypoint() -> list[str]:
    match = re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", dockerfile_stages()["base"], re.M)
    assert match, "the Dockerfile has an exec-form ENTRYPOINT"
    return list(json.loads(match.group(1)))


def dockerfile_stages() -> dict[str, str]:
    """The Dockerfile's stages by name (``FROM ... AS name``), in order, each with its text."""
    parts = re.split(r"^(?=FROM )", (ROOT / "Dockerfile").read_text(), flags=re.M)[1:]
    stages = {}
    for part in parts:
        match = re.match(r"FROM \S+ AS (\w+)\n", part)
        assert match, f"every stage is named: {part.splitlines()[0]}"
        stages[match.group(1)] = part
    return stages


def argv_of(service: dict[str, Any]) -> list[str]:
    entrypoint = service.get("entrypoint") or dockerfile_entrypoint()
    command = service.get("command") or []
    return [*entrypoint, *command]


# -- validation -------------------------------------------------------------------------
def test_env_example_validates(compose: str) -> None:
    result = run_config(compose, ROOT / ".env.example", "-q")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", ["REDIS_PASSWORD", "SUPABASE_URL", "SUPABASE_SERVICE_KEY", "FLOWER_BASIC_AUTH"])
def test_required_variables_are_refused_when_missing(compose: str, tmp_path: Path, name: str) -> None:
    result = run_config(compose, env_example(tmp_path, **{name: None}), "-q")
    assert result.returncode != 0 and f"set {name}" in result.stderr


def test_every_variable_compose_reads_is_in_env_example() -> None:
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", (ROOT / "docker-compose.yml").read_text()))
    listed = {line.split("=", 1)[0] for line in (ROOT / ".env.example").read_text().splitlines()
              if "=" in line and not line.startswith("#")}
    assert used <= listed, f"missing from .env.example: {sorted(used - listed)}"


# -- what the services are ----------------------------------------------------------------
def test_services(compose: str) -> None:
    services = rendered(compose, ROOT / ".env.example")["services"]
    assert set(services) == {"redis", *POOLS, *GPU1, "outbox", "flower", "metrics", "bridge"}

    redis = services["redis"]
    assert "--appendonly yes" in redis["command"] and "--maxmemory-policy noeviction" in redis["command"]
    assert "--requirepass" in redis["command"] and "ports" not in redis  # the broker is not published
    assert any(str(volume).split(":")[1] == "/data" for volume in redis["volumes"])  # the AOF survives

    gpus = set()
    for name in POOLS:
        pool = services[name]
        devices = pool["deploy"]["resources"]["reservations"]["devices"]
        assert [d["capabilities"] for d in devices] == [["gpu"]]
        gpus.add(tuple(devices[0]["device_ids"]))
        assert pool["environment"]["OURVIDZ_DEVICE"] == "cuda:0"
        assert pool["depends_on"]["redis"]["condition"] == "service_healthy"
    assert len(gpus) == 1 and len(next(iter(gpus))) == 1, "the three pools share one GPU"
    hostnames = {services[name]["environment"]["OURVIDZ_HOSTNAME"] for name in (*POOLS, *GPU1, "outbox")}
    assert len(hostnames) == 1, "one host name: the pools of one GPU share one memory ledger"
    assert "deploy" not in services["outbox"] and "deploy" not in services["flower"]

    # metrics: every role's endpoint on the port its offset gives, published on loopback only
    for name, role in (*((r, r) for r in (*POOLS, "outbox")), *GPU1.items()):
        env = services[name]["environment"]
        port = port_for(int(env["OURVIDZ_METRICS_PORT"]), role, env.get("OURVIDZ_DEVICE"))
        assert env["OURVIDZ_METRICS_ADDRESS"] == "0.0.0.0"
        assert _published(services[name]) == {port}
    assert _published(services["metrics"]) == {9100} and "9100" in argv_of(services["metrics"])

    flower = services["flower"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"] == "admin:change-me"
    assert not any("change-me" in arg or "basic_auth" in arg for arg in argv_of(flower))
    assert _published(flower) == {5555}
    assert services["bridge"]["profiles"] == ["legacy"]
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_a_two_gpu_host_runs_one_pool_set_per_card(compose: str) -> None:
    """``--profile gpu1``: the second card's pools, pinned to card 1 alone, under their own node names and
    memory ledger, beside the same outbox consumer, Flower and metrics exporter (one of each per host)."""
    services = rendered(compose, ROOT / ".env.example")["services"]
    sets = {0: {name: name for name in POOLS}, 1: GPU1}
    nodes, ledgers, ports = set(), set(), set()
    for card, members in sets.items():
        for name, role in members.items():
            pool = services[name]
            env = pool["environment"]
            assert pool.get("profiles") == (["gpu1"] if card else None), name
            assert argv_of(pool)[-1] == role
            [reservation] = pool["deploy"]["resources"]["reservations"]["devices"]
            assert reservation["device_ids"] == [str(card)], f"{name} reserves card {card} alone"
            assert env["OURVIDZ_DEVICE"] == f"cuda:{card}" and device_index(env["OURVIDZ_DEVICE"]) == card
            # the container sees only its card, as its cuda:0; the host index still names node and ledger
            assert local_cuda_index(card, {k: str(v) for k, v in env.items()}) == 0
            nodes.add(node_name(role, env["OURVIDZ_HOSTNAME"], env["OURVIDZ_DEVICE"]))
            ledgers.add((env["OURVIDZ_HOSTNAME"], env["OURVIDZ_DEVICE"]))
            ports.update(_published(pool))
    assert {"sdxl@gpu0", "sdxl.gpu1@gpu0", "chat.gpu1@gpu0", "wan.gpu1@gpu0"} <= nodes and len(nodes) == 6
    assert ledgers == {("gpu0", "cuda:0"), ("gpu0", "cuda:1")}, "one memory ledger per card"
    assert ports == {9101, 9102, 9103, 9105, 9106, 9107}
    shared = [n for n, s in services.items() if "deploy" not in s and s.get("image") in IMAGES.values()
              and not s.get("profiles")]
    assert sorted(shared) == ["flower", "metrics", "outbox"], "no per-card copy of the shared services"
    for name in GPU1:
        assert _settings_of(services[name])["broker"] == _settings_of(services["sdxl"])["broker"]


def _published(service: dict[str, Any]) -> set[int]:
    return {int(str(port).split(":")[1]) for port in service.get("ports", [])}


def test_every_service_command_exists_and_takes_its_arguments(compose: str) -> None:
    services = rendered(compose, ROOT / ".env.example")["services"]
    stages = dockerfile_stages()
    assert re.search(r"^COPY bin /app/bin$", stages["source"], re.M) and "WORKDIR /app" in stages["base"]
    assert all(re.search(r"^COPY --from=source /app /app$", stages[t], re.M) for t in IMAGES)
    scripts = console_scripts()
    for name, service in services.items():
        if service.get("image") not in IMAGES.values():
            continue
        argv = argv_of(service)
        program, args = argv[0], argv[1:]
        if program.startswith("/app/bin/"):
            script = ROOT / "bin" / program.removeprefix("/app/bin/")
            assert script.is_file() and os.access(script, os.X_OK), f"{name}: {program} is not in bin/"
            local = [str(script)]
        elif program.startswith("/app/.venv/bin/"):
            script_name = program.removeprefix("/app/.venv/bin/")
            assert script_name in scripts, f"{name}: {script_name} is no console script of setup.cfg"
            module, _, func = scripts[script_name].partition(":")
            local = [sys.executable, "-c", f"import sys; from {module} import {func}; sys.argv[0] = "
                                           f"{script_name!r}; {func}()"]
        else:
            pytest.fail(f"{name}: {program} is neither in /app/bin nor /app/.venv/bin")
        if program == "/app/bin/worker":
            assert args and args[0] in ROLES, f"{name}: bin/worker {args} (roles: {ROLES})"
            continue
        # every other command parses its arguments first: --help after them must succeed
        check = subprocess.run([*local, *args, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert check.returncode == 0, f"{name}: {argv} --help: {check.stderr[-2000:]}"


def test_the_pools_run_the_worker_image_and_the_rest_the_light_one(compose: str) -> None:
    """Two Dockerfile targets: ``worker`` (CUDA torch; the default, last stage) for the pools, ``light``
    (``pip install .``, no torch) for the outbox consumer, Flower, the metrics exporter and the bridge."""
    services = rendered(compose, ROOT / ".env.example")["services"]
    stages = dockerfile_stages()
    assert list(stages)[-1] == "worker", "a plain docker build makes the pools' image"
    assert "torch" not in stages["light"] and "requirements/light.lock" in stages["light"]
    assert "requirements/torch.txt" in stages["worker"] and "requirements/runtime.lock" in stages["worker"]
    for name, service in services.items():
        if name == "redis":
            continue
        target = "light" if name in LIGHT else "worker"
        assert service["image"] == IMAGES[target], name
        assert service["build"] == {"context": str(ROOT), "target": target}, name
    for name in LIGHT:  # bin/worker in the light image runs the outbox role only
        argv = argv_of(services[name])
        assert argv[0] != "/app/bin/worker" or argv[1:] == ["outbox"], f"{name}: {argv}"


# -- the environment each service gets ----------------------------------------------------------
SETTINGS_PROBE = """
import json
from ourvidz_tasks.contract.settings import load_settings
s = load_settings()
print(json.dumps({"broker": s.broker_url, "vram": s.vram_budget_mb, "sdxl_config": s.sdxl_config and str(s.sdxl_config),
                  "legacy": s.legacy_redis, "flower": bool(s.flower_basic_auth)}))
"""


def _settings_of(service: dict[str, Any]) -> dict[str, Any]:
    env = {"PATH": os.environ["PATH"], **{k: str(v) for k, v in service.get("environment", {}).items()}}
    env.pop("HOME", None)
    probe = subprocess.run([sys.executable, "-c", SETTINGS_PROBE], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr[-2000:]
    return dict(json.loads(probe.stdout))


def test_every_service_environment_is_valid_settings(compose: str, tmp_path: Path) -> None:
    services = rendered(compose, ROOT / ".env.example")["services"]
    for name in (*POOLS, "outbox", "flower", "metrics"):
        got = _settings_of(services[name])
        assert got["broker"] == "redis://:change-me-long-random-hex@redis:6379/0", name
    assert _settings_of(services["flower"])["flower"] is True


def test_optional_variables_may_be_left_empty(compose: str, tmp_path: Path) -> None:
    blank = env_example(tmp_path, OURVIDZ_VRAM_BUDGET_MB="", OURVIDZ_SDXL_CONFIG="", JOB_CALLBACK_SECRET="",
                        OURVIDZ_LEGACY_REDIS_URL="", OURVIDZ_QWEN_BASE_MODEL="")
    services = rendered(compose, blank)["services"]
    pool = _settings_of(services["sdxl"])
    assert pool["vram"] is None and pool["sdxl_config"] is None  # empty means unset, not "." or an error
    assert _settings_of(services["bridge"])["legacy"] == "redis://:change-me-long-random-hex@redis:6379/0"
