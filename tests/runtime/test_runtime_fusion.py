"""What each fusion style promises: gated cross-attention leaves a frozen LM unchanged at step 0,
the visual expert only touches image positions, up-cycled experts compute the dense FFN, images and
image tokens must agree, and several images / sources / resolutions flow through."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from runtime_helpers import CASES, STAGES, Case, analyse, image_tokens, pixels, prompts

from vlmspec.diagnostics import UserInputError
from vlmspec.runtime.connectors import Instruction
from vlmspec.runtime.language.moe import upcycle
from vlmspec.runtime.model import build_model


def _build(tmp_path, case: Case | str, seed: int = 0):
    analysis = analyse(tmp_path, (CASES[case] if isinstance(case, str) else case).text())
    torch.manual_seed(seed)
    return analysis, build_model(analysis).eval()


def _logits(model, ids, mask, px=None):
    with torch.no_grad():
        return model(ids, attention_mask=mask, pixel_values=px).logits


def _copy_shared(src, dst, names=("enc", "proj", "llm")) -> None:
    """Give `dst` the weights of `src` for the named components (strict, by key)."""
    for n in names:
        own = set(dst.components[n].state_dict())
        dst.components[n].load_state_dict({k: v for k, v in src.components[n].state_dict().items() if k in own})


def test_cross_attention_with_zero_gates_leaves_the_language_model_unchanged(tmp_path):
    analysis, model = _build(tmp_path, "fusion-cross_attention")
    ids, mask = prompts(model.image_token_id, 1)
    px = pixels(analysis)
    with_images, text_only = _logits(model, ids, mask, px), _logits(model, ids, mask)
    assert torch.equal(with_images, text_only)
    with torch.no_grad():
        for name, p in model.components["xattn"].named_parameters():
            if name.endswith("_gate"):
                p.fill_(0.5)
    assert not torch.allclose(_logits(model, ids, mask, px), text_only)


def test_visual_expert_only_changes_positions_from_the_first_image_token(tmp_path):
    analysis, model = _build(tmp_path, "fusion-visual_expert")
    _, prefix = _build(tmp_path, Case(), seed=1)
    model.components["ve"].init_from_llm(model.components["llm"])
    _copy_shared(model, prefix)
    ids, mask = prompts(model.image_token_id, image_tokens(analysis))
    px = pixels(analysis)
    assert torch.allclose(_logits(model, ids, mask, px), _logits(prefix, ids, mask, px), atol=1e-5)
    with torch.no_grad():
        model.components["ve"].layers["0"].self_attn.v_proj.weight.mul_(3.0)
    changed = (_logits(model, ids, mask, px) - _logits(prefix, ids, mask, px)).abs().amax(-1) > 1e-5
    first_image = (ids == model.image_token_id).int().argmax(1)
    for row in range(ids.shape[0]):
        assert not bool(changed[row, : first_image[row]].any())
        assert bool(changed[row, first_image[row]:].all())


def _dense_text(case: Case) -> str:
    """The same spec without experts: a prefix fusion, and no `moe { }` block in the language model."""
    if case.fusion == "moe":
        return dataclasses.replace(case, fusion="prefix").text()
    return re.sub(r"\s+moe \{[^}]*\}", "", case.text().replace(STAGES["llm_moe"], STAGES["prefix"]))


@pytest.mark.parametrize("case", ["fusion-moe", "fusion-moe-opt", "fusion-prefix-llm-moe"])
def test_upcycled_experts_compute_the_dense_model(tmp_path, case):
    analysis, model = _build(tmp_path, case)
    dense_analysis = analyse(tmp_path, _dense_text(CASES[case]))
    dense = build_model(dense_analysis).eval()
    assert upcycle(model) == sum(len(moe.experts) for moe, _ in model.moe_pairs()) > 0
    _copy_shared(model, dense)
    ids, mask = prompts(model.image_token_id, image_tokens(analysis))
    px = pixels(analysis)
    assert torch.allclose(_logits(model, ids, mask, px), _logits(dense, ids, mask, px), atol=1e-5)


def test_upcycle_refuses_experts_of_another_size(tmp_path):
    _, model = _build(tmp_path, "fusion-prefix-phi-moe-ffn")
    with pytest.raises(UserInputError, match="ffn differs") as e:
        upcycle(model)
    assert e.value.diagnostics[0].code == "E0508"


def test_image_token_count_mismatch_names_both_counts(tmp_path):
    analysis, model = _build(tmp_path, "connector-mlp")
    ids, mask = prompts(model.image_token_id, image_tokens(analysis) - 1)
    with pytest.raises(UserInputError, match=r"prompt has 15 image tokens but the images give 16 features") as e:
        model(ids, attention_mask=mask, pixel_values=pixels(analysis))
    assert e.value.diagnostics[0].code == "E0513"


def test_several_images_per_sample(tmp_path):
    analysis, model = _build(tmp_path, "connector-mlp")
    px = torch.stack([pixels(analysis, seed=5), pixels(analysis, seed=6)], dim=1)  # [b x 2 x c x h x w]
    feats = model.encode_images(px)
    assert feats["prefix"].shape == (2, 32, 48)
    assert torch.equal(feats["prefix"][:, 16:], model.encode_images(px[:, 1])["prefix"])
    ids, mask = prompts(model.image_token_id, 32)
    assert model(ids, attention_mask=mask, pixel_values=px).logits.shape[:2] == ids.shape
    assert model.extract_features(px).shape == (2, 32, 48)


def test_instruction_aware_qformer_reads_the_instruction(tmp_path):
    analysis, model = _build(tmp_path, "connector-qformer-instruct")
    px = pixels(analysis)
    plain = model.encode_images(px)["prefix"]
    instr = Instruction(torch.tensor([[3, 4, 5, 0], [6, 7, 0, 0]]), torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]))
    told = model.encode_images(px, instruction=instr)["prefix"]
    assert told.shape == plain.shape == (2, 4, 48)
    assert not torch.allclose(told, plain)


def test_dynamic_resolution_gives_as_many_tokens_as_patches(tmp_path):
    analysis, model = _build(tmp_path, Case(vision="dynamic", connector="linear"))
    px = torch.randn(1, 3, 32, 48)
    feats = model.encode_images(px)["prefix"]
    assert feats.shape == (1, 24, 48)
    ids, mask = prompts(model.image_token_id, 24, batch=1)
    assert model(ids, attention_mask=mask, pixel_values=px).logits.shape[:2] == ids.shape


def test_fixed_resolution_refuses_other_sizes(tmp_path):
    _, model = _build(tmp_path, "connector-mlp")
    with pytest.raises(UserInputError, match="images are 48x48 but the encoder takes 32x32") as e:
        model.encode_images(torch.randn(1, 3, 48, 48))
    assert e.value.diagnostics[0].code == "E0593"
    with pytest.raises(UserInputError, match="channels") as e:
        model.encode_images(torch.randn(1, 1, 32, 32))
    assert e.value.diagnostics[0].code == "E0593"


MULTI = """model m {
  vision a = siglip { image_size = 32  patch_size = 8  width = 32  depth = 1  heads = 2  mlp = 64 }
  vision b = vit { image_size = 32  patch_size = 8  width = 16  depth = 1  heads = 2  mlp = 32 }
  connector proj = mlp(a + b -> llm) { merge = MERGE }
  language llm = llama { width = 48  depth = 1  heads = 4  ffn = 96  vocab = 300  max_positions = 128 }
  fusion prefix(proj -> llm)
}
"""


@pytest.mark.parametrize(("merge", "tokens"), [("concat", 16), ("sum", 16), ("sequence", 32)])
def test_two_encoders_merged(tmp_path, merge, tokens):
    text = MULTI.replace("MERGE", merge)
    if merge != "concat":  # sum and sequence need sources of one width
        text = text.replace("width = 16  depth = 1  heads = 2  mlp = 32", "width = 32  depth = 1  heads = 2  mlp = 64")
    analysis = analyse(tmp_path, text)
    model = build_model(analysis)
    assert sum(p.numel() for p in model.parameters()) == analysis.shapes.grand_total
    px = torch.randn(2, 3, 32, 32)
    assert model.encode_images(px)["prefix"].shape == (2, tokens, 48)
    per_encoder = model.encode_images({"a": px, "b": px})["prefix"]
    assert torch.equal(per_encoder, model.encode_images(px)["prefix"])


CHAIN = """model m {
  vision eva = eva { image_size = 32  patch_size = 8  width = 32  depth = 1  heads = 2  mlp = 64  feature = layer(-1).all }
  connector qf = qformer(eva -> lin1) { queries = 4  width = 32  depth = 2  heads = 2  mlp = 64 }
  connector lin1 = linear(qf -> lin2) { out = 40 }
  connector lin2 = linear(lin1 -> llm)
  language llm = opt { width = 48  depth = 1  heads = 4  ffn = 96  vocab = 300  max_positions = 64 }
  fusion prefix(lin2 -> llm)
}
"""


def test_chained_connectors_run_in_graph_order(tmp_path):
    analysis = analyse(tmp_path, CHAIN)
    model = build_model(analysis)
    assert model.order == ["eva", "qf", "lin1", "lin2"]
    assert model.encode_images(torch.randn(2, 3, 32, 32))["prefix"].shape == (2, 4, 48)
    assert sum(p.numel() for p in model.parameters()) == analysis.shapes.grand_total
