"""Serving load test: N concurrent streaming clients for T seconds against `vlm serve`, batched vs one at a time.

    python bench/serve.py [--url URL] [--clients 8] [--seconds 30] [--max-tokens 16] [--no-record]

Without --url it starts two `vlm serve` processes on 127.0.0.1 for the tiny LLaVA (random weights,
a trained tokenizer): one batching continuously (max_batch = clients), one serving one request at a
time, and drives both with the same clients: the ratio of their throughputs is the batching gain.
Reports requests/s, tokens/s, p50/p95 latency, p50 time to first token, errors; appends to
bench/RESULTS.md (unless --no-record).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import io
import json
import socket
import statistics
import sys
import time
from pathlib import Path

import httpx
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def image_url(i: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), ((37 * i) % 255, (91 * i) % 255, (53 * i) % 255)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


async def client(url: str, stop_at: float, max_tokens: int, idx: int, out: list[dict], model: str = "m") -> None:
    """One streaming client sending requests back to back until `stop_at` (shared by bench/serve_peer.py)."""
    async with httpx.AsyncClient(timeout=120) as http:
        n = 0
        while time.perf_counter() < stop_at:
            body = {"model": model, "stream": True, "max_tokens": max_tokens, "temperature": 0, "messages": [
                {"role": "user", "content": [{"type": "text", "text": "What color is the shape?"},
                                             {"type": "image_url", "image_url": {"url": image_url(idx * 1000 + n)}}]}]}
            t0 = time.perf_counter()
            ttft, tokens, error, usage = None, 0, None, None
            try:
                async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                    if r.status_code != 200:
                        error = r.status_code
                    else:
                        async for line in r.aiter_lines():
                            if line.startswith("data: ") and line != "data: [DONE]":
                                event = json.loads(line[6:])
                                usage = (event.get("usage") or {}).get("completion_tokens", usage)
                                delta = event["choices"][0]["delta"].get("content")
                                if delta:
                                    ttft = ttft or time.perf_counter() - t0
                                    tokens += 1
            except httpx.HTTPError as e:
                error = type(e).__name__
            out.append({"latency": time.perf_counter() - t0, "ttft": ttft, "chunks": tokens, "error": error,
                        "tokens": usage if usage is not None else tokens})
            n += 1


def served_tokens(url: str) -> float | None:
    """vlm serve's count of generated tokens so far (None from a server without it)."""
    r = httpx.get(f"{url}/metrics")
    metrics = r.text if r.status_code == 200 else ""
    return next((float(x.split()[1]) for x in metrics.splitlines() if x.startswith("vlmspec_generated_tokens_total")),
                None)


def drive(url: str, clients: int, seconds: float, max_tokens: int, model: str = "m") -> dict:
    """Generated tokens come from the server's own count: vlm serve's /metrics, else the `usage` of each
    streamed completion (transformers serve), else the content chunks."""
    results: list[dict] = []
    before = served_tokens(url)
    stop_at = time.perf_counter() + seconds

    async def main() -> None:
        await asyncio.gather(*[client(url, stop_at, max_tokens, i, results, model) for i in range(clients)])

    t0 = time.perf_counter()
    asyncio.run(main())
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["error"] is None]
    lat = sorted(r["latency"] for r in ok) or [0.0]
    ttft = sorted(r["ttft"] for r in ok if r["ttft"] is not None) or [0.0]
    after = served_tokens(url)
    tokens = after - before if after is not None and before is not None else sum(r["tokens"] for r in ok)
    return {"requests": len(results), "ok": len(ok), "errors": len(results) - len(ok), "wall": wall,
            "rps": len(ok) / wall, "tokens_per_s": tokens / wall, "p50": statistics.median(lat),
            "p95": lat[int(0.95 * (len(lat) - 1))], "ttft_p50": statistics.median(ttft)}


def local_server(model_dir: str, max_batch: int):
    """`vlm serve` in its own process, as deployed: clients here do not compete with it for the GIL.

    One torch thread: the clients need the other core of a 2-core machine; with both, torch's spinning
    threads and the clients starve each other and the figures measure the scheduler.
    """
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "vlmspec.cli", "serve", model_dir, "--port", str(port),
                             "--max-batch", str(max_batch), "--max-queue", "256", "--threads", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, healthy(proc, f"http://127.0.0.1:{port}", 120, "vlm serve did not start")


def healthy(proc, url: str, seconds: float, failure: str) -> str:
    """`url` once the server answers /health; the process killed and RuntimeError(failure) if it does not
    within `seconds` (or exits first)."""
    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(failure)


def tiny_model() -> str:
    import tempfile

    import torch

    from vlmspec.compiler.compile import load_analysis
    from vlmspec.runtime.checkpoint import save_model_dir
    from vlmspec.runtime.inputs.synth import corpus
    from vlmspec.runtime.inputs.tokenizer import train_tokenizer
    from vlmspec.runtime.model import build_model

    analysis, _ = load_analysis(f"{ROOT}/specs/llava-1.5-7b.vlm:llava_1_5_7b_tiny")
    tok = train_tokenizer(corpus(), 400)
    torch.manual_seed(0)
    model = build_model(analysis, image_token_id=tok.convert_tokens_to_ids("<image>"))
    d = Path(tempfile.mkdtemp()) / "tiny"
    save_model_dir(model, analysis, d, tokenizer=tok)
    return str(d)


def fmt(name: str, r: dict) -> str:
    return (f"{name:12s} {r['ok']:5d} ok {r['errors']:3d} errors  {r['rps']:7.1f} req/s  {r['tokens_per_s']:8.1f} tok/s  "
            f"p50 {r['p50'] * 1000:6.0f} ms  p95 {r['p95'] * 1000:6.0f} ms  ttft p50 {r['ttft_p50'] * 1000:6.0f} ms")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--no-record", action="store_true", help="print the figures without appending to bench/RESULTS.md")
    args = ap.parse_args()
    if args.url:
        print(fmt("server", drive(args.url, args.clients, args.seconds, args.max_tokens)))
        return
    model_dir = tiny_model()
    rows = {}
    for name, batch in (("one-at-a-time", 1), ("batched", args.clients)):
        proc, url = local_server(model_dir, batch)
        try:
            rows[name] = drive(url, args.clients, args.seconds, args.max_tokens)
        finally:
            proc.terminate()
            proc.wait(10)
        print(fmt(name, rows[name]), flush=True)
    ratio = rows["batched"]["tokens_per_s"] / max(rows["one-at-a-time"]["tokens_per_s"], 1e-9)
    print(f"batched / one-at-a-time throughput: {ratio:.2f}x")
    if args.no_record:
        return
    line = (f"| {dt.date.today()} | `python bench/serve.py --clients {args.clients} --seconds {args.seconds:g}` | "
            f"batched {rows['batched']['tokens_per_s']:.0f} tok/s, {rows['batched']['rps']:.1f} req/s, "
            f"p50 {rows['batched']['p50'] * 1000:.0f} ms, ttft p50 {rows['batched']['ttft_p50'] * 1000:.0f} ms, "
            f"errors {rows['batched']['errors']}; one-at-a-time {rows['one-at-a-time']['tokens_per_s']:.0f} tok/s | "
            f"{ratio:.2f}x batched vs one at a time |\n")
    results = ROOT / "bench" / "RESULTS.md"
    with results.open("a") as f:
        f.write(line)


if __name__ == "__main__":
    main()
