"""Decode-step latency: eager vs torch.compile (inductor) vs the exported `.pt2` decode step.

Two models, same process: the tiny LLaVA of specs/llava-1.5-7b.vlm and a small one (width 256,
4 layers). For each, one left-padded prompt batch is prefilled, then the same greedy decode loop runs
`--steps` steps with

- eager:         the model's own cached decoding (`model(tok, cache=KVCache)`, the path `generate` takes);
- eager static:  the export's decode-step module run eagerly (static, mask-written cache), to separate
                 the cache layout from compilation;
- compile:       that module under `torch.compile` (inductor, static shapes: no recompiles across steps);
- pt2:           the `decoder_step.pt2` that `export_model` writes, loaded with `torch.export.load`;
- aoti (--aoti): that program compiled ahead of time by AOTInductor (batch >= 2: at batch 1 the
                 batch-dynamic AOTInductor build returns NaN on torch 2.13, so it is skipped there).

Prints per-step latency (best of `--repeats` loops / steps), cold compile times, whether every variant
chose the same tokens, and speed-ups vs eager (> 1.0 = faster); appends one line to bench/RESULTS.md.
Run by hand:

    .venv/bin/python bench/decode_compile.py [--batch 1] [--steps 32] [--repeats 5] [--threads N] [--aoti]
                                             [--no-record]
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = f"{ROOT / 'specs' / 'llava-1.5-7b.vlm'}:llava_1_5_7b_tiny"
SMALL = """
model small {
  vision clip = vit { image_size = 64  patch_size = 8  width = 256  depth = 4  heads = 4  mlp = 1024
                      feature = layer(-2).patches }
  connector proj = mlp(clip -> llm) { layers = 2  act = gelu }
  language llm = llama { width = 256  depth = 4  heads = 4  ffn = 1024  vocab = 4096  max_positions = 512 }
  fusion prefix(proj -> llm) { tokens = 64 }
}
"""

Step = Callable[[torch.Tensor, int], torch.Tensor]  # (token [b], step t) -> logits [b x vocab]


def build(ref: str):
    from vlmspec.compiler.compile import load_analysis
    from vlmspec.runtime.model import build_model

    analysis, _ = load_analysis(ref)
    torch.manual_seed(0)
    return analysis, build_model(analysis).eval()


def inputs(model, batch: int, text: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Left-padded prompts: bos, the image tokens, `text` words (row i shorter by 2 i tokens)."""
    g = torch.Generator().manual_seed(1)
    n = model.llm.c.vocab
    cfg = next(model.components[c].cfg for c in model.order if model.roles[c] == "vision")
    tokens = sum(f.shape[1] for f in model.encode_images(torch.zeros(1, 3, cfg.image_size, cfg.image_size)).values())
    ids = torch.cat([torch.ones(batch, 1, dtype=torch.long), torch.full((batch, tokens), model.image_token_id),
                     torch.randint(2, n - 2, (batch, text), generator=g)], dim=1)
    mask = torch.ones_like(ids)
    for i in range(batch):
        mask[i, : 2 * i] = 0
    feats = model.encode_images(torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=g))
    return ids, mask, feats


def eager_loop(model, ids, mask, feats, steps: int) -> Callable[[], list[torch.Tensor]]:
    """The eager cached path from the same post-prefill cache each run (copied outside the timing)."""
    from vlmspec.runtime.decoding import KVCache

    cache0 = KVCache(reserve=ids.shape[1] + steps)
    first = model(ids, attention_mask=mask, image_features=feats, cache=cache0, logits_to_keep=1).logits[:, -1]
    prepared: list[KVCache] = []

    def run() -> list[torch.Tensor]:
        cache = prepared.pop() if prepared else copy.deepcopy(cache0)
        full, tok, out = mask, first.argmax(-1), []
        for _ in range(steps):
            full = torch.cat([full, torch.ones_like(full[:, :1])], dim=1)
            tok = model(tok[:, None], attention_mask=full, cache=cache, logits_to_keep=1).logits[:, -1].argmax(-1)
            out.append(tok)
        prepared.append(copy.deepcopy(cache0))  # the next run's fresh cache, made outside its timing
        return out

    return run


def static_loop(step_fn, prefill_out, ids, mask, max_len: int, steps: int) -> Callable[[], list[torch.Tensor]]:
    """The export's decode step (any implementation of it) over the static cache from prefill."""
    logits0, keys0, values0 = prefill_out[0], prefill_out[1], prefill_out[2]
    b, s = ids.shape

    def run() -> list[torch.Tensor]:
        slots = torch.zeros(b, max_len, dtype=torch.long)
        slots[:, :s] = mask
        pos = mask.sum(1, keepdim=True)
        keys, values, tok, out = keys0, values0, logits0.argmax(-1), []
        for t in range(steps):
            slots[:, s + t] = 1
            logits, keys, values = step_fn(tok[:, None], pos + t, slots, keys, values,
                                           torch.tensor([s + t]))[:3]
            tok = logits.argmax(-1)
            out.append(tok)
        return out

    return run


