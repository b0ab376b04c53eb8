"""The CPU profile of the compose file as one file: ``docker-compose.yml`` with ``compose.cpu.yml`` over it.

``docker-compose config`` renders the two files (the env file's values filled in); the pools'
GPU reservations are then dropped, which an override cannot do with Debian's compose v1 (it merges
lists; v2's ``!reset`` is not in Debian 12). The result holds the env file's secrets: keep it private.

    python -m devtools.compose_cpu --env-file .env > /tmp/ourvidz-cpu.yml
    docker-compose -p ourvidz-cpu -f /tmp/ourvidz-cpu.yml up -d

``bin/compose-check`` builds the images on a CPU host, brings this up and checks it (tests/test_compose_up.py).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
FILES = (ROOT / "docker-compose.yml", ROOT / "compose.cpu.yml")


def render(env_file: Path, compose: str = "docker-compose") -> dict[str, Any]:
    """The merged services, volumes and networks, without any ``deploy`` (GPU reservations)."""
    argv = [compose, "--env-file", str(env_file), "--project-directory", str(ROOT)]
    for path in FILES:
        argv += ["-f", str(path)]
    # a clean environment: compose prefers the shell's variables over the env file
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root")}
    result = subprocess.run([*argv, "config"], env=env, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"docker-compose config failed: {result.stderr.strip()}")
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    for service in config["services"].values():
        service.pop("deploy", None)
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env-file", type=Path, default=ROOT / ".env", help="the variables (default: .env)")
    parser.add_argument("--compose", default="docker-compose", help="the compose v1 program")
    args = parser.parse_args()
    yaml.safe_dump(render(args.env_file, args.compose), sys.stdout, sort_keys=False)


if __name__ == "__main__":
    main()
