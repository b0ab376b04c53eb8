"""The lock files (requirements/, made by ``bin/lock`` with pip-compile) against setup.cfg and what runs.

setup.cfg states ranges: install_requires (the light install: publishers, bridge,
outbox, CLI, Flower; no torch), the ``worker`` extra (the GPU pools) and the
``dev`` extra. light.lock pins the first, runtime.lock adds the worker extra,
dev.lock both extras. The locks pin every package the project installs except
torch, which ``requirements/torch.txt`` pins on its own because its CPU build
(bin/_env) and CUDA build (the Dockerfile) differ. Each floor in setup.cfg is the
minor release the suite runs on, so a floor can never again sit below an API the
code uses (``dtype=`` in diffusers, transformers 5's config names).
"""

from __future__ import annotations

import configparser
import re
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from .support.process import ROOT

REQ = ROOT / "requirements"


def declared() -> dict[str, list[Requirement]]:
    """setup.cfg's requirements: ``light`` (install_requires), ``worker`` and ``dev`` (the extras)."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")

    def lines(text: str) -> list[Requirement]:
        return [Requirement(line.strip()) for line in text.splitlines()
                if line.strip() and not line.strip().startswith("#")]

    extras = cfg["options.extras_require"]
    return {"light": lines(cfg["options"]["install_requires"]), "worker": lines(extras["worker"]),
            "dev": lines(extras["dev"])}


#: what each lock holds
LOCKS = {"light.lock": ("light",), "runtime.lock": ("light", "worker"), "dev.lock": ("light", "worker", "dev")}


def pins(path: Path) -> dict[str, Version]:
    """``name==version`` lines of a pip-compile output (comments and annotations dropped)."""
    out: dict[str, Version] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep and " " not in version and ";" not in version, f"{path.name}: not an exact pin: {line!r}"
        out[canonicalize_name(name)] = Version(version)
    return out


def floor(req: Requirement) -> Version:
    lows = [Version(spec.version) for spec in req.specifier if spec.operator == ">="]
    assert len(lows) == 1, f"{req}: one >= floor"
    return lows[0]


def torch_pin() -> Version:
    (line,) = [x for x in (REQ / "torch.txt").read_text().splitlines() if x.strip() and not x.startswith("#")]
    name, _, version = line.partition("==")
    assert name.strip() == "torch"
    return Version(version.strip())


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_lock_pins_every_requirement_within_its_range_and_not_torch(lock: str) -> None:
    groups = declared()
    wanted = [req for group in LOCKS[lock] for req in groups[group]]
    locked = pins(REQ / lock)
    assert "torch" not in locked, "torch is pinned in requirements/torch.txt (its CPU and CUDA builds differ)"
    # (nvidia-ml-py is NVML's pure-Python binding, read by tools/memsampler.py: no part of torch's build)
    assert not any((name.startswith(("nvidia-", "cuda-")) and name != "nvidia-ml-py") or name == "triton"
                   for name in locked), "CUDA wheels belong to the torch build, not the lock"
    text = (REQ / lock).read_text()
    assert "bin/lock" in text and "pip-compile" in text  # made by the script, not by hand
    for req in wanted:
        name = canonicalize_name(req.name)
        if name == "torch":
            continue
        assert name in locked, f"{lock} does not pin {req.name} (run bin/lock)"
        assert req.specifier.contains(locked[name], prereleases=True), f"{lock}: {name}=={locked[name]} not in {req}"


def test_the_light_install_has_no_torch_and_no_model_library() -> None:
    """``pip install .`` is what a publisher needs; the models' libraries come with ``.[worker]``."""
    groups = declared()
    light = {canonicalize_name(req.name) for req in groups["light"]}
    assert {"torch", "diffusers", "transformers", "pillow", "numpy"} <= {canonicalize_name(r.name) for r in groups["worker"]}
    heavy = {"torch", "diffusers", "transformers", "accelerate", "safetensors", "tokenizers", "pillow", "numpy",
             "opencv-python-headless", "compel", "imageio-ffmpeg", "huggingface-hub"}
    assert not light & heavy
    assert not pins(REQ / "light.lock").keys() & heavy, "something light depends on a model library"


def test_floors_are_the_minor_releases_the_lock_pins() -> None:
    locked = {**pins(REQ / "dev.lock"), "torch": torch_pin()}
    for req in (req for group in declared().values() for req in group):
        pinned = locked[canonicalize_name(req.name)]
        assert floor(req).release[:2] == pinned.release[:2], \
            f"setup.cfg {req}: the floor is not the minor release the lock pins ({pinned})"
        assert req.specifier.contains(pinned, prereleases=True)


def test_the_locks_agree_and_the_venv_runs_the_lock() -> None:
    light, runtime, dev = pins(REQ / "light.lock"), pins(REQ / "runtime.lock"), pins(REQ / "dev.lock")
    assert light.keys() <= runtime.keys() <= dev.keys()
    assert {name: runtime[name] for name in light} == light
    assert {name: dev[name] for name in runtime} == runtime
    # the environment this suite runs in is the lock (bin/_env installed it from dev.lock)
    for name, version in dev.items():
        assert Version(metadata.version(name)) == version, f"installed {name} is not the locked {version}"
    assert Version(metadata.version("torch")).public == str(torch_pin())


def test_installers_and_readme_use_the_lock() -> None:
    env = (ROOT / "bin" / "_env").read_text()
    assert "requirements/torch.txt" in env and "requirements/dev.lock" in env and "--no-deps -e" in env
    assert env.index("requirements/torch.txt\"") < env.index("requirements/dev.lock\" >&2")  # torch first
    docker = (ROOT / "Dockerfile").read_text()
    light, _, worker = docker.partition("FROM base AS worker")
    light = light.partition("FROM base AS light")[2]
    assert re.search(r"pip install .*-r requirements/torch\.txt", worker)
    assert re.search(r"pip install -r requirements/runtime\.lock", worker)
    assert re.search(r"pip install -r requirements/light\.lock", light) and "torch" not in light
    assert all(re.search(r"pip install --no-deps /app", stage) for stage in (light, worker))
    cuda = re.search(r"^ARG TORCH_CUDA=(\S+)$", docker, re.M)
    assert cuda and f"CUDA {cuda.group(1)}: needs NVIDIA driver >= " in docker  # the driver it is built for
    readme = (ROOT / "README.md").read_text()
    assert f"torch=={torch_pin()}" in readme and "bin/lock" in readme
    assert all(f"requirements/{lock}" in readme for lock in LOCKS)
    assert "pip install '.[worker]'" in readme
    for name, version in pins(REQ / "runtime.lock").items():  # any version the README names is the locked one
        for said in re.findall(rf"`{re.escape(name)}==([^`\s]+)`", readme, re.I):
            assert Version(said) == version, f"README says {name}=={said}, the lock {version}"
