"""Forward latency and generation speed: vlmspec's prefix-fusion model vs Hugging Face's Llava.

Both models hold identical weights (copied from the HF model by a key mapping), run in one process,
fp32, under `torch.no_grad()`. Run by hand:

    .venv/bin/python bench/forward.py [--batch 4] [--new-tokens 32] [--repeats 10] [--threads N]
                                      [--device cuda] [--dtype bf16]

On a GPU (`--device cuda --dtype bf16`, as scripts/gpu_check.sh runs it) both models are moved there in
that dtype and every timing waits for the device (`torch.cuda.synchronize`).

Prints best-of-N forward latency and greedy-generation tokens/s for both, and the ratios
(> 1.0 means vlmspec is faster). The generated tokens are checked to be identical.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

WIDTH, DEPTH, HEADS, FFN, VOCAB, IMAGE, PATCH = 256, 4, 4, 1024, 4096, 64, 8
TOKENS = (IMAGE // PATCH) ** 2
IMAGE_TOKEN = VOCAB - 1

SPEC = f"""
model bench {{
  vision clip = vit {{ image_size = {IMAGE}  patch_size = {PATCH}  width = {WIDTH}  depth = {DEPTH}  heads = {HEADS}
                       mlp = {FFN}  feature = layer(-2).patches }}
  connector proj = mlp(clip -> llm) {{ layers = 2  act = gelu }}
  language llm = llama {{ width = {WIDTH}  depth = {DEPTH}  heads = {HEADS}  ffn = {FFN}  vocab = {VOCAB}
                          max_positions = 512  norm_eps = 1e-6 }}
  fusion prefix(proj -> llm) {{ tokens = {TOKENS} }}
}}
"""


def hf_model():
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    cfg = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=WIDTH, intermediate_size=FFN,
                           num_hidden_layers=DEPTH, num_attention_heads=HEADS, image_size=IMAGE, patch_size=PATCH,
                           projection_dim=WIDTH),
        text_config=dict(model_type="llama", vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=FFN,
                         num_hidden_layers=DEPTH, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                         max_position_embeddings=512),
        image_token_id=IMAGE_TOKEN, image_seq_length=TOKENS, vision_feature_select_strategy="default",
        vision_feature_layer=-2)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.generation_config.eos_token_id = None  # both decode exactly max_new_tokens
    model.generation_config.pad_token_id = 0
    return model


def hf_key(k: str) -> str:
    for hf, ours in (("model.vision_tower.", "components.clip."), ("model.multi_modal_projector.", "components.proj."),
                     ("model.language_model.", "components.llm.model."), ("lm_head.", "components.llm.lm_head.")):
        if k.startswith(hf):
            return ours + k[len(hf):]
    raise KeyError(k)


def ours_model(hf):
    from vlmspec.compiler.compile import load_analysis
    from vlmspec.runtime.model import build_model

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "bench.vlm"
        path.write_text(SPEC)
        analysis, _ = load_analysis(f"{path}:bench")
    model = build_model(analysis, image_token_id=IMAGE_TOKEN).eval()
    model.load_state_dict({hf_key(k): v for k, v in hf.state_dict().items()})
    return model


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed_pair(a: Callable[[], object], b: Callable[[], object], repeats: int, warmup: int = 2) -> tuple[float, float]:
    """Best-of-N seconds of a and b, run alternately: load from other processes hits both alike, and the
    minimum is the least disturbed estimate of each one's own cost (as `timeit` recommends)."""
    for _ in range(warmup):
        a()
        b()
    ta, tb = [], []
    for _ in range(repeats):
        for fn, times in ((a, ta), (b, tb)):
            _sync()
            t0 = time.perf_counter()
            fn()
            _sync()
            times.append(time.perf_counter() - t0)
    return min(ta), min(tb)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--text", type=int, default=32, help="text tokens after the image in each prompt")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hf = hf_model()
    ours = ours_model(hf)
    dev = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    hf, ours = hf.to(dev, dtype), ours.to(dev, dtype)
    g = torch.Generator().manual_seed(1)
    b = args.batch
    ids = torch.cat([torch.ones(b, 1, dtype=torch.long), torch.full((b, TOKENS), IMAGE_TOKEN),
                     torch.randint(2, VOCAB - 2, (b, args.text), generator=g)], dim=1).to(dev)
    mask = torch.ones_like(ids)
    px = torch.randn(b, 3, IMAGE, IMAGE, generator=g).to(dev, dtype)

    with torch.no_grad():
        diff = (hf(input_ids=ids, attention_mask=mask, pixel_values=px).logits
                - ours(ids, attention_mask=mask, pixel_values=px).logits).abs().max().item()
        t_hf, t_ours = timed_pair(lambda: hf(input_ids=ids, attention_mask=mask, pixel_values=px),
                                  lambda: ours(ids, attention_mask=mask, pixel_values=px), args.repeats)

        n = args.new_tokens
        out_hf = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=n,
                             do_sample=False)[:, ids.shape[1]:]
        out_ours = ours.generate(ids, attention_mask=mask, pixel_values=px, max_new_tokens=n)
        same = torch.equal(out_hf, out_ours)
        g_hf, g_ours = timed_pair(
            lambda: hf.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=n,
                                do_sample=False),
            lambda: ours.generate(ids, attention_mask=mask, pixel_values=px, max_new_tokens=n),
            max(5, args.repeats // 2), warmup=1)

    tok = b * n
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"threads {torch.get_num_threads()}"
    print(f"torch {torch.__version__}, {where}, {args.dtype}, batch {b}, prompt {ids.shape[1]} tokens "
          f"({TOKENS} image), width {WIDTH}, depth {DEPTH}, {IMAGE} px")
    print(f"max |logits diff| = {diff:.2e}; generated tokens identical: {same}")
    print(f"forward   HF {t_hf * 1e3:8.2f} ms   vlmspec {t_ours * 1e3:8.2f} ms   ratio {t_hf / t_ours:5.2f}x")
    print(f"generate  HF {tok / g_hf:8.1f} tok/s vlmspec {tok / g_ours:8.1f} tok/s ratio {g_hf / g_ours:5.2f}x")
    if args.no_record:
        return
    import datetime as dt

    results = Path(__file__).resolve().parent / "RESULTS.md"
    command = f"python bench/forward.py --batch {b} " + (
        f"--device {args.device} --dtype {args.dtype}" if dev.type == "cuda" else f"--threads {torch.get_num_threads()}")
    with results.open("a") as f:
        f.write(f"| {dt.date.today()} | `{command}` | {where}, {args.dtype}: "
                f"forward HF {t_hf * 1e3:.1f} ms vs vlmspec {t_ours * 1e3:.1f} ms; generate HF {tok / g_hf:.0f} vs "
                f"vlmspec {tok / g_ours:.0f} tok/s; logits diff {diff:.1e}, tokens identical {same} | "
                f"forward {t_hf / t_ours:.2f}x, generate {g_hf / g_ours:.2f}x vs HF Llava |\n")


if __name__ == "__main__":
    main()
