"""InternViT (`internvit`, InternVL 2.5's tower) against transformers' `InternVLVisionModel`: a tiny tower
with every parameter randomised, its weights loaded through `formats/internvl_parts.py`'s key layout, the
selected hidden states compared; parameter counts against transformers' and the closed form; qk-norm's
refusal where the attention is fused (E0221)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from runtime_helpers import analyse

from vlmspec.compiler.compile import check_file
from vlmspec.runtime.model import build_model
from vlmspec.runtime.weights.formats.internvl_parts import VISION_LAYOUTS, vision_block, vision_layout

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "weights"))
from hf_tiny import randomise  # noqa: E402

transformers = pytest.importorskip("transformers")

TAIL = """
  connector proj = mlp(vit -> llm) { layers = 2 }
  language llm = llama { width = 40  depth = 1  heads = 2  ffn = 80  vocab = 64  max_positions = 64 }
  fusion prefix(proj -> llm)
}
"""
BASE = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4, image_size=32,
            patch_size=8, initializer_range=0.2)
#: name -> (vision_config overrides, vision_feature_layer, vision_feature_select_strategy)
CASES = {
    # InternViT-300M (InternVL 2.5 1B-8B): LayerNorm, q/k/v biases, no final norm
    "300m": (dict(attention_bias=True, use_mean_pooling=True), -1, "default"),
    # InternViT-6B (InternVL 2.5 26B-78B): RMSNorm, qk-norm, no q/k/v biases; here with its final LayerNorm
    "6b": (dict(norm_type="rms_norm", use_qk_norm=True, attention_bias=False, use_mean_pooling=False,
                layer_norm_eps=1e-5), -1, "default"),
    "penultimate_full": (dict(attention_bias=True, use_mean_pooling=False, hidden_act="gelu_pytorch_tanh"), -2,
                         "full"),
}


def _pair(tmp_path: Path, case: str):
    over, layer, strategy = CASES[case]
    vc = {**BASE, **over}
    cfg = transformers.InternVLVisionConfig(**vc)
    torch.manual_seed(0)
    hf = transformers.InternVLVisionModel(cfg).eval()
    randomise(hf, fresh=("lambda_", "cls_token", "position_embeddings"), seed=3)
    spec = f"model m {{\n{vision_block(vc, layer=layer, strategy=strategy)}\n{TAIL}"
    analysis = analyse(tmp_path, spec)
    ours = build_model(analysis).components["vit"].eval()
    theirs = {"model.vision_tower." + k: v for k, v in hf.state_dict().items()}
    layout = vision_layout("model.")
    mapped = {k: layout.to_checkpoint(k) for k in ours.state_dict()}
    assert set(mapped.values()) == set(theirs), "every key maps, both ways"
    ours.load_state_dict({k: theirs[c] for k, c in mapped.items()})
    return hf, ours, analysis, layer, strategy


@pytest.mark.parametrize("case", list(CASES))
def test_hidden_states_match_transformers(tmp_path, case):
    hf, ours, _, layer, strategy = _pair(tmp_path, case)
    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = hf(pixel_values=px, output_hidden_states=True)
        ref = out.last_hidden_state if layer == -1 else out.hidden_states[layer]
        if strategy == "default":
            ref = ref[:, 1:]
        got = ours(px)
    assert got.x.shape == ref.shape
    diff = float((got.x - ref).abs().max())
    assert diff < 1e-5, diff
    if strategy == "default":
        assert got.grid == (4, 4)
    # the tower's output depends on every part: changing the layer scales changes it
    with torch.no_grad():
        ours.encoder.layers[0].scale_attn.mul_(2.0)
        assert float((ours(px).x - ref).abs().max()) > 1e-3


@pytest.mark.parametrize("case", list(CASES))
def test_parameter_counts_match_transformers_and_the_closed_form(tmp_path, case):
    over, layer, strategy = CASES[case]
    vc = {**BASE, **over}
    with torch.device("meta"):
        hf = transformers.InternVLVisionModel(transformers.InternVLVisionConfig(**vc))
    spec = f"model m {{\n{vision_block(vc, layer=layer, strategy=strategy)}\n{TAIL}"
    analysis = analyse(tmp_path, spec)
    ours = build_model(analysis, device="meta").components["vit"]
    n_hf = sum(p.numel() for p in hf.parameters())
    assert sum(p.numel() for p in ours.parameters()) == n_hf == analysis.shapes.total("vit")


def test_a_full_size_internvit_300m_counts_its_published_parameters(tmp_path):
    vc = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
              image_size=448, patch_size=14, attention_bias=True)
    with torch.device("meta"):
        hf = transformers.InternVLVisionModel(transformers.InternVLVisionConfig(**vc))
    tail = TAIL.replace("max_positions = 64", "max_positions = 2048")
    analysis = analyse(tmp_path, f"model m {{\n{vision_block(vc)}\n{tail}")
    assert analysis.shapes.total("vit") == sum(p.numel() for p in hf.parameters())  # ~304M


def test_the_layout_reads_both_saved_prefixes():
    assert [lay.to_checkpoint("encoder.layers.2.self_attn.out_proj.bias") for lay in VISION_LAYOUTS] == [
        "model.vision_tower.encoder.layer.2.attention.projection_layer.bias",
        "vision_tower.encoder.layer.2.attention.projection_layer.bias"]
    assert VISION_LAYOUTS[1].present(["vision_tower.encoder.layer.0.lambda_1"])
    assert not VISION_LAYOUTS[0].present(["vision_tower.encoder.layer.0.lambda_1"])


def _codes(text: str) -> list[tuple[str, str]]:
    r = check_file("t.vlm", None, text=text)
    return [(d.code, text[d.span.start:d.span.end] if d.span else "") for d in r.diagnostics]


def _spec(vision: str) -> str:
    return f"model m {{\n  vision vit = {vision}\n{TAIL}"


@pytest.mark.parametrize("vision", [
    "eva { image_size = 32  patch_size = 8  width = 48  depth = 1  heads = 4  qk_norm = true }",
    "vit { image_size = 32  patch_size = 8  width = 48  depth = 1  heads = 4  position = rope2d  "
    "class_token = false  qk_norm = true }",
])
def test_qk_norm_on_a_fused_attention_is_refused_where_it_is_written(vision):
    codes = _codes(_spec(vision))
    assert [c for c, _ in codes] == ["E0221"], codes
    assert codes[0][1] == "true"  # the value written


def test_qk_norm_and_layer_scale_apply_to_other_towers(tmp_path):
    """Both switches are the tower's, not InternViT's alone: a SigLIP with them builds and counts them."""
    vision = "siglip { image_size = 32  patch_size = 8  width = 48  depth = 2  heads = 4  qk_norm = true  " \
             "layer_scale = true }"
    analysis = analyse(tmp_path, _spec(vision))
    plain = analyse(tmp_path, _spec(vision.replace("qk_norm = true  layer_scale = true ", "")))
    assert analysis.shapes.total("vit") - plain.shapes.total("vit") == 2 * (2 * 48 + 2 * 48)
    model = build_model(analysis, device="meta").components["vit"]
    assert sum(p.numel() for p in model.parameters()) == analysis.shapes.total("vit")


def test_spec_path_parts_count_what_they_cover(tmp_path):
    """`vit.attn` (q / k / v / output projections and qk-norms), `vit.mlp` and `vit.norm` (InternViT's
    final LayerNorm even in an RMSNorm tower) count what the built modules hold."""
    over, layer, strategy = CASES["6b"]
    analysis = analyse(tmp_path, f"model m {{\n{vision_block({**BASE, **over}, layer=layer, strategy=strategy)}\n{TAIL}")
    cfg, parts = analysis.ir.components["vit"].config, analysis.shapes.params["vit"]
    enc = build_model(analysis, device="meta").components["vit"]
    for part in enc.spec_parts():
        if part.path in ("attn", "mlp", "norm"):
            held = sum(p.numel() for m in part.members if m is not None for p in m.parameters())
            assert cfg.part_params(part.path, parts) == held, part.path


def test_the_spec_text_carries_every_setting():
    text = vision_block({**BASE, "norm_type": "rms_norm", "use_qk_norm": True, "use_mean_pooling": False},
                        layer=-2, strategy="full", weights="ckpt#vision")
    for line in ('norm = "rms"', "qk_norm = true", "post_norm = true", "attn_bias = false",
                 "feature = layer(-2).all", 'weights = "ckpt#vision"', "mlp = 80", 'act = "gelu"'):
        assert line in text, line


@pytest.mark.parametrize("over", [dict(use_mask_token=True), dict(use_absolute_position_embeddings=False),
                                  dict(norm_type="batch_norm"), dict(image_size=[32, 48])])
def test_what_a_spec_cannot_say_is_refused(over):
    from vlmspec.diagnostics import UserInputError

    with pytest.raises(UserInputError):
        vision_block({**BASE, **over})
