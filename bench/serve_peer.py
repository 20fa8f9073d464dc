"""Peer serving benchmark: the same weights behind `vlm serve` and behind `transformers serve`.

    python bench/serve_peer.py [--clients 8] [--seconds 30] [--max-tokens 16] [--threads 1] [--no-record]

Builds the tiny LLaVA of bench/serve.py (random weights, a trained tokenizer), exports it with
`vlm export-hf` (weights, processor, chat template, generation config), serves the model folder with
`vlm serve` and the export with `transformers serve` (transformers' own OpenAI-compatible server;
`pip install -e .[bench]`), each in its own process on 127.0.0.1 with one torch thread (`--threads N`
gives transformers serve more), and drives both with bench/serve.py's streaming clients (same requests, greedy, `max_tokens`). One
request to each first checks they give the same completion and warms them up. Reports tokens/s,
requests/s, p50 latency and p50 time to first token side by side; appends to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import ROOT, drive, fmt, healthy, image_url, local_server, tiny_model  # noqa: E402


def transformers_server(hf_dir: str, threads: int) -> tuple[subprocess.Popen, str]:
    """`transformers serve HF_DIR --device cpu` on a free loopback port, its model preloaded."""
    exe = Path(sys.executable).with_name("transformers")
    exe_s = str(exe) if exe.is_file() else shutil.which("transformers")
    if exe_s is None:
        raise SystemExit("no `transformers` command: pip install -e .[bench]")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    proc = subprocess.Popen([exe_s, "serve", hf_dir, "--device", "cpu", "--host", "127.0.0.1", "--port", str(port),
                             "--log-level", "error"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, healthy(proc, f"http://127.0.0.1:{port}", 180,
                         "transformers serve did not start (is fastapi installed? pip install -e .[bench])")


def one_answer(url: str, model: str, max_tokens: int) -> str:
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What color is the shape?"}, {"type": "image_url", "image_url": {"url": image_url(7)}}]}]}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"]


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of transformers serve (vlm serve runs "
                    "with bench/serve.py's one: the clients need the other core)")
    ap.add_argument("--note", default="", help="appended to the RESULTS.md row (e.g. other load on the machine)")
    ap.add_argument("--no-record", action="store_true", help="print the figures without appending to bench/RESULTS.md")
    args = ap.parse_args()

    from vlmspec.runtime.weights.export import export_hf

    model_dir = tiny_model()
    hf_dir = str(export_hf(model_dir, Path(tempfile.mkdtemp()) / "hf"))
    rows, answers = {}, {}
    for name in ("vlm serve", "transformers serve"):
        if name == "vlm serve":
            proc, url = local_server(model_dir, args.clients)
        else:
            proc, url = transformers_server(hf_dir, args.threads)
        try:
            answers[name] = one_answer(url, hf_dir, args.max_tokens)  # also warms the server up
            rows[name] = drive(url, args.clients, args.seconds, args.max_tokens, model=hf_dir)
        finally:
            stop(proc)
        print(fmt(name.split()[0], rows[name]), flush=True)
    same = answers["vlm serve"].strip() == answers["transformers serve"].strip()
    print(f"same completion: {same} ({answers['vlm serve']!r} vs {answers['transformers serve']!r})")
    ours, theirs = rows["vlm serve"], rows["transformers serve"]
    ratio = ours["tokens_per_s"] / max(theirs["tokens_per_s"], 1e-9)
    print(f"vlm serve / transformers serve throughput: {ratio:.2f}x")
    if args.no_record:
        return

    def cells(r: dict) -> str:
        return (f"{r['tokens_per_s']:.0f} tok/s, {r['rps']:.1f} req/s, p50 {r['p50'] * 1000:.0f} ms, "
                f"ttft p50 {r['ttft_p50'] * 1000:.0f} ms, errors {r['errors']}")

    note = f" ({args.note})" if args.note else ""
    threads = f" --threads {args.threads}" if args.threads != 1 else ""
    line = (f"| {dt.date.today()} | `python bench/serve_peer.py --clients {args.clients} --seconds {args.seconds:g} "
            f"--max-tokens {args.max_tokens}{threads}` | vlm serve {cells(ours)}; transformers serve {cells(theirs)}; "
            f"same completion {same}{note} | {ratio:.2f}x vlm serve vs transformers serve |\n")
    with (ROOT / "bench" / "RESULTS.md").open("a") as f:
        f.write(line)


if __name__ == "__main__":
    main()