def best(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_model(label: str, ref: str, args: argparse.Namespace) -> dict[str, float | bool]:
    from vlmspec.runtime.export import export_model
    from vlmspec.runtime.export.api import _wrappers
    from vlmspec.runtime.export.interface import DECODE, PREFILL, Interface

    analysis, model = build(ref)
    with torch.no_grad():
        ids, mask, feats = inputs(model, args.batch, args.text)
        max_len = ids.shape[1] + args.steps + 8
        iface = Interface.of(model, max_len, max(args.batch, 2))
        wrappers = _wrappers(model, iface)
        prefill_out = wrappers[PREFILL](ids, mask, *(feats[f] for f in iface.fusions))
        decode = wrappers[DECODE]
        loops = {"eager": eager_loop(model, ids, mask, feats, args.steps),
                 "eager static": static_loop(decode, prefill_out, ids, mask, max_len, args.steps)}
        cold: dict[str, float] = {}

        compiled = torch.compile(decode, dynamic=False)
        loop = static_loop(compiled, prefill_out, ids, mask, max_len, args.steps)
        t0 = time.perf_counter()
        loop()
        cold["compile"] = time.perf_counter() - t0
        loops["compile"] = loop

        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            export_model(model, Path(d) / "out", ["pt2"], max_len=max_len, analysis=analysis,
                         max_batch=max(args.batch, 2))
            cold["export"] = time.perf_counter() - t0
            ep = torch.export.load(str(Path(d) / "out" / "decoder_step.pt2"))
            loops["pt2"] = static_loop(ep.module(), prefill_out, ids, mask, max_len, args.steps)
            if args.aoti and args.batch == 1:
                print("  aoti skipped: at batch 1 the AOTInductor build of a batch-dynamic program returns NaN "
                      "here (torch 2.13, 0/1 specialisation); use --batch 2")
            elif args.aoti:
                t0 = time.perf_counter()
                package = torch._inductor.aoti_compile_and_package(ep, package_path=str(Path(d) / "step.pt2"))
                aoti = torch._inductor.aoti_load_package(package)
                cold["aoti"] = time.perf_counter() - t0
                loops["aoti"] = static_loop(aoti, prefill_out, ids, mask, max_len, args.steps)

            tokens = {k: torch.stack(fn(), 1) for k, fn in loops.items()}
            same = all(torch.equal(t, tokens["eager"]) for t in tokens.values())
            ms = {k: best(fn, args.repeats) / args.steps * 1e3 for k, fn in loops.items()}
    print(f"\n{label}: width {model.llm.c.width}, depth {model.llm.c.depth}, batch {args.batch}, prompt "
          f"{ids.shape[1]} tokens, cache {max_len}, {args.steps} steps; same tokens everywhere: {same}")
    for k, v in ms.items():
        extra = f"   (cold {cold[k]:.1f} s)" if k in cold else ""
        print(f"  {k:13s} {v:8.3f} ms/step   x{ms['eager'] / v:5.2f} vs eager{extra}")
    print(f"  export (pt2, three programs) took {cold['export']:.1f} s")
    return {**{f"ms_{k}": v for k, v in ms.items()}, "same": same}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--text", type=int, default=16, help="text tokens after the image in each prompt")
    ap.add_argument("--steps", type=int, default=32, help="decode steps per timed loop")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--aoti", action="store_true", help="also time the .pt2 compiled by AOTInductor (~25 s each)")
    ap.add_argument("--no-record", action="store_true", help="print only; do not append to bench/RESULTS.md")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    with tempfile.TemporaryDirectory() as d:
        small = Path(d) / "small.vlm"
        small.write_text(SMALL)
        results = {"tiny": bench_model("tiny (llava_1_5_7b_tiny)", TINY, args),
                   "small": bench_model("small (width 256, 4 layers)", f"{small}:small", args)}

    def figures(r: dict) -> str:
        parts = [f"{k[3:]} {v:.2f}" for k, v in r.items() if k.startswith("ms_")]
        return ", ".join(parts) + " ms/step"

    def ratios(r: dict) -> str:
        return ", ".join(f"{k[3:]} {r['ms_eager'] / v:.2f}x" for k, v in r.items()
                         if k.startswith("ms_") and k not in ("ms_eager", "ms_eager static"))

    cmd = (f"`python bench/decode_compile.py --batch {args.batch} --steps {args.steps} --threads "
           f"{torch.get_num_threads()}{' --aoti' if args.aoti else ''}`")
    same = results["tiny"]["same"] and results["small"]["same"]
    line = (f"| {dt.date.today()} | {cmd} | tiny: {figures(results['tiny'])}; small: {figures(results['small'])}; "
            f"same tokens {same} | vs eager: tiny {ratios(results['tiny'])}; small {ratios(results['small'])} |\n")
    if args.no_record:
        print("\n" + line.strip())
        return
    with (ROOT / "bench" / "RESULTS.md").open("a") as f:
        f.write(line)
    print("\nappended to bench/RESULTS.md:\n" + line.strip())


if __name__ == "__main__":
    main()
