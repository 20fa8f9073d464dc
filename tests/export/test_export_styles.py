"""Each fusion style traces into the exported halves and matches eager, checked in memory (no files)
on small specs written here: the `moe` fusion style (MoE-LLaVA's experts as a fusion) and a
bf16 export. The tiny specs in specs/ are covered file to file by test_export_parity.py."""

from __future__ import annotations

import pytest
import torch
from export_helpers import build

from vlmspec.runtime.decoding import KVCache
from vlmspec.runtime.export.api import _wrappers
from vlmspec.runtime.export.interface import DECODE, PREFILL, Interface
from vlmspec.runtime.export.patches import exportable
from vlmspec.runtime.export.to_pt2 import trace
from vlmspec.runtime.language.moe import SparseMoE

MOE_FUSION = """
model m {
  vision enc = vit { image_size = 32  patch_size = 8  width = 32  depth = 1  heads = 2  mlp = 64
                     feature = layer(-1).patches }
  connector proj = mlp(enc -> llm) { layers = 2 }
  language llm = llama { width = 48  depth = 2  heads = 4  ffn = 96  vocab = 512  max_positions = 64 }
  fusion experts = moe(proj -> llm) { experts = 3  top_k = 2  every = 1  shared = 1 }
}
"""


def run_both(model, tmp_len: int = 64, dtype_tol: float = 1e-4):
    iface = Interface.of(model, tmp_len, 8)
    wrappers = _wrappers(model, iface)
    prefill = trace(wrappers[PREFILL], iface, PREFILL, model).module()
    decode = trace(wrappers[DECODE], iface, DECODE, model).module()
    n = iface.visual_spec(iface.fusions[0]).shape[1]
    ids = torch.randint(0, 400, (2, n + 5))
    ids[:, 2:2 + n] = model.image_token_id
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    feats = {f: torch.randn(2, *iface.visual_spec(f).shape[1:]).to(model.llm.dtype()) for f in iface.fusions}
    with torch.no_grad():
        cache = KVCache()
        eager = model(ids, attention_mask=mask, image_features=feats, cache=cache, logits_to_keep=1).logits[:, -1]
        logits, keys, values = prefill(ids, mask, *feats.values())
        assert float((logits - eager.float()).abs().max()) < dtype_tol
        s = ids.shape[1]
        slots = torch.zeros(2, tmp_len, dtype=torch.long)
        slots[:, :s] = mask
        tok = eager.float().argmax(-1)
        full = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        eager = model(tok[:, None], attention_mask=full, cache=cache, logits_to_keep=1).logits[:, -1]
        slots[:, s] = 1
        logits, _, _ = decode(tok[:, None], mask.sum(1, keepdim=True), slots, keys, values, torch.tensor([s]))
        assert float((logits - eager.float()).abs().max()) < dtype_tol


def test_moe_fusion_style_exports(tokenizer, tmp_path):
    spec = tmp_path / "moe.vlm"
    spec.write_text(MOE_FUSION)
    _, model = build(f"{spec}:m", tokenizer)
    run_both(model)
    assert all(type(m) is SparseMoE for m in model.modules() if isinstance(m, SparseMoE))  # swap undone


def test_exportable_swaps_routing_only_inside_the_block(tokenizer, tmp_path):
    spec = tmp_path / "moe.vlm"
    spec.write_text(MOE_FUSION)
    _, model = build(f"{spec}:m", tokenizer)
    moe = next(m for m in model.modules() if isinstance(m, SparseMoE))
    x = torch.randn(2, 5, 48)
    with torch.no_grad():
        want, _ = moe(x, torch.nn.Identity())
        with exportable(model):
            assert type(moe).__name__ == "DenseRoutedMoE"
            got, _ = moe(x, torch.nn.Identity())
    assert type(moe) is SparseMoE
    assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.slow
def test_bf16_export_matches_bf16_eager(tokenizer, tmp_path):
    from export_helpers import SPECS

    _, model = build(f"{SPECS / 'llava-1.5-7b.vlm'}:llava_1_5_7b_tiny", tokenizer)
    run_both(model.to(torch.bfloat16), tmp_len=128, dtype_tol=1e-2)


TILED_GROUPS = """
model m {
  vision enc = vit { image_size = 16  patch_size = 8  width = 32  depth = 3  heads = 2  mlp = 64  tiles = 2
                     global_layers = 1  tile_padding = 8  attn_bias = false  feature = layers([3, 1]).all }
  connector proj = linear(enc -> llm)
  language llm = llama { width = 48  depth = 3  heads = 4  ffn = 96  vocab = 512  embed_extra = 8
                         max_positions = 64 }
  fusion cross_attention(proj -> llm) { layers = [1, 2]  qk_norm = true  image_token = "<|image|>"
                                        image_attention = latest_group  no_image = attend_all }
  image_token_id = 512
}
"""


