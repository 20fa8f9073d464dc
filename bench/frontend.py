"""Front-end speed: whole-process wall time of `vlm check` and `vlm summary` on a tiny and a 7B spec.

Run by hand (`make bench` or `python bench/frontend.py`); appends a line to bench/RESULTS.md.
The reference in the same run is a bare `python -c pass` interpreter start, so the ratio shows how
much the front end costs on top of starting Python on this machine. Goal: < 0.5 s per command.
"""

from __future__ import annotations

import datetime as dt
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VLM = [sys.executable, "-m", "vlmspec.cli"]
SPEC = "specs/llava-1.5-7b.vlm"
REPEAT = 7


def wall(cmd: list[str]) -> float:
    times = []
    for _ in range(REPEAT):
        t = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    python = wall([sys.executable, "-c", "pass"])
    rows = []
    for model in ("llava_1_5_7b_tiny", "llava_1_5_7b"):
        for command in ("check", "summary"):
            t = wall([*VLM, command, f"{SPEC}:{model}"])
            rows.append((command, model, t))
            print(f"vlm {command:8s} {model:20s} {t * 1000:7.0f} ms  ({t / python:5.1f}x python start)"
                  f"  {'ok' if t < 0.5 else 'OVER 0.5 s'}")
    print(f"python -c pass           {python * 1000:7.0f} ms")
    line = (f"| {dt.date.today()} | `python bench/frontend.py` | "
            + ", ".join(f"{c} {m}: {t * 1000:.0f} ms" for c, m, t in rows)
            + f" | python start {python * 1000:.0f} ms; worst {max(t for *_, t in rows) / python:.1f}x python start |\n")
    results = ROOT / "bench" / "RESULTS.md"
    if not results.exists():
        results.write_text("# Benchmark results\n\n| date | command | figures | ratio |\n|---|---|---|---|\n")
    with results.open("a") as f:
        f.write(line)


if __name__ == "__main__":
    main()
