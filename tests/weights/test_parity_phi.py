"""Phi text models (TinyLLaVA, Bunny, LLaVA-Phi): Phi-1/2 (`PhiForCausalLM`, a `phi`) and Phi-3
(`Phi3ForCausalLM`, a `llama` whose fused `qkv_proj` and `gate_up_proj` are split at load) as single-model
folders (`weights = "DIR"`) and inside LLaVA (`vlm import-hf`): logits within 1e-4 (fp32), 16 greedy
tokens identical; the settings a spec cannot express are refused (E0585)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from hf_tiny import IMAGE_TOKEN, _quiet, cli_round_trip, imported, randomise, refusal  # noqa: E402
from test_weights_parity import _ids, assert_parity  # noqa: E402

from vlmspec.compiler.compile import load_analysis  # noqa: E402
from vlmspec.diagnostics import UserInputError  # noqa: E402
from vlmspec.runtime.weights import build_with_weights  # noqa: E402
from vlmspec.runtime.weights.spec_text import language_block  # noqa: E402

transformers = pytest.importorskip("transformers")

_TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
             eos_token_id=2)
# name -> (model_type, text config overrides)
TEXT = {
    "phi2": ("phi", dict(partial_rotary_factor=0.4)),
    "phi_gqa_gelu": ("phi", dict(num_key_value_heads=2, partial_rotary_factor=0.5, hidden_act="gelu")),
    "phi3": ("phi3", dict()),
    "phi3_gqa_theta": ("phi3", dict(num_key_value_heads=2, rope_theta=50000.0, sliding_window=256)),
    "phi2_tied": ("phi", dict(partial_rotary_factor=0.4, tie_word_embeddings=True)),
}


def text_config(name: str) -> dict:
    mt, over = TEXT[name]
    return {**_TEXT, "model_type": mt, **over}


def single(name: str, out: Path):
    """A randomised `PhiForCausalLM` / `Phi3ForCausalLM` saved to `out`; returns (model, config.json)."""
    _quiet(transformers)
    cfg = transformers.AutoConfig.for_model(**text_config(name))
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    randomise(m)
    m.save_pretrained(str(out))
    return m, json.loads((out / "config.json").read_text())


def spec_with(tmp: Path, block: str):
    text = f"""model m {{
  vision enc = vit {{ image_size = 32  patch_size = 8  width = 32  depth = 1  heads = 2  mlp = 64 }}
  connector proj = mlp(enc -> llm)
{block}
  fusion prefix(proj -> llm)
}}
"""
    (tmp / "m.vlm").write_text(text)
    return load_analysis(f"{tmp / 'm.vlm'}:m")[0]


def text_ids(rows: int = 2, pad: int = 3):
    ids = torch.randint(3, 120, (rows, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    ids[1, :pad] = 0
    return ids, mask


@pytest.mark.parametrize("name", [n for n in TEXT if not n.endswith("_tied")])
def test_single_model_folder_parity(tmp_path, name):
    """`weights = "DIR"` on the block `import_hf` writes for the folder's config: every key loaded, the
    same parameter count, logits within 1e-4 with left padding, 16 greedy tokens identical."""
    hf, config = single(name, tmp_path / "hf")
    kind = "phi" if config["model_type"] == "phi" else "llama"
    block = language_block(config, str(tmp_path / "hf"), False)
    assert f"= {kind} {{" in block
    model, report = build_with_weights(spec_with(tmp_path, block))
    cov = report.components["llm"]
    assert cov.status == "loaded" and not cov.missing and not cov.unexpected and not cov.mismatched, str(report)
    llm = model.components["llm"]
    assert sum(p.numel() for p in llm.parameters()) == sum(p.numel() for p in hf.parameters())
    ids, mask = text_ids()
    real = mask.bool()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        out = model(ids, attention_mask=mask).logits
        diff = float((ref[real] - out[real]).abs().max())
        assert diff <= 1e-4, diff
        want = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, min_new_tokens=16, do_sample=False,
                           pad_token_id=0, eos_token_id=None)[:, ids.shape[1]:]
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=16), want)


def test_phi3_fused_tensors_that_do_not_fit_the_spec_are_reported(tmp_path):
    """A Phi-3 folder loaded into a `llama` with other heads: coverage names the mismatched keys (E0584)."""
    single("phi3_gqa_theta", tmp_path / "hf")
    block = (f'  language llm = llama {{ width = 64  depth = 2  heads = 4  ffn = 96  vocab = 128  max_positions = 256'
             f'  weights = "{tmp_path / "hf"}" }}')
    with pytest.raises(UserInputError) as e:
        build_with_weights(spec_with(tmp_path, block))
    diag = e.value.diagnostics[0]
    assert diag.code == "E0584"
    mismatched = {k for k, _, _ in e.value.report.components["llm"].mismatched}  # type: ignore[attr-defined]
    assert "model.layers.0.self_attn.k_proj.weight" in mismatched
    assert "model.layers.0.self_attn.q_proj.weight" not in mismatched


def llava_phi(name: str, out: Path, seed: int = 0):
    _quiet(transformers)
    cfg = transformers.LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, image_size=32, patch_size=8, projection_dim=32),
        text_config=text_config(name), image_token_id=IMAGE_TOKEN, image_seq_length=16,
        vision_feature_select_strategy="default", vision_feature_layer=-2,
        tie_word_embeddings=text_config(name)["tie_word_embeddings"])
    torch.manual_seed(seed)
    m = transformers.LlavaForConditionalGeneration(cfg).eval()
    randomise(m, seed=seed)
    m.save_pretrained(str(out))
    return m


@pytest.mark.parametrize("name", ["phi2", "phi2_tied", "phi3_gqa_theta"])
def test_llava_phi_parity(tmp_path, name):
    hf = llava_phi(name, tmp_path / "hf")
    ours, report, mapping = imported(tmp_path / "hf", tmp_path)
    assert report.ok, str(report)
    assert all(c.status in ("loaded", "no tensors") for c in report.components.values())
    kind = "phi" if name.startswith("phi2") else "llama"
    assert f"language llm = {kind} {{" in mapping["spec"]
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())
    assert "head_bias = false" in mapping["spec"] or kind == "llama"  # LLaVA's own head has no bias
    if name.endswith("_tied"):
        llm = ours.components["llm"]
        assert llm.lm_head.weight is llm.model.embed_tokens.weight
    ids, mask = _ids(16, 3)
    assert_parity(hf, ours, ids, mask, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("name", ["phi_gqa_gelu", "phi3"])
def test_llava_phi_cli_round_trip(tmp_path, name):
    """`vlm import-hf` -> `vlm check` / `vlm fmt --check` -> `vlm build` -> `vlmspec.load`: the same
    logits and greedy tokens."""
    hf = llava_phi(name, tmp_path / "hf", seed=1)
    model = cli_round_trip(tmp_path / "hf", tmp_path)
    ids, mask = _ids(16, 2)
    assert_parity(hf, model, ids, mask, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)))


REFUSED = {
    "longrope": ("phi3", dict(rope_scaling=dict(type="longrope", short_factor=[1.0] * 4, long_factor=[2.0] * 4,
                                                original_max_position_embeddings=128)), "rope scaling `longrope`"),
    "sliding_window": ("phi3", dict(sliding_window=64), "`sliding_window = 64`"),
    "partial_rotary": ("phi3", dict(partial_rotary_factor=0.75), "`partial_rotary_factor = 0.75`"),
    "qk_layernorm": ("phi", dict(qk_layernorm=True), "`qk_layernorm`"),
    "phi_act": ("phi", dict(hidden_act="relu"), "Phi activation relu"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_phi_settings_a_spec_cannot_say_are_refused(tmp_path, case):
    mt, over, message = REFUSED[case]
    text = {**_TEXT, "model_type": mt, **over}
    config = {"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"],
              "vision_config": {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                                "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
              "text_config": text, "image_token_index": IMAGE_TOKEN, "vision_feature_layer": -2,
              "vision_feature_select_strategy": "default", "tie_word_embeddings": text["tie_word_embeddings"]}
    diag = refusal(tmp_path / "hf", config)
    assert diag.code == "E0585" and message in diag.message, diag.message


def test_tied_phi_with_its_biased_head_is_refused():
    """PhiForCausalLM keeps its head's bias when the weight is tied; a tied `phi` head has none."""
    with pytest.raises(UserInputError) as e:
        language_block(text_config("phi2_tied"), "DIR", True)
    assert e.value.diagnostics[0].code == "E0585" and "tied embeddings" in e.value.diagnostics[0].message