def test_tiled_latest_group_cross_attention_exports(tokenizer, tmp_path):
    """Llama 3.2 Vision's masks in the exported halves: prefill takes the aspect-ratio ids (which tiles
    are real) and returns what the prompt's last token sees; decode reads it back. Rows: one with a
    single-tile image, one with both tiles real, text before the image token (attends to all)."""
    spec = tmp_path / "tiled.vlm"
    spec.write_text(TILED_GROUPS)
    _, model = build(f"{spec}:m", tokenizer)
    with torch.no_grad():
        for p in model.parameters():  # gates start at 0 and would hide the cross-attention
            if p.numel() == 1:
                p.fill_(0.7)
    iface = Interface.of(model, 64, 8)
    assert iface.prefill_aspect and iface.masked == ["cross_attention"] and iface.embed_rows == 520
    wrappers = _wrappers(model, iface)
    prefill = trace(wrappers[PREFILL], iface, PREFILL, model).module()
    decode = trace(wrappers[DECODE], iface, DECODE, model).module()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 500, (2, 9), generator=g)
    ids[:, 3] = model.image_token_id
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    aspect = torch.tensor([1, 3])
    px = torch.randn(2, 2, 3, 16, 16, generator=g)
    with torch.no_grad():
        feats = model.encode_images(px, aspect_ratio_ids=aspect)
        cache = KVCache()
        eager = model(ids, attention_mask=mask, image_features=feats, cache=cache, logits_to_keep=1).logits[:, -1]
        logits, keys, values, *cross = prefill(ids, mask, aspect, feats["cross_attention"])
        assert float((logits - eager).abs().max()) < 1e-4
        assert cross[-1].shape == (2, 2 * 5) and cross[-1][0].tolist() == [1] * 5 + [0] * 5  # tile 2 pads
        s = ids.shape[1]
        slots = torch.zeros(2, 64, dtype=torch.long)
        slots[:, :s] = mask
        full = mask
        for t in range(2):
            tok = eager.argmax(-1)
            full = torch.cat([full, torch.ones(2, 1, dtype=torch.long)], 1)
            eager = model(tok[:, None], attention_mask=full, cache=cache, logits_to_keep=1).logits[:, -1]
            slots[:, s + t] = 1
            logits, keys, values = decode(tok[:, None], mask.sum(1, keepdim=True) + t, slots, keys, values,
                                          torch.tensor([s + t]), *cross)
            assert float((logits - eager).abs().max()) < 1e-4


MROPE_GRID = """
model m {
  vision enc = vit { image_size = 32  patch_size = 8  width = 32  depth = 1  heads = 2  mlp = 64
                     feature = layer(-1).patches }
  connector proj = linear(enc -> llm)
  language llm = llama { width = 64  depth = 2  heads = 4  kv_heads = 2  ffn = 128  vocab = 512
                         max_positions = 128  rope = mrope(sections = [2, 3, 3]) }
  fusion prefix(proj -> llm)
}
"""


def test_mrope_positions_are_computed_by_the_runner(tokenizer, tmp_path):
    """M-RoPE numbers image tokens by (time, row, column): a Python loop over the prompt that a graph
    cannot hold, so the runner computes the prefill positions and the decode offset. Prefill and decode
    match eager, and so do the greedy tokens, for a left-padded batch."""
    from export_helpers import export_case

    spec = tmp_path / "mrope.vlm"
    spec.write_text(MROPE_GRID)
    case = export_case(f"{spec}:m", tmp_path, tokenizer, ("pt2",))
    assert case.manifest["interface"]["image_grid"] == [4, 4]
    model, ids, mask, px = case.model, case.input_ids, case.attention_mask, case.pixel_values
    runner = case.runner("pt2")
    with torch.no_grad():
        feats = model.encode_images(px)
        cache = KVCache()
        eager = model(ids, attention_mask=mask, image_features=feats, cache=cache, logits_to_keep=1).logits[:, -1]
        logits, state = runner.prefill(ids, mask, feats)
        assert float((logits - eager).abs().max()) < 1e-4
        assert int(runner.mrope_delta.abs().max()) > 0  # the images moved the text's positions
        b, s = ids.shape
        slots = torch.zeros(b, runner.max_len, dtype=torch.long)
        slots[:, :s] = mask
        full = mask
        for t in range(3):
            tok = eager.argmax(-1)
            full = torch.cat([full, torch.ones(b, 1, dtype=torch.long)], dim=1)
            eager = model(tok[:, None], attention_mask=full, cache=cache, logits_to_keep=1).logits[:, -1]
            slots[:, s + t] = 1
            logits, state = runner.step(tok, mask.sum(1) + t, slots, state, s + t)
            assert float((logits - eager).abs().max()) < 1e-4
    want = model.generate(ids, attention_mask=mask, pixel_values=px, max_new_tokens=8)
    assert torch.equal(runner.generate(ids, attention_mask=mask, pixel_values=px, max_new_tokens=8), want)
