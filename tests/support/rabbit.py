"""RabbitMQ for the tests: ``rabbitmqctl`` and a fresh vhost of a test module's own."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

from .env import AMQP

RABBITMQCTL = shutil.which("rabbitmqctl")


def url(vhost: str) -> str:
    """``amqp://user:password@host:port/VHOST`` of the test RabbitMQ."""
    return AMQP[:AMQP.index("/", len("amqp://"))] + "/" + vhost


def ctl(*args: str) -> list[list[str]]:
    """``rabbitmqctl ARGS`` as rows of tab-separated columns (headers dropped)."""
    headers = ["--no-table-headers"] if args[0].startswith("list_") else []
    out = subprocess.run([str(RABBITMQCTL), "-q", *headers, *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [line.split("\t") for line in out.stdout.splitlines() if line.strip()]


@contextmanager
def fresh_vhost(name: str) -> Iterator[str]:
    """A vhost made for the block and deleted after it (its queues with it)."""
    subprocess.run([str(RABBITMQCTL), "-q", "delete_vhost", name], capture_output=True, timeout=120)
    ctl("add_vhost", name)
    ctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    try:
        yield name
    finally:
        subprocess.run([str(RABBITMQCTL), "-q", "delete_vhost", name], capture_output=True, timeout=120)
