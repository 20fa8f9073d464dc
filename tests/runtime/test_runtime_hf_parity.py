"""Parity with Hugging Face: LlavaForConditionalGeneration from a tiny config, its weights copied into
the vlmspec model by a plain key mapping (strict), logits and greedy tokens compared."""

from __future__ import annotations

import pytest
import torch
from runtime_helpers import analyse

from vlmspec.runtime.model import build_model

transformers = pytest.importorskip("transformers")

SPEC = """
model hf_llava {
  vision clip = vit { image_size = 32  patch_size = 8  width = 32  depth = 2  heads = 4  mlp = 64
                      feature = layer(-2).patches }
  connector proj = mlp(clip -> llm) { layers = 2  act = gelu }
  language llm = llama { width = 64  depth = 2  heads = 4  kv_heads = 2  ffn = 128  vocab = 128
                         max_positions = 256  norm_eps = 1e-6 }
  fusion prefix(proj -> llm) { tokens = 16 }
}
"""
IMAGE_TOKEN = 100
_KEYS = (("model.vision_tower.", "components.clip."), ("model.multi_modal_projector.", "components.proj."),
         ("model.language_model.", "components.llm.model."), ("lm_head.", "components.llm.lm_head."))


def _key(k: str) -> str:
    for hf, ours in _KEYS:
        if k.startswith(hf):
            return ours + k[len(hf):]
    raise KeyError(k)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    cfg = transformers.LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, image_size=32, patch_size=8, projection_dim=32),
        text_config=dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256),
        image_token_id=IMAGE_TOKEN, image_seq_length=16, vision_feature_select_strategy="default",
        vision_feature_layer=-2)
    torch.manual_seed(0)
    hf = transformers.LlavaForConditionalGeneration(cfg).eval()
    ours = build_model(analyse(tmp_path_factory.mktemp("spec"), SPEC, "hf_llava"), image_token_id=IMAGE_TOKEN).eval()
    ours.load_state_dict({_key(k): v for k, v in hf.state_dict().items()})  # strict: every key maps
    return hf, ours


def _inputs(pad: int = 0):
    g = torch.Generator().manual_seed(4)
    rows = []
    for i in range(2):
        p = pad * i
        rows.append(torch.cat([torch.zeros(p, dtype=torch.long), torch.tensor([1]), torch.full((16,), IMAGE_TOKEN),
                               torch.randint(2, 99, (8 - p,), generator=g)]))
    ids = torch.stack(rows)
    mask = (torch.arange(ids.shape[1])[None] >= torch.tensor([[0], [pad]])).long()
    return ids, mask, torch.randn(2, 3, 32, 32, generator=g)


def test_same_parameter_count(pair):
    hf, ours = pair
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("pad", [0, 3])
def test_logits_match(pair, pad):
    hf, ours = pair
    ids, mask, px = _inputs(pad)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, pixel_values=px).logits
        out = ours(ids, attention_mask=mask, pixel_values=px).logits
    real = mask.bool()
    assert (ref[real] - out[real]).abs().max() <= 1e-4


def test_greedy_tokens_match(pair):
    hf, ours = pair
    ids, mask, px = _inputs(3)
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=8, min_new_tokens=8,
                          do_sample=False, pad_token_id=0, eos_token_id=None)[:, ids.shape[1]:]
    assert torch.equal(ours.generate(ids, attention_mask=mask, pixel_values=px, max_new_tokens=8), ref)
