"""Import time and peak memory: vlmspec's `build_with_weights` vs transformers' `from_pretrained`.

By hand, not a test:  .venv/bin/python bench/load.py [--width 2048 --depth 16 --vocab 32000 --dtype bf16]

A random Llama (~1B parameters at the defaults) is saved once with `save_pretrained` to a temp folder;
each method then runs in its own fresh subprocess, which reports the wall time of the load call and
the peak resident memory (VmHWM from /proc/self/status) minus the resident memory just before it,\nright after loading and again after touching every parameter (safetensors tensors are memory-mapped,\nso pages are only resident once read; the ratio uses the touched figure).
Appends one line to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _child(method: str, folder: str, dtype: str) -> None:
    import torch

    import vlmspec.runtime.model  # noqa: F401  (imports out of the timed region, for both methods)

    tdtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    if method == "hf":
        import transformers

        transformers.utils.logging.disable_progress_bar()
        base = _status("VmRSS")
        t0 = time.perf_counter()
        model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=tdtype)
    else:
        from vlmspec.compiler.compile import load_analysis
        from vlmspec.runtime.weights import build_with_weights

        cfg = json.loads((Path(folder) / "config.json").read_text())
        spec = Path(folder) / "bench.vlm"
        spec.write_text(f"""model bench {{
  vision enc = vit {{ image_size = 32  patch_size = 8  width = 32  depth = 1  heads = 2  mlp = 64 }}
  connector proj = linear(enc -> llm)
  language llm = llama {{ width = {cfg['hidden_size']}  depth = {cfg['num_hidden_layers']}
    heads = {cfg['num_attention_heads']}  kv_heads = {cfg['num_key_value_heads']}  ffn = {cfg['intermediate_size']}
    vocab = {cfg['vocab_size']}  max_positions = {cfg['max_position_embeddings']}  dtype = {dtype}
    weights = "{folder}" }}
  fusion prefix(proj -> llm)
}}
""")
        analysis, _ = load_analysis(f"{spec}:bench")
        base = _status("VmRSS")
        t0 = time.perf_counter()
        model, _ = build_with_weights(analysis)
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM") - base
    with torch.no_grad():  # fault every (memory-mapped) page in, as a first forward would
        n = sum(int(p.sum().isfinite()) * 0 + p.numel() for p in model.parameters())
    print(json.dumps({"seconds": seconds, "peak": peak, "touched": _status("VmHWM") - base, "params": n}))


def _run(method: str, folder: str, dtype: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", method, "--folder", folder, "--dtype", dtype],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--depth", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--child")
    ap.add_argument("--folder")
    a = ap.parse_args()
    if a.child:
        _child(a.child, a.folder, a.dtype)
        return
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = transformers.LlamaConfig(hidden_size=a.width, num_hidden_layers=a.depth, vocab_size=a.vocab,
                                       intermediate_size=a.ffn, num_attention_heads=a.width // 128,
                                       num_key_value_heads=max(1, a.width // 512), max_position_embeddings=2048)
        dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype]
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(cfg)
        model = model.to_empty(device="cpu").to(dt)
        for p in model.parameters():
            p.data.normal_(0, 0.02)
        model.save_pretrained(tmp)
        size = sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors"))
        del model
        res: dict[str, dict] = {}
        for method in ("hf", "vlmspec"):
            runs = [_run(method, tmp, a.dtype) for _ in range(a.repeat)]
            res[method] = {k: min(r[k] for r in runs) for k in ("seconds", "peak", "touched")}
            res[method]["params"] = runs[0]["params"]
    hf, ours = res["hf"], res["vlmspec"]
    t_ratio, m_ratio = ours["seconds"] / hf["seconds"], ours["touched"] / hf["touched"]
    gib = 1024**3
    print(f"checkpoint: {hf['params'] / 1e9:.3f}B params, {size / gib:.2f} GiB ({a.dtype}), {os.cpu_count()} CPUs")
    for name, r in res.items():
        print(f"  {name:8s} {r['seconds']:7.2f} s   peak after load +{r['peak'] / gib:.2f} GiB, "
              f"after touching every parameter +{r['touched'] / gib:.2f} GiB")
    print(f"  ratio vlmspec/hf: time {t_ratio:.2f}x (goal <= 1.0x), peak memory {m_ratio:.2f}x (goal <= 1.1x)")
    line = (f"| {datetime.date.today()} | `python bench/load.py --width {a.width} --depth {a.depth} --vocab {a.vocab}"
            f" --dtype {a.dtype}` | {hf['params'] / 1e9:.2f}B params, {size / gib:.2f} GiB; from_pretrained "
            f"{hf['seconds']:.2f} s / +{hf['touched'] / gib:.2f} GiB, vlmspec {ours['seconds']:.2f} s / "
            f"+{ours['touched'] / gib:.2f} GiB (peak VmHWM after touching every parameter) | time {t_ratio:.2f}x, memory {m_ratio:.2f}x |\n")
    with open(ROOT / "bench" / "RESULTS.md", "a") as f:
        f.write(line)


if __name__ == "__main__":
    main()
