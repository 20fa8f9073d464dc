"""Per-component `weights`, coverage reports, errors (truncated shard, wrong family, shape mismatch,
pickles), dtype, and the LLaVA export round trip."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from hf_tiny import IMAGE_TOKEN, blip2, llava, randomise  # noqa: E402

from vlmspec.compiler.compile import load_analysis  # noqa: E402
from vlmspec.diagnostics import UserInputError  # noqa: E402
from vlmspec.runtime.checkpoint import save_model_dir  # noqa: E402
from vlmspec.runtime.model import build_model  # noqa: E402
from vlmspec.runtime.weights import build_with_weights, import_hf, load_component_weights  # noqa: E402
from vlmspec.runtime.weights.export import export_hf  # noqa: E402

transformers = pytest.importorskip("transformers")

LM = dict(vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False)


def spec(tmp: Path, vision_w: str | None, lm_w: str | None, *, vocab: int = 120, lm_dtype: str = "fp32") -> object:
    vw = f'  weights = "{vision_w}"' if vision_w else ""
    lw = f'  weights = "{lm_w}"' if lm_w else ""
    text = f"""model m {{
  vision enc = vit {{ image_size = 32  patch_size = 8  width = 32  depth = 2  heads = 4  mlp = 64{vw} }}
  connector proj = mlp(enc -> llm)
  language llm = llama {{ width = 64  depth = 2  heads = 4  kv_heads = 2  ffn = 96  vocab = {vocab}
                         max_positions = 128  dtype = {lm_dtype}{lw} }}
  fusion prefix(proj -> llm)
}}
"""
    (tmp / "m.vlm").write_text(text)
    return load_analysis(f"{tmp / 'm.vlm'}:m")[0]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    vis = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        patch_size=8)).eval()
    randomise(vis)
    vis.save_pretrained(str(root / "clip"))
    lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LM)).eval()
    randomise(lm)
    lm.save_pretrained(str(root / "llama"))
    lm.save_pretrained(str(root / "sharded"), max_shard_size="100KB")
    blip2(transformers, root / "blip2")
    return root, vis, lm


def test_components_from_single_model_checkpoints(tmp_path, folders):
    root, vis, lm = folders
    analysis = spec(tmp_path, str(root / "clip"), str(root / "llama"))
    model, report = build_with_weights(analysis)
    cov = report.components
    assert cov["enc"].status == "loaded" and cov["llm"].status == "loaded" and cov["proj"].status == "new"
    assert not cov["enc"].missing and not cov["llm"].unexpected and cov["proj"].new
    assert report.to_json()["ok"] and "weights coverage" in str(report)
    ids = torch.randint(3, 110, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(ids).logits - lm(input_ids=ids).logits).abs().max() <= 1e-4
        px = torch.randn(1, 3, 32, 32)
        ref = vis(pixel_values=px, output_hidden_states=True).hidden_states[-1][:, 1:]
        assert (model.components["enc"](px).x - ref).abs().max() <= 1e-5


def test_sharded_checkpoint_and_dtype(tmp_path, folders):
    root, _, lm = folders
    assert (root / "sharded" / "model.safetensors.index.json").is_file()
    model, report = build_with_weights(spec(tmp_path, None, str(root / "sharded"), lm_dtype="bf16"))
    llm = model.components["llm"]
    assert report.components["llm"].status == "loaded"
    assert {p.dtype for p in llm.parameters()} == {torch.bfloat16}
    assert torch.equal(llm.model.embed_tokens.weight, lm.model.embed_tokens.weight.to(torch.bfloat16))


def test_load_into_built_model_copies(tmp_path, folders):
    root, _, lm = folders
    analysis = spec(tmp_path, None, str(root / "llama"))
    model = build_model(analysis)
    report = load_component_weights(model, analysis)
    assert report.ok
    assert torch.equal(model.components["llm"].lm_head.weight, lm.lm_head.weight)


def _code(excinfo) -> str:
    return excinfo.value.diagnostics[0].code


def test_truncated_shard(tmp_path, folders):
    root, _, _ = folders
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in (root / "sharded").iterdir():
        data = f.read_bytes()
        (bad / f.name).write_bytes(data[: len(data) // 2] if f.name.endswith("-00002-of-00002.safetensors") or (
            f.suffix == ".safetensors" and f.name.startswith("model-00002")) else data)
    with pytest.raises(UserInputError) as e:
        build_with_weights(spec(tmp_path, None, str(bad)))
    assert _code(e) == "E0581" and "\n" not in e.value.diagnostics[0].message


def test_wrong_family(tmp_path, folders):
    root, _, _ = folders
    with pytest.raises(UserInputError) as e:
        build_with_weights(spec(tmp_path, None, f"{root / 'blip2'}#language"))
    msg = e.value.diagnostics[0].message
    assert _code(e) == "E0583" and "`llama`" in msg and "opt" in msg
    with pytest.raises(UserInputError) as e:
        build_with_weights(spec(tmp_path, str(root / "llama"), None))
    assert _code(e) == "E0583" and "`vit`" in e.value.diagnostics[0].message


def test_shape_mismatch_reports_everything(tmp_path, folders):
    root, _, _ = folders
    analysis = spec(tmp_path, None, str(root / "llama"), vocab=128)
    with pytest.raises(UserInputError) as e:
        build_with_weights(analysis)
    assert _code(e) == "E0584" and "shape-mismatched" in e.value.diagnostics[0].message
    report = e.value.report
    assert {k for k, _, _ in report.components["llm"].mismatched} == {"model.embed_tokens.weight", "lm_head.weight"}
    model, report = build_with_weights(analysis, strict=False)  # reports, never hides
    assert not report.ok and len(report.components["llm"].mismatched) == 2
    assert len(report.to_json()["components"][2]["mismatched"]) == 2


def test_missing_keys_and_allow_new(tmp_path, folders):
    root, _, _ = folders
    # a CLIP-vision checkpoint into a spec with a deeper encoder: layer 2 is missing
    text = (f'model m {{\n vision enc = vit {{ image_size = 32  patch_size = 8  width = 32  depth = 3  heads = 4'
            f'  mlp = 64  weights = "{root / "clip"}" }}\n connector proj = linear(enc -> llm)\n'
            ' language llm = llama { width = 64  depth = 1  heads = 4  ffn = 96  vocab = 120  max_positions = 64 }\n'
            ' fusion prefix(proj -> llm)\n}\n')
    (tmp_path / "d.vlm").write_text(text)
    analysis = load_analysis(f"{tmp_path / 'd.vlm'}:m")[0]
    with pytest.raises(UserInputError) as e:
        build_with_weights(analysis)
    assert _code(e) == "E0584" and "missing" in e.value.diagnostics[0].message
    assert len(e.value.report.components["enc"].missing) == 16
    _, report = build_with_weights(analysis, allow_new={"enc.encoder.layers.2"})
    assert report.ok and report.components["enc"].new


def test_pickle_refused_unless_allowed(tmp_path, folders):
    root, _, lm = folders
    pk = tmp_path / "pickled"
    pk.mkdir()
    (pk / "config.json").write_text((root / "llama" / "config.json").read_text())
    torch.save(lm.state_dict(), pk / "pytorch_model.bin")
    with pytest.raises(UserInputError) as e:
        build_with_weights(spec(tmp_path, None, str(pk)))
    assert _code(e) == "E0582" and "save_pretrained" in (e.value.diagnostics[0].help or "")
    _, report = build_with_weights(spec(tmp_path, None, str(pk)), allow_pickle=True)
    assert report.ok


def test_export_round_trip(tmp_path):
    hf = llava(transformers, tmp_path / "hf", tie=False)
    text, mapping = import_hf(tmp_path / "hf")
    (tmp_path / "m.vlm").write_text(text)
    analysis = load_analysis(f"{tmp_path / 'm.vlm'}:{mapping['model']}")[0]
    ours, _ = build_with_weights(analysis, image_token_id=mapping["image_token_id"])
    save_model_dir(ours, analysis, tmp_path / "vlm", spec_text=text)
    out = export_hf(tmp_path / "vlm", tmp_path / "out")
    back = transformers.LlavaForConditionalGeneration.from_pretrained(str(out)).eval()
    ids = torch.cat([torch.tensor([[1]]), torch.full((1, 16), IMAGE_TOKEN), torch.randint(2, 99, (1, 8))], 1)
    px = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        a = back(input_ids=ids, pixel_values=px).logits
        b = hf(input_ids=ids, pixel_values=px).logits
    assert (a - b).abs().max() <= 1e-5
    back.save_pretrained(str(tmp_path / "again"))
    text2, mapping2 = import_hf(tmp_path / "again")
    (tmp_path / "m2.vlm").write_text(text2)
    again, _ = build_with_weights(load_analysis(f"{tmp_path / 'm2.vlm'}:{mapping2['model']}")[0],
                                  image_token_id=mapping2["image_token_id"])
    sa, sb = ours.state_dict(), again.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert json.loads((out / "config.json").read_text())["model_type"] == "llava"


@pytest.mark.parametrize("extra,refused", [
    (dict(model_type="mistral", sliding_window=64), True),
    (dict(model_type="mistral", sliding_window=128), False),  # as long as the context: no change
    (dict(model_type="mistral", sliding_window=None), False),
    (dict(model_type="qwen2", sliding_window=64, use_sliding_window=True), True),
    (dict(model_type="qwen2", sliding_window=64, use_sliding_window=False), False),
])
def test_sliding_window_attention_is_refused_not_dropped(extra, refused):
    """A window shorter than the context is attention a `llama` does not do: refuse it (E0585) when
    importing, never import it as full attention."""
    from vlmspec.runtime.weights.spec_text import language_block

    tc = {**LM, "max_position_embeddings": 128, **extra}
    if refused:
        with pytest.raises(UserInputError) as e:
            language_block(tc, "DIR", tie=False)
        assert e.value.diagnostics[0].code == "E0585" and "sliding_window = 64" in e.value.diagnostics[0].message
    else:
        assert "language llm = llama" in language_block(tc, "DIR", tie=False)


def test_an_image_size_that_is_not_a_multiple_of_the_patch_drops_the_remainder(tmp_path):
    """SigLIP so400m reads 384 px in 14 px patches (27 x 27 = 729 tokens): the patch convolution keeps
    whole patches. The same at a tiny size (36 px, 8 px patches: 4 x 4), against transformers."""
    from hf_tiny import assert_sees_image

    torch.manual_seed(0)
    vis = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=36,
        patch_size=8, vision_use_head=False)).eval()
    randomise(vis)
    vis.save_pretrained(str(tmp_path / "siglip"))
    (tmp_path / "m.vlm").write_text(f"""model m {{
  vision enc = siglip {{ image_size = 36  patch_size = 8  width = 32  depth = 2  heads = 4  mlp = 64
                        weights = "{tmp_path / 'siglip'}" }}
  connector proj = mlp(enc -> llm)
  language llm = llama {{ width = 64  depth = 2  heads = 4  ffn = 96  vocab = 120  max_positions = 128 }}
  fusion prefix(proj -> llm) {{ tokens = 16 }}
}}
""")
    analysis = load_analysis(f"{tmp_path / 'm.vlm'}:m")[0]
    model, _ = build_with_weights(analysis)
    px = torch.randn(2, 3, 36, 36)
    ref = vis(pixel_values=px).last_hidden_state  # a `siglip` reads the post-LayerNorm output by default
    assert_sees_image(lambda p: vis(pixel_values=p).last_hidden_state, px)
    with torch.no_grad():
        ours = model.components["enc"](px).x
    assert ours.shape == ref.shape == (2, 16, 32) and (ours - ref).abs().max() <= 1e-5
