"""Editor latency of `vlm lsp`: time from a `didChange` to the `publishDiagnostics` of that version, on a 7B spec.

    python bench/lsp_latency.py [--changes 60] [--spec specs/llava-1.5-7b.vlm] [--no-record]

The server is started once, as an editor starts it (the front end's import is paid then, and reported
apart as "start"); then the spec is changed `--changes` times, alternating an edit that checks clean
with one that introduces an error, and each change waits for the diagnostics of its own version before
the next. The figure includes the server's debounce (the quiet period it waits for more keystrokes,
50 ms by default) and the JSON-RPC round trip through pipes. Target (issue 21): within 150 ms.
Appends a line to bench/RESULTS.md unless --no-record. Run it alone (under the CPU lock on shared
machines): it measures wall time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "lsp"))
from lsp_client import LspClient, uri  # noqa: E402  (the tests' LSP client: one copy of the framing)

from vlmspec.lsp.server import DEBOUNCE_S  # noqa: E402

TARGET_MS = 150


def edits(text: str) -> list[str]:
    """Two versions of the spec that differ from it and from each other: one clean, one with an error."""
    clean = text.replace("batch 256", "batch 255", 1)
    broken = text.replace("layers = 2", "layers = 0", 1)
    assert clean != text and broken != text, "the spec lacks `batch 256` or `layers = 2`"
    return [clean, broken]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", default="specs/llava-1.5-7b.vlm")
    ap.add_argument("--changes", type=int, default=60)
    ap.add_argument("--no-record", action="store_true", help="print the figures without appending to bench/RESULTS.md")
    args = ap.parse_args()

    path = (ROOT / args.spec).resolve()
    text = path.read_text(encoding="utf-8")
    doc = uri(path)
    variants = edits(text)

    t0 = time.perf_counter()
    client = LspClient()
    try:
        client.initialize()
        start_ms = (time.perf_counter() - t0) * 1000
        client.open(doc, text)
        open_diags = client.notification("textDocument/publishDiagnostics", {"uri": doc, "version": 1})
        open_ms = (open_diags["_at"] - t0) * 1000 - start_ms
        latencies = []
        codes: dict[str, int] = {}
        for i in range(args.changes + 3):  # the first three warm the server's caches up and are not counted
            version = i + 2
            sent = client.change(doc, variants[i % 2], version)
            note = client.notification("textDocument/publishDiagnostics", {"uri": doc, "version": version})
            if i >= 3:
                latencies.append((note["_at"] - sent) * 1000)
                key = ",".join(d["code"] for d in note["params"]["diagnostics"]) or "clean"
                codes[key] = codes.get(key, 0) + 1
        status = client.shutdown()
    finally:
        client.kill()

    latencies.sort()
    median = statistics.median(latencies)
    p95 = latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))]
    print(f"server start + initialize: {start_ms:.0f} ms; first diagnostics after didOpen: {open_ms:.0f} ms")
    print(f"didChange -> publishDiagnostics over {len(latencies)} changes ({codes}): median {median:.1f} ms, "
          f"p95 {p95:.1f} ms, max {latencies[-1]:.1f} ms (target {TARGET_MS} ms); exit status {status}")
    if args.no_record:
        return
    line = (f"| {dt.date.today()} | `python bench/lsp_latency.py --changes {args.changes}` | didChange -> "
            f"publishDiagnostics on {args.spec} ({len(latencies)} changes, clean and E0202 alternating): median "
            f"{median:.0f} ms, p95 {p95:.0f} ms, max {latencies[-1]:.0f} ms, {DEBOUNCE_S * 1000:.0f} ms debounce included; server start + "
            f"initialize {start_ms:.0f} ms, first diagnostics {open_ms:.0f} ms after didOpen | "
            f"p95 {p95 / TARGET_MS:.2f}x the {TARGET_MS} ms target |\n")
    with (ROOT / "bench" / "RESULTS.md").open("a") as f:
        f.write(line)


if __name__ == "__main__":
    main()
