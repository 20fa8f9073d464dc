"""Contrastive models (CLIP, SigLIP) in the language: parameter counts against transformers, fmt / diff /
summary on them, the built model's embeddings and logits, and whether the temperature and bias learn."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from vlmspec.compiler.compile import check_file, load_analysis
from vlmspec.compiler.diff import diff_models
from vlmspec.compiler.printer import format_text
from vlmspec.compiler.summary import summarise
from vlmspec.diagnostics import VlmSpecError
from vlmspec.runtime.contrastive import ContrastiveModel, refuse_generation
from vlmspec.runtime.session import build_session

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SPECS = Path(__file__).resolve().parent.parent / "specs"
CLIP = SPECS / "clip-vit-b-16.vlm"
SIGLIP = SPECS / "siglip-b-16.vlm"


def _meta_count(model_cls, cfg) -> int:
    with torch.device("meta"):
        model = model_cls(cfg)
    return sum(p.numel() for p in model.parameters())


def _clip_config(a):
    from transformers import CLIPConfig

    ir = a.ir
    v, t, f = (ir.components[n].config for n in ("img", "txt", "contrastive"))
    return CLIPConfig(
        text_config=dict(hidden_size=t.width, intermediate_size=t.mlp_dim, num_hidden_layers=t.depth,
                         num_attention_heads=t.heads, vocab_size=t.vocab, max_position_embeddings=t.max_positions),
        vision_config=dict(hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.depth,
                           num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch_size),
        projection_dim=f.dim)


def _siglip_config(a):
    from transformers import SiglipConfig

    ir = a.ir
    v, t = (ir.components[n].config for n in ("img", "txt"))
    return SiglipConfig(
        text_config=dict(hidden_size=t.width, intermediate_size=t.mlp_dim, num_hidden_layers=t.depth,
                         num_attention_heads=t.heads, vocab_size=t.vocab, max_position_embeddings=t.max_positions,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0),
        vision_config=dict(hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.depth,
                           num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch_size))


@pytest.mark.parametrize(("ref", "published"), [(f"{CLIP}:clip_vit_b_16", 149_620_737),
                                                (f"{SIGLIP}:siglip_b_16", 203_155_970),
                                                (f"{CLIP}:clip_vit_b_16_tiny", None),
                                                (f"{SIGLIP}:siglip_b_16_tiny", None)])
def test_params_match_transformers(ref: str, published: int | None):
    from transformers import CLIPModel, SiglipModel

    a = load_analysis(ref)[0]
    ours = summarise(a)["params"]["total"]
    cls, cfg = (CLIPModel, _clip_config(a)) if "clip" in ref else (SiglipModel, _siglip_config(a))
    assert ours == _meta_count(cls, cfg)
    if published is not None:
        assert ours == published
        assert f"{published:,}" in Path(ref.split(":")[0]).read_text()  # the header states it


def test_specs_check_and_format_canonically():
    for path in (CLIP, SIGLIP):
        result = check_file(str(path))
        assert result.ok, [d.message for d in result.diagnostics]
        text = path.read_text()
        assert format_text(text, str(path)) == text  # fmt is a no-op on the library files


def test_flow_without_target_round_trips_through_fmt():
    src = ("model m {\n  vision img = vit { image_size = 32  patch_size = 8  width = 32  depth = 1  heads = 2  "
           "feature = pooled }\n  text txt = clip_text { width = 32  depth = 1  heads = 2  vocab = 260  "
           "eos_token_id = 2 }\n  fusion contrastive( img +txt ) { dim = 16 }\n}\n")
    once = format_text(src, "m.vlm")
    assert "fusion contrastive(img + txt) {" in once
    assert format_text(once, "m.vlm") == once


def test_diff_names_the_head_parameters():
    big = load_analysis(f"{CLIP}:clip_vit_b_16")[0]
    tiny = load_analysis(f"{CLIP}:clip_vit_b_16_tiny")[0]
    text = json.dumps(diff_models(big, tiny))
    assert "contrastive" in text and "dim" in text and "149620737" in text


@pytest.mark.parametrize("ref", [f"{CLIP}:clip_vit_b_16_tiny", f"{SIGLIP}:siglip_b_16_tiny"])
def test_built_model_embeds_and_scores(ref: str):
    a = load_analysis(ref)[0]
    session = build_session(a, seed=0)
    model = session.model
    assert isinstance(model, ContrastiveModel)
    assert sum(p.numel() for p in model.parameters()) == summarise(a)["params"]["total"]
    ids, mask = session.processor.captions(["a red circle", "a blue square", "a green cross"])
    assert ids.shape == (3, a.ir.components["txt"].config.max_positions)
    px = torch.randn(3, 3, 32, 32)
    img, txt = model.image_embeds(px), model.text_embeds(ids, mask)
    assert torch.allclose(img.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(3), atol=1e-5)
    head = model.contrastive
    expected = head.logit_scale.exp() * img @ txt.t() + (head.logit_bias if head.logit_bias is not None else 0)
    assert torch.allclose(model.logits(px, ids, mask), expected, atol=1e-5)
    if head.logit_bias is None:  # CLIP: ln(1 / 0.07)
        assert math.isclose(head.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)
    else:  # SigLIP: scale 10, bias -10
        assert math.isclose(head.logit_scale.exp().item(), 10.0, rel_tol=1e-5)
        assert head.logit_bias.item() == -10.0
    with pytest.raises(VlmSpecError, match="E0615"):
        refuse_generation(model, "vlm generate")


def _one_step(model: ContrastiveModel, processor) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    ids, mask = processor.captions(["a red circle", "a blue square", "a green cross", "a yellow square"])
    loss = model.loss(torch.randn(4, 3, 32, 32), ids, mask)
    loss.backward()
    opt.step()


@pytest.mark.parametrize("ref", [f"{CLIP}:clip_vit_b_16_tiny", f"{SIGLIP}:siglip_b_16_tiny"])
@pytest.mark.parametrize("learn", [True, False])
def test_temperature_and_bias_learn_or_stay(ref: str, learn: bool, tmp_path: Path):
    text = Path(ref.split(":")[0]).read_text()
    name = ref.split(":")[1]
    if not learn:  # the tiny model with the head's scale (and bias) fixed
        text += (f"\nmodel fixed extends {name} {{\n  contrastive {{\n    learn_temperature = false\n  }}\n}}\n")
        name = "fixed"
    spec = tmp_path / "m.vlm"
    spec.write_text(text)
    a = load_analysis(f"{spec}:{name}")[0]
    session = build_session(a, seed=0)
    model = session.model
    head = model.contrastive
    before = [head.logit_scale.item()] + ([head.logit_bias.item()] if head.logit_bias is not None else [])
    _one_step(model, session.processor)
    after = [head.logit_scale.item()] + ([head.logit_bias.item()] if head.logit_bias is not None else [])
    if learn:
        assert all(b != x for b, x in zip(before, after, strict=True)), (before, after)
    else:
        assert before == after
        assert not head.logit_scale.requires_grad
