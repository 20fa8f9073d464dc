"""LLaVA with a SigLIP tower (as LLaVA-OneVision and many community LLaVAs): transformers reads the
tower's hidden states, which stop before SigLIP's post-LayerNorm; the import says `feature_norm = false`
and the logits and greedy tokens match."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from hf_tiny import IMAGE_TOKEN, _quiet, imported, randomise  # noqa: E402
from test_weights_parity import _ids, assert_parity  # noqa: E402

transformers = pytest.importorskip("transformers")


def llava_siglip(out: Path, *, layer: int, head: bool, strategy: str = "full"):
    _quiet(transformers)
    cfg = transformers.LlavaConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8,
                           vision_use_head=head),
        text_config=dict(model_type="qwen2", vocab_size=128, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256),
        image_token_id=IMAGE_TOKEN, image_seq_length=16, vision_feature_select_strategy=strategy,
        vision_feature_layer=layer)
    torch.manual_seed(0)
    m = transformers.LlavaForConditionalGeneration(cfg).eval()
    randomise(m)
    m.save_pretrained(str(out))
    return m


@pytest.mark.parametrize(("layer", "head"), [(-1, False), (-2, True)], ids=["last-no-head", "second-last-head"])
def test_llava_siglip_parity(tmp_path, layer, head):
    hf = llava_siglip(tmp_path / "hf", layer=layer, head=head)
    ours, report, mapping = imported(tmp_path / "hf", tmp_path)
    assert report.ok and set(mapping["components"]) == {"siglip", "proj", "llm"}
    ids, mask = _ids(16, 2)
    assert_parity(hf, ours, ids, mask, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)))

def test_default_strategy_on_siglip_is_refused(tmp_path):
    from vlmspec.diagnostics import UserInputError
    from vlmspec.runtime.weights import import_hf

    llava_siglip(tmp_path / "hf", layer=-1, head=False, strategy="default")
    with pytest.raises(UserInputError) as e:
        import_hf(tmp_path / "hf")
    assert e.value.diagnostics[0].code == "E0585" and "drops a patch" in e.value.diagnostics[0].message
