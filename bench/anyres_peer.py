"""Forward latency and greedy generation of an any-resolution model (LLaVA-NeXT): vlmspec vs transformers'
`LlavaNextForConditionalGeneration` on the same checkpoint folder, in one process.

The HF model is made here (random weights, a few million parameters), saved with `save_pretrained`,
imported with `vlm import-hf` and built with its weights; both read the same non-square image, laid out
by their own processors (the pixels are checked equal), fp32, `torch.no_grad()`. Run by hand:

    .venv/bin/python bench/anyres_peer.py [--threads 2] [--repeats 10] [--new-tokens 32] [--no-record]

Prints best-of-N prefill latency and greedy tokens/s for both and the ratios (> 1.0: vlmspec faster), checks
the generated tokens are identical, and appends a row to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
IMAGE_TOKEN = 4000
PINPOINTS = [[64, 128], [128, 64], [128, 128], [192, 64]]


def hf_folder(out: Path):
    """A LLaVA-NeXT checkpoint folder: CLIP 64 px tiles of 8 px patches, a 4-layer Llama of width 256."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    cfg = transformers.LlavaNextConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=256, intermediate_size=1024,
                           num_hidden_layers=4, num_attention_heads=4, image_size=64, patch_size=8, projection_dim=256),
        text_config=dict(model_type="llama", vocab_size=4096, hidden_size=256, intermediate_size=1024,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=2048),
        image_token_id=IMAGE_TOKEN, image_grid_pinpoints=PINPOINTS, vision_feature_select_strategy="default",
        vision_feature_layer=-2)
    torch.manual_seed(0)
    model = transformers.LlavaNextForConditionalGeneration(cfg).eval()
    model.generation_config.eos_token_id = None  # both decode exactly max_new_tokens
    model.generation_config.pad_token_id = 0
    model.save_pretrained(str(out))
    proc = transformers.LlavaNextImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64},
                                                image_grid_pinpoints=PINPOINTS)
    proc.save_pretrained(str(out))
    return model, proc


def ours_model(folder: Path, tmp: Path):
    from vlmspec.compiler.compile import load_analysis
    from vlmspec.runtime.weights import build_with_weights, import_hf

    text, mapping = import_hf(folder)
    spec = tmp / "m.vlm"
    spec.write_text(text)
    analysis, _ = load_analysis(f"{spec}:{mapping['model']}")
    model, report = build_with_weights(analysis, image_token_id=mapping["image_token_id"])
    assert report.ok, report
    return model.eval()


def best(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        hf, proc = hf_folder(tmp / "hf")
        ours = ours_model(tmp / "hf", tmp)
        image = tmp / "wide.png"  # 150 x 70: the 64 x 128 canvas, two tiles plus the base, rows unpadded
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 256, (70, 150, 3), dtype=np.uint8)).save(image)
        theirs = proc(images=[Image.open(image)], return_tensors="pt")
        from vlmspec.runtime.inputs.images import ImageTransform

        vis = next(c for c in ours.components.values() if getattr(getattr(c, "cfg", None), "layout", "fixed") != "fixed")
        transform = ImageTransform.from_encoder(vis.cfg)
        item = transform(image)
        assert float((item.pixels - theirs["pixel_values"][0]).abs().max()) < 1e-5
        n = transform.tokens(item)
        px, sizes = transform.stack([item])
        ids = torch.tensor([[1, 5, 7] + [IMAGE_TOKEN] * n + list(range(9, 41))])

        with torch.no_grad():
            t_hf = best(lambda: hf(input_ids=ids, pixel_values=px, image_sizes=sizes), args.repeats)
            t_ours = best(lambda: ours(ids, pixel_values=px, image_sizes=sizes), args.repeats)
            runs = max(2, args.repeats // 3)
            g_hf = best(lambda: hf.generate(input_ids=ids, pixel_values=px, image_sizes=sizes,
                                            max_new_tokens=args.new_tokens, do_sample=False), runs)
            g_ours = best(lambda: ours.generate(ids, pixel_values=px, image_sizes=sizes,
                                                max_new_tokens=args.new_tokens), runs)
            a = hf.generate(input_ids=ids, pixel_values=px, image_sizes=sizes, max_new_tokens=args.new_tokens,
                            do_sample=False)[0, ids.shape[1]:].tolist()
            b = ours.generate(ids, pixel_values=px, image_sizes=sizes, max_new_tokens=args.new_tokens)[0].tolist()
    same = a == b[: len(a)]
    tok_hf, tok_ours = args.new_tokens / g_hf, args.new_tokens / g_ours
    line = (f"LLaVA-NeXT ({n} image tokens of a 150x70 image, {ids.shape[1]} in all; "
            f"{sum(p.numel() for p in hf.parameters()) / 1e6:.1f}M params, {args.threads} threads): "
            f"prefill vlmspec {t_ours * 1e3:.1f} ms vs transformers {t_hf * 1e3:.1f} ms; greedy {args.new_tokens} "
            f"tokens vlmspec {tok_ours:.0f} tok/s vs transformers {tok_hf:.0f} tok/s; tokens identical {same}")
    ratio = f"prefill {t_hf / t_ours:.2f}x, generate {tok_ours / tok_hf:.2f}x vlmspec vs transformers"
    print(line)
    print(ratio)
    if not args.no_record:
        cmd = "python bench/anyres_peer.py " + " ".join(sys.argv[1:])
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write(f"| {datetime.date.today()} | `{cmd.strip()}` | {line} | {ratio} |\n")


if __name__ == "__main__":
    main()
