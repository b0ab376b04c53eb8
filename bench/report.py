"""Gather every ``bench/out/*.json`` into one table, a JSON summary and a plot.

``python bench/report.py`` prints the table (figure, ours, reference, ratio,
target), writes ``bench/out/summary.json`` and ``bench/results/summary.png``,
and replaces the generated part of ``bench/RESULTS.md`` (between its markers),
leaving the hand-written sections around it alone.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
RESULTS = ROOT / "bench" / "RESULTS.md"
PLOT = ROOT / "bench" / "results" / "summary.png"
BEGIN, END = "<!-- bench/run: begin -->", "<!-- bench/run: end -->"


def load() -> list[dict[str, Any]]:
    rows = []
    for path in sorted(OUT.glob("*.json")):
        if path.name == "summary.json":
            continue
        data = json.loads(path.read_text())
        for row in data.get("figures", []):
            rows.append({**row, "bench": path.stem})
    return rows


def number(value: float | None, unit: str = "") -> str:
    if value is None:
        return "–"
    text = f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return f"{text} {unit}".strip()


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| bench | figure | ours | reference | ratio | target | met |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = f"{number(r['reference'], r['unit'])} ({r['against']})" if r["reference"] is not None else "–"
        ratio = f"{r['ratio']:.3g}x" if r["ratio"] is not None else "–"
        met = {True: "yes", False: "**no**", None: ""}[r["met"]]
        lines.append(f"| {r['bench']} | {r['figure']} | {number(r['ours'], r['unit'])} | {ref} | {ratio} | "
                     f"{r['target']} | {met} |")
    return "\n".join(lines)


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch  # the bench venv always has it

    return (f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, torch {torch.__version__}, "
            f"no GPU; tiny random-weight models")


def plot(rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # each figure against its own target: 1.0 is the target line (ratio / max_ratio or value / max_value)
    shown = [r for r in rows if r["max_ratio"] or r["max_value"]]
    if not shown:
        return
    scores = [(r["ratio"] or 0) / r["max_ratio"] if r["max_ratio"] else r["ours"] / r["max_value"] for r in shown]
    labels = [f"{r['bench']}: {r['figure']}" for r in shown]
    fig, ax = plt.subplots(figsize=(10, 0.4 * len(shown) + 1.5))
    colors = ["tab:green" if s <= 1 else "tab:red" for s in scores]
    ax.barh(range(len(shown)), [min(s, 3.0) for s in scores], color=colors)  # a miss past 3x is drawn at 3x
    for y, s in enumerate(scores):
        ax.text(min(s, 3.0) + 0.02, y, f"{s:.2f}", va="center", fontsize=7)
    ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(shown)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("share of the target used (≤ 1 meets it; ratio / target ratio, or value / target value)")
    ax.set_title("ourvidz_tasks benchmarks against their targets")
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=100)


def main(every: list[str]) -> int:
    """Print the table of the figures in bench/out/; rewrite RESULTS.md and the plot only when
    ``every`` bench has its figures there (a run of some benches leaves the committed results)."""
    rows = load()
    if not rows:
        print("no figures in bench/out/: run bench/run first", file=sys.stderr)
        return 1
    text = table(rows)
    print(text)
    missed = [r for r in rows if r["met"] is False]
    print(f"\n{len(rows)} figures, {len(missed)} targets missed")
    (OUT / "summary.json").write_text(json.dumps({"machine": machine(), "figures": rows}, indent=2))
    absent = sorted(set(every) - {r["bench"] for r in rows})
    if absent:
        print(f"{RESULTS.relative_to(ROOT)} left as it is: no figures of {', '.join(absent)} in bench/out/")
        return 0
    plot(rows)
    generated = (f"{BEGIN}\nMachine: {machine()}.\n\n{text}\n\n"
                 f"![each figure against its target](results/summary.png)\n{END}")
    current = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\n"
    if BEGIN in current and END in current:
        head, rest = current.split(BEGIN, 1)
        current = head + generated + rest.split(END, 1)[1]
    else:
        current = current.rstrip() + "\n\n" + generated + "\n"
    RESULTS.write_text(current)
    print(f"wrote {RESULTS.relative_to(ROOT)} and {PLOT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
