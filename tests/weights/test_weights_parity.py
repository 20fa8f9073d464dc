"""Import tiny Hugging Face VLMs through `import_hf` + `build_with_weights` and compare with the
reference classes (randomised, and seeing the image): logits within 1e-4 (fp32) and 16 greedy tokens
identical."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from hf_tiny import IMAGE_TOKEN, NQ, assert_sees_image, blip2, blip_configs, imported, llava, randomise  # noqa: E402

transformers = pytest.importorskip("transformers")


def _ids(n_image: int, pad: int, rows: int = 2, seed: int = 4):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(rows):
        p = pad * i
        out.append(torch.cat([torch.zeros(p, dtype=torch.long), torch.tensor([1]), torch.full((n_image,), IMAGE_TOKEN),
                              torch.randint(3, 99, (8 - p,), generator=g)]))
    ids = torch.stack(out)
    mask = (torch.arange(ids.shape[1])[None] >= torch.tensor([[pad * i] for i in range(rows)])).long()
    return ids, mask


def assert_parity(hf, ours, ids, mask, px) -> None:
    """Logits at real positions within 1e-4, and 16 greedy tokens identical (no early stop); the
    reference's logits depend on the image."""
    assert_sees_image(lambda p: hf(input_ids=ids, attention_mask=mask, pixel_values=p).logits, px, real=mask.bool())
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, pixel_values=px).logits
        out = ours(ids, attention_mask=mask, pixel_values=px).logits
        real = mask.bool()
        assert (ref[real] - out[real]).abs().max() <= 1e-4
        want = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=16, min_new_tokens=16,
                           do_sample=False, pad_token_id=0, eos_token_id=None)[:, ids.shape[1]:]
    assert torch.equal(ours.generate(ids, attention_mask=mask, pixel_values=px, max_new_tokens=16), want)


LLAVA = {"gqa_layer-2": dict(layer=-2), "layer-1": dict(layer=-1), "tied": dict(tie=True, layer=-2),
         "mha_two_layers": dict(layer=[-2, -1], kv_heads=4)}


@pytest.mark.parametrize("variant", list(LLAVA))
def test_llava_parity(tmp_path, variant):
    kw = LLAVA[variant]
    hf = llava(transformers, tmp_path / "hf", **kw)
    ours, report, _ = imported(tmp_path / "hf", tmp_path)
    assert report.ok and all(c.status in ("loaded", "no tensors") for c in report.components.values())
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())
    if kw.get("tie"):
        assert ours.components["llm"].lm_head.weight is ours.components["llm"].model.embed_tokens.weight
    ids, mask = _ids(16, 3)
    assert_parity(hf, ours, ids, mask, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)))


def test_llava_two_images_per_prompt(tmp_path):
    hf = llava(transformers, tmp_path / "hf")
    ours, _, _ = imported(tmp_path / "hf", tmp_path)
    ids, mask = _ids(32, 0)
    px = torch.randn(2, 2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    assert_sees_image(lambda p: hf(input_ids=ids, attention_mask=mask, pixel_values=p.flatten(0, 1)).logits, px)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, pixel_values=px.flatten(0, 1)).logits
        out = ours(ids, attention_mask=mask, pixel_values=px).logits
        assert (ref - out).abs().max() <= 1e-4
        want = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=px.flatten(0, 1), max_new_tokens=16,
                           min_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=None)[:, ids.shape[1]:]
    assert torch.equal(ours.generate(ids, attention_mask=mask, pixel_values=px, max_new_tokens=16), want)


def test_blip2_opt_parity(tmp_path):
    hf = blip2(transformers, tmp_path / "hf")
    ours, report, mapping = imported(tmp_path / "hf", tmp_path)
    assert report.ok, str(report)
    assert report.components["llm"].tied == ["lm_head.weight"]
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())
    g = torch.Generator().manual_seed(5)
    ids = torch.cat([torch.full((2, NQ), IMAGE_TOKEN), torch.tensor([[2], [2]]), torch.randint(3, 99, (2, 8), generator=g)], 1)
    mask = torch.ones_like(ids)
    px = torch.randn(2, 3, 32, 32, generator=g)
    assert_sees_image(lambda p: hf(input_ids=ids, attention_mask=mask, pixel_values=p).logits, px)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, pixel_values=px).logits
        out = ours(ids, attention_mask=mask, pixel_values=px).logits
        assert (ref - out).abs().max() <= 1e-4
        want = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=16, min_new_tokens=16,
                           do_sample=False, pad_token_id=1, eos_token_id=None)
    got = ours.generate(ids, attention_mask=mask, pixel_values=px, max_new_tokens=16)
    assert torch.equal(got, want[:, -16:])


def test_instructblip_imports_with_full_coverage(tmp_path):
    """InstructBLIP: spec + weights import with every key placed (logit parity, with the Q-Former's
    instruction input: test_parity_instructblip.py)."""
    transformers.utils.logging.disable_progress_bar()
    cfg = transformers.InstructBlipConfig(**blip_configs())
    torch.manual_seed(0)
    hf = transformers.InstructBlipForConditionalGeneration(cfg).eval()
    randomise(hf)
    hf.save_pretrained(str(tmp_path / "hf"))
    ours, report, _ = imported(tmp_path / "hf", tmp_path)
    assert report.ok, str(report)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())
