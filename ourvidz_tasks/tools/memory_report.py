"""What ``ourvidz memory`` shows: the workers' ``memory_status`` replies and model load counts, as tables."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TextIO

import redis

from ..contract import keys
from ..contract.text import as_text


def memory_status(timeout: float) -> list[tuple[str, dict[str, Any]]]:
    """``(node, reply)`` of the workers' ``memory_status`` command (a broadcast: nothing registers here)."""
    from ..celery import app

    replies = app.control.broadcast("memory_status", reply=True, timeout=timeout) or []
    return sorted((node, status) for reply in replies for node, status in reply.items() if isinstance(status, dict))


def ledger_tables(replies: Sequence[tuple[str, dict[str, Any]]]
                  ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    """Rows per device and per pool from ``memory_status`` replies (pools of one GPU answer alike),
    and a note per worker that has no ledger (the outbox consumer)."""
    devices: dict[tuple[str, str], dict[str, Any]] = {}
    pools: dict[tuple[str, str, str], dict[str, Any]] = {}
    notes = []
    for node, st in replies:
        if "error" in st:
            notes.append(f"{node}: {st['error']}")
            continue
        where = (str(st.get("host", "?")), str(st.get("device", "?")))
        devices[where] = {
            "host": where[0], "device": where[1], "budget_mb": st.get("budget_mb"),
            "reserved_mb": st.get("reserved_mb"), "free_mb": st.get("free_mb"), "pressure": st.get("pressure"),
            "waiters": st.get("pending_waiters"), "switches_1h": st.get("switches_last_hour"),
        }
        for name, pool in (st.get("pools") or {}).items():
            models = pool.get("models") or {}
            pools[(*where, name)] = {
                "host": where[0], "device": where[1], "pool": name,
                "models": ", ".join(f"{m} {mb} MB" for m, mb in models.items()) or "-",
                "reserved_mb": pool.get("reserved_mb"), "busy": pool.get("busy"),
                "queued": pool.get("queue_depth"), "idle_s": pool.get("idle_seconds"),
            }
    return list(devices.values()), list(pools.values()), notes


def load_counters(store: redis.Redis, timeout: float) -> list[dict[str, Any]]:
    """Workers that answer a ping, and the model load counts they keep in ``keys.loads(node)``."""
    from ..celery import app

    online = {node for reply in app.control.ping(timeout=timeout) or [] for node in reply}
    rows = []
    seen = set()
    for key in sorted(store.scan_iter(match=keys.LOADS_PREFIX + "*", count=1000)):
        node = as_text(key).removeprefix(keys.LOADS_PREFIX)
        seen.add(node)
        for model, loads in sorted(store.hgetall(key).items()):
            rows.append({"worker": node, "online": node in online, "model": as_text(model), "loads": int(loads)})
    rows += [{"worker": node, "online": True, "model": "-", "loads": 0} for node in sorted(online - seen)]
    return rows


def table(rows: Sequence[dict[str, Any]], stream: TextIO) -> None:
    """A plain text table of dicts (columns in first-seen order)."""
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    cells = [[_cell(row.get(col)) for col in columns] for row in rows]
    widths = [max([len(col), *(len(r[i]) for r in cells)]) for i, col in enumerate(columns)]
    stream.write("  ".join(col.upper().ljust(w) for col, w in zip(columns, widths, strict=True)).rstrip() + "\n")
    for r in cells:
        stream.write("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
