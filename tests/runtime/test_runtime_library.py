"""Every `_tiny` model of the spec library builds with the closed-form parameter count, trains a step and
generates the same tokens with and without the cache. (The library grows; this follows it.)"""

from __future__ import annotations

import math

import pytest
import torch
from runtime_helpers import SPECS, image_tokens, labels_for, pixels, prompts

from vlmspec.compiler.compile import load_analysis
from vlmspec.runtime.model import build_model


def _tiny_refs() -> list[str]:
    refs = []
    for path in sorted(SPECS.glob("*.vlm")):
        text = path.read_text()
        refs += [f"{path}:{line.split()[1]}" for line in text.splitlines()
                 if line.startswith("model ") and line.split()[1].endswith("_tiny")]
    return refs


@pytest.mark.parametrize("ref", _tiny_refs(), ids=lambda r: r.rsplit(":", 1)[1])
def test_library_model_runs(ref):
    analysis, _ = load_analysis(ref)
    torch.manual_seed(0)
    model = build_model(analysis)
    assert sum(p.numel() for p in model.parameters()) == analysis.shapes.grand_total
    for name in analysis.ir.components:
        assert sum(p.numel() for p in model.components[name].parameters()) == analysis.shapes.total(name), name
    if analysis.ir.by_role("audio"):
        pytest.skip("an audio model reads clips, not pixels: tests/weights/test_parity_qwen2_audio.py runs it")
    if analysis.ir.by_role("text"):  # contrastive (CLIP / SigLIP): a loss on image-caption pairs, nothing generates
        from vlmspec.runtime.contrastive_inputs import ContrastiveProcessor
        from vlmspec.runtime.inputs.tokenizer import byte_tokenizer

        ids, mask = ContrastiveProcessor(analysis, byte_tokenizer(())).captions(["a red circle", "a blue square"])
        loss = model.loss(pixels(analysis), ids, mask)
        assert math.isfinite(float(loss.detach()))
        return  # generation: tests/train/test_contrastive_train.py checks that it is refused (E0615)
    ids, mask = prompts(model.image_token_id, image_tokens(analysis), text=4)
    px = pixels(analysis)
    out = model(ids, attention_mask=mask, pixel_values=px, labels=labels_for(ids, mask, model.image_token_id))
    assert math.isfinite(float(out.loss.detach()))
    model.eval()
    cached = model.generate(ids, attention_mask=mask, pixel_values=px, max_new_tokens=4)
    assert torch.equal(cached, model.generate(ids, attention_mask=mask, pixel_values=px, max_new_tokens=4,
                                              use_cache=False))
