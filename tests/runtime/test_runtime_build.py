"""Building: every schema kind has a builder, and the built modules hold exactly the parameters the
closed-form formulas count (per component and in total), with Hugging Face key names."""

from __future__ import annotations

import pytest
import torch
from runtime_helpers import CASES, SPECS, analyse

from vlmspec.compiler.compile import load_analysis
from vlmspec.compiler.schema import REGISTRY
from vlmspec.runtime.model import build_model
from vlmspec.runtime.registry import load_builders


def test_every_schema_kind_has_a_builder():
    builders = load_builders()
    missing = [(role, kind) for role, kinds in REGISTRY.by_role.items() for kind in kinds if (role, kind) not in builders]
    assert missing == []


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_parameter_count_matches_closed_form(tmp_path, case):
    analysis = analyse(tmp_path, CASES[case].text())
    model = build_model(analysis, device="meta")
    assert sum(p.numel() for p in model.parameters()) == analysis.shapes.grand_total
    for name in analysis.ir.components:
        assert sum(p.numel() for p in model.components[name].parameters()) == analysis.shapes.total(name), name


def test_llava_7b_on_meta_allocates_nothing_and_counts_the_published_total():
    analysis, _ = load_analysis(f"{SPECS / 'llava-1.5-7b.vlm'}:llava_1_5_7b")
    model = build_model(analysis, device="meta")
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert sum(p.numel() for p in model.parameters()) == analysis.shapes.grand_total == 7_062_902_784


def test_llava_tiny_has_hugging_face_keys():
    analysis, _ = load_analysis(f"{SPECS / 'llava-1.5-7b.vlm'}:llava_1_5_7b_tiny")
    keys = set(build_model(analysis, device="meta").state_dict())
    for key in ("components.clip.embeddings.class_embedding", "components.clip.embeddings.patch_embedding.weight",
                "components.clip.embeddings.position_embedding.weight", "components.clip.pre_layrnorm.weight",
                "components.clip.encoder.layers.0.self_attn.q_proj.weight", "components.clip.encoder.layers.1.mlp.fc1.bias",
                "components.clip.post_layernorm.weight", "components.proj.linear_1.weight", "components.proj.linear_2.bias",
                "components.llm.model.embed_tokens.weight", "components.llm.model.layers.0.self_attn.o_proj.weight",
                "components.llm.model.layers.1.mlp.gate_proj.weight", "components.llm.model.layers.0.input_layernorm.weight",
                "components.llm.model.norm.weight", "components.llm.lm_head.weight"):
        assert key in keys, key


@pytest.mark.parametrize(("case", "keys"), [
    ("connector-qformer", ["query_tokens", "qformer.layernorm.weight", "qformer.encoder.layer.0.attention.attention.query.weight",
                           "qformer.encoder.layer.0.crossattention.attention.key.weight",
                           "qformer.encoder.layer.1.output_query.LayerNorm.bias", "language_projection.weight"]),
    ("connector-perceiver", ["latents", "blocks.0.0.q_proj.weight", "blocks.0.1.c_proj.weight", "layer_norm.weight"]),
    ("connector-patch_merger", ["ln_q.weight", "mlp.0.weight", "mlp.2.bias"]),
], ids=["qformer", "perceiver", "patch_merger"])
def test_connector_keys(tmp_path, case, keys):
    model = build_model(analyse(tmp_path, CASES[case].text()), device="meta")
    own = set(model.components["proj"].state_dict())
    assert set(keys) <= own


def test_family_keys(tmp_path):
    opt = build_model(analyse(tmp_path, CASES["lm-opt"].text()), device="meta").components["llm"].state_dict()
    assert {"model.decoder.embed_positions.weight", "model.decoder.project_in.weight",
            "model.decoder.layers.0.self_attn.out_proj.bias", "model.decoder.layers.0.fc1.weight",
            "model.decoder.final_layer_norm.weight"} <= set(opt)
    phi = build_model(analyse(tmp_path, CASES["lm-phi"].text()), device="meta").components["llm"].state_dict()
    assert {"model.layers.0.self_attn.dense.bias", "model.layers.0.mlp.fc2.weight", "model.final_layernorm.bias",
            "lm_head.bias"} <= set(phi)
    eva = build_model(analyse(tmp_path, CASES["connector-qformer"].text()), device="meta").components["enc"].state_dict()
    assert {"encoder.layers.0.self_attn.qkv.bias", "encoder.layers.0.self_attn.projection.weight"} <= set(eva)
    assert eva["embeddings.position_embedding"].shape == (1, 17, 32)


def test_tied_head_shares_the_embedding(tmp_path):
    llm = build_model(analyse(tmp_path, CASES["lm-qwen-gqa-tied-extra"].text())).components["llm"]
    assert llm.lm_head.weight is llm.model.embed_tokens.weight


def test_component_dtype_from_spec_and_override(tmp_path):
    text = CASES["connector-mlp"].text().replace("vocab = 300", "vocab = 300  dtype = bf16")
    analysis = analyse(tmp_path, text)
    model = build_model(analysis)
    assert {p.dtype for p in model.components["llm"].parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.components["enc"].parameters()} == {torch.float32}
    ids = torch.tensor([[1] + [299] * 16 + [5, 6]])
    out = model(ids, pixel_values=torch.randn(1, 3, 32, 32))
    assert out.logits.dtype == torch.bfloat16
    assert {p.dtype for p in build_model(analysis, dtype="fp32").parameters()} == {torch.float32}


def test_build_is_deterministic_under_a_seed(tmp_path):
    analysis = analyse(tmp_path, CASES["fusion-cross_attention"].text())
    torch.manual_seed(3)
    a = build_model(analysis).state_dict()
    torch.manual_seed(3)
    b = build_model(analysis).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    gates = [v for k, v in a.items() if k.endswith("_gate")]
    assert gates and all(float(g.abs().sum()) == 0 for g in gates)
