"""`quantize = int8` on the language model: less memory, the same greedy answers."""

from __future__ import annotations

from pathlib import Path

import torch

from vlmspec.compiler.compile import check_file
from vlmspec.runtime.model import build_model
from vlmspec.runtime.quantize import apply_quantization, model_bytes

SPEC = """
model small {
  vision clip = vit { image_size = 32  patch_size = 8  width = 64  depth = 2  heads = 4 }
  connector proj = mlp(clip -> llm)
  language llm = llama { width = 256  depth = 4  heads = 8  kv_heads = 4  ffn = 512  vocab = 512  quantize = int8 }
  fusion prefix(proj -> llm)
}
"""


def test_int8_language_model(tmp_path: Path) -> None:
    path = tmp_path / "small.vlm"
    path.write_text(SPEC)
    analysis = check_file(str(path)).analyses[0]
    torch.manual_seed(0)
    model = build_model(analysis).eval()
    ids = torch.randint(0, 500, (20, 12))
    prompts = torch.cat([torch.full((20, 16), model.image_token_id), ids], dim=1)
    pixels = torch.randn(20, 3, 32, 32)
    with torch.no_grad():
        base = model.generate(prompts, pixel_values=pixels, max_new_tokens=8)
    before = model_bytes(model.components["llm"])
    done = apply_quantization(model, analysis)
    after = model_bytes(model.components["llm"])
    assert done == {"llm": 4 * 7 + 1}  # q, k, v, o, gate, up, down per layer, and the head
    assert after < 0.6 * before, (before, after)
    with torch.no_grad():
        quant = model.generate(prompts, pixel_values=pixels, max_new_tokens=8)
    agree = sum(bool(torch.equal(a, b)) for a, b in zip(base, quant, strict=True))
    print(f"int8 llm: {after / before:.3f}x the fp32 bytes; {agree}/20 greedy continuations identical")
    assert agree >= 16
