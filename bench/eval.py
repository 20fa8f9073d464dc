"""`vlm eval` throughput: batched evaluation vs a plain loop of single-sample `generate` calls, same run.

    .venv/bin/python bench/eval.py [MODEL_DIR] [--data demo-out/shapes/test_vqa.jsonl] [--batch 16]

Without MODEL_DIR it uses `demo-out/run/final` when `make demo` has run, else builds the tiny LLaVA
with random weights and a synthetic data set. Both paths generate with the same greedy settings and
must give the same predictions; the ratio of samples/s is appended to bench/RESULTS.md. Goal: >= 3x.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def default_model() -> tuple[str, str]:
    demo = ROOT / "demo-out"
    if (demo / "run" / "final" / "config.json").is_file() and (demo / "shapes" / "test_vqa.jsonl").is_file():
        return str(demo / "run" / "final"), str(demo / "shapes" / "test_vqa.jsonl")
    import torch

    from vlmspec.compiler.compile import load_analysis
    from vlmspec.runtime.checkpoint import save_model_dir
    from vlmspec.runtime.inputs.synth import corpus, synthesize
    from vlmspec.runtime.inputs.tokenizer import train_tokenizer
    from vlmspec.runtime.model import build_model

    d = Path(tempfile.mkdtemp())
    synthesize(d / "shapes", n_train=10, n_test=100, size=64)
    analysis, _ = load_analysis(f"{ROOT}/specs/llava-1.5-7b.vlm:llava_1_5_7b_tiny")
    tok = train_tokenizer(corpus(), 400)
    torch.manual_seed(0)
    save_model_dir(build_model(analysis, image_token_id=tok.convert_tokens_to_ids("<image>")), analysis,
                   d / "model", tokenizer=tok)
    return str(d / "model"), str(d / "shapes" / "test_vqa.jsonl")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("--data")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable figures on a shared 2-core box)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    model_dir, data = (args.model, args.data) if args.model else default_model()
    data = args.data or data

    from vlmspec.evaluation import run_eval
    from vlmspec.runtime.checkpoint import load
    from vlmspec.runtime.inference import answer

    model = load(model_dir)
    rows = [json.loads(x) for x in Path(data).read_text().splitlines() if x.strip()]
    base = Path(data).parent
    run_eval(model, "vqa", data, batch_size=args.batch, max_new_tokens=args.max_new_tokens, progress=False, limit=8)
    t0 = time.perf_counter()
    res = run_eval(model, "vqa", data, batch_size=args.batch, max_new_tokens=args.max_new_tokens, progress=False)
    batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    single = [answer(model, [r["question"]], [str(base / r["image"])], max_new_tokens=args.max_new_tokens)[0]
              for r in rows]
    loop = time.perf_counter() - t0
    preds = [s["prediction"] for s in res["samples"]]
    same = sum(a == b for a, b in zip(preds, single, strict=False))
    n = len(rows)
    ratio = loop / batched
    print(f"{n} questions: vlm eval (batch {args.batch}) {n / batched:.1f} samples/s, single-sample loop "
          f"{n / loop:.1f} samples/s -> {ratio:.2f}x; same predictions {same}/{n}; "
          f"accuracy {res['metrics']['vqa_accuracy']:.1f}")
    with (ROOT / "bench" / "RESULTS.md").open("a") as f:
        f.write(f"| {dt.date.today()} | `python bench/eval.py` ({n} VQA questions, {Path(model_dir).name}) | "
                f"batched {n / batched:.1f} samples/s vs single-sample generate loop {n / loop:.1f} samples/s; "
                f"{same}/{n} identical predictions | {ratio:.2f}x batched vs one at a time |\n")


if __name__ == "__main__":
    main()
