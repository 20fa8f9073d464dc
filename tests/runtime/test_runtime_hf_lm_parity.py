"""Each language-model family against its Hugging Face class: same weights by key, same logits; and
M-RoPE positions against Qwen2-VL's `get_rope_index`."""

from __future__ import annotations

import pytest
import torch
from runtime_helpers import analyse

from vlmspec.runtime.language.mrope import mrope_positions
from vlmspec.runtime.model import build_model

transformers = pytest.importorskip("transformers")

_VISION = ("vision enc = vit { image_size = 32  patch_size = 8  width = 32  depth = 1  heads = 2  mlp = 64 }\n"
           "  connector proj = linear(enc -> llm)\n  fusion prefix(proj -> llm)")

# spec language block, HF config class, HF config kwargs
FAMILIES = {
    "llama-qwen2": (
        "language llm = llama { width = 64  depth = 2  heads = 4  kv_heads = 2  ffn = 96  vocab = 120  qkv_bias = true"
        "  rope_theta = 1000000.0  max_positions = 128 }",
        "Qwen2Config", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=96, vocab_size=120, rope_theta=1000000.0, rms_norm_eps=1e-6,
                            max_position_embeddings=128, tie_word_embeddings=False)),
    "gemma": (
        "language llm = gemma { width = 64  depth = 2  heads = 4  kv_heads = 1  head_dim = 32  ffn = 96  vocab = 120"
        "  max_positions = 128 }",
        "GemmaConfig", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                            head_dim=32, intermediate_size=96, vocab_size=120, max_position_embeddings=128,
                            hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6)),
    "opt": (
        "language llm = opt { width = 64  depth = 2  heads = 4  ffn = 96  vocab = 120  max_positions = 128"
        "  embed_dim = 32  tie_embeddings = true }",
        "OPTConfig", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=96, vocab_size=120,
                          max_position_embeddings=128, word_embed_proj_dim=32, do_layer_norm_before=True,
                          enable_bias=True, layer_norm_elementwise_affine=True, pad_token_id=1)),
    "phi": (
        "language llm = phi { width = 64  depth = 2  heads = 4  ffn = 96  vocab = 120  max_positions = 128"
        "  partial_rotary = 0.5 }",
        "PhiConfig", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                          vocab_size=120, max_position_embeddings=128, partial_rotary_factor=0.5,
                          layer_norm_eps=1e-5, tie_word_embeddings=False)),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_language_model_matches_hugging_face(tmp_path, family):
    block, cfg_name, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_name)(**kwargs)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    ours = build_model(analyse(tmp_path, f"model m {{\n  {block}\n  {_VISION}\n}}\n")).eval()
    llm = ours.components["llm"]
    assert sum(p.numel() for p in llm.parameters()) == sum(p.numel() for p in hf.parameters())
    llm.load_state_dict(hf.state_dict())  # strict: the keys are Hugging Face's
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 110, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        out = ours(ids, attention_mask=mask).logits
    real = mask.bool()
    assert (ref[real] - out[real]).abs().max() <= 1e-4


_QWEN2_VL_TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
                      rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3]))
_MROPE_SPEC = """model m {
  language llm = llama { width = 64  depth = 2  heads = 4  kv_heads = 2  ffn = 128  vocab = 128  qkv_bias = true
                         max_positions = 256  rope = mrope(sections = [2, 3, 3]) }
  vision enc = vit { image_size = 32  patch_size = 8  width = 32  depth = 1  heads = 2  mlp = 64 }
  connector proj = patch_merger(enc -> llm)
  fusion prefix(proj -> llm)
}
"""


@pytest.fixture(scope="module")
def qwen2_vl():
    cfg = transformers.Qwen2VLConfig(
        text_config=_QWEN2_VL_TEXT,
        vision_config=dict(depth=1, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=4, in_channels=3,
                           patch_size=8, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=100, video_token_id=101, vision_start_token_id=102, vision_end_token_id=103)
    torch.manual_seed(0)
    return transformers.Qwen2VLForConditionalGeneration(cfg).eval()


def test_mrope_positions_match_qwen2_vl(qwen2_vl):
    ids = torch.tensor([[0, 0, 5, 102] + [100] * 4 + [103, 7, 8, 102] + [100] * 4 + [103, 9],
                        [5, 6, 102] + [100] * 4 + [103, 7, 8, 102] + [100] * 4 + [103, 9, 10]])
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    ref, ref_delta = qwen2_vl.model.get_rope_index(ids, (ids == 100).int(),
                                                   image_grid_thw=torch.tensor([[1, 4, 4]] * 4), attention_mask=mask)
    pos, delta = mrope_positions(ids, mask, 100, (2, 2))
    real = mask.bool()
    assert torch.equal(pos[:, real], ref[:, real])
    assert torch.equal(delta, ref_delta.flatten())


def test_mrope_rotation_matches_qwen2_vl_text_model(tmp_path, qwen2_vl):
    ours = build_model(analyse(tmp_path, _MROPE_SPEC), image_token_id=100).eval()
    prefix = "model.language_model."
    ours.components["llm"].load_state_dict(
        {("model." + k[len(prefix):] if k.startswith(prefix) else k): v for k, v in qwen2_vl.state_dict().items()
         if k.startswith((prefix, "lm_head."))})
    ids = torch.tensor([[5, 102] + [100] * 4 + [103, 7, 8, 9]])
    pos, _ = mrope_positions(ids, None, 100, (2, 2))
    with torch.no_grad():
        ref = qwen2_vl.lm_head(qwen2_vl.model.language_model(input_ids=ids, position_ids=pos).last_hidden_state)
        out = ours(ids, position_ids=pos).logits
    assert (ref - out).abs().max() <= 1e-4
