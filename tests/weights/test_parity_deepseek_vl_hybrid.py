"""DeepSeek-VL hybrid: a tiny `DeepseekVLHybridForConditionalGeneration` (SigLIP 32 px + SAM 64 px whose 8 x 8 grid
is brought down to SigLIP's 4 x 4, a Llama text model) made here and imported. Our processor's two pixel tensors
equal `DeepseekVLHybridImageProcessorPil`'s on a non-square image, the logits match within 1e-4 (fp32) and 16 greedy
tokens are identical, `vlm import-hf -> build -> generate` answers as transformers does; SAM's encoder alone
matches `SamVisionModel`; grids that nothing in the spec brings together are located errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from hf_tiny import (  # noqa: E402
    IMAGE_TOKEN,
    _quiet,
    assert_sees_image,
    export_round_trip,
    imported,
    loaded,
    noise_image,
    randomise,
)

transformers = pytest.importorskip("transformers")

LOW_MEAN, HIGH_MEAN = [0.5, 0.5, 0.5], [0.48145466, 0.4578275, 0.40821073]
HIGH_STD = [0.26862954, 0.26130258, 0.27577711]
SAM = dict(model_type="sam_vision_model", hidden_size=24, output_channels=8, num_hidden_layers=3, num_attention_heads=2,
           image_size=64, patch_size=8, window_size=3, global_attn_indexes=[1], mlp_dim=40, initializer_range=0.1)
TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'user' %}{{ 'User: ' }}{% for c in "
            "message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}{% for c in "
            "message['content'] | selectattr('type', 'equalto', 'text') %}{{ c['text'] }}{% endfor %}"
            "{{ '\n\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
QUESTION = "What is in the picture?"
TOKENS = 16  # SigLIP's 4 x 4 grid


def image_processor():
    return transformers.DeepseekVLHybridImageProcessorPil(
        size={"height": 32, "width": 32}, high_res_size={"height": 64, "width": 64}, image_mean=LOW_MEAN,
        image_std=LOW_MEAN, high_res_image_mean=HIGH_MEAN, high_res_image_std=HIGH_STD)


def deepseek(out: Path, seed: int = 0):
    """The tiny reference, randomised (alpha included), saved with its image processor, a tokenizer and a chat
    template: (model, image processor, tokenizer)."""
    from test_import_folder import char_tokenizer

    _quiet(transformers)
    cfg = transformers.DeepseekVLHybridConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, image_size=32, patch_size=8),
        high_res_vision_config=SAM,
        text_config=dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
        image_token_id=IMAGE_TOKEN, tie_word_embeddings=False)
    torch.manual_seed(seed)
    m = transformers.DeepseekVLHybridForConditionalGeneration(cfg).eval()
    randomise(m, seed=seed)
    m.save_pretrained(str(out))
    ip = image_processor()
    ip.save_pretrained(str(out))
    tok = char_tokenizer()
    tok.chat_template = TEMPLATE
    tok.save_pretrained(str(out))
    (out / "chat_template.jinja").write_text(TEMPLATE)
    return m, ip, tok


def hf_inputs(ip, tok, image: Path, question: str) -> dict:
    """DeepseekVLHybridImageProcessorPil's two pixel tensors and the chat template's ids with the image token
    repeated TOKENS times (what DeepseekVLHybridProcessor writes; it is not built here: it wants the tokenizer's
    `image_token` attribute)."""
    from PIL import Image

    px = ip(images=[Image.open(image).convert("RGB")], return_tensors="pt")
    text = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
                                   add_generation_prompt=True, tokenize=False)
    ids = tok(text.replace("<image>", "<image>" * TOKENS), return_tensors="pt")["input_ids"]
    return {"input_ids": ids, "pixel_values": px["pixel_values"], "high_res_pixel_values": px["high_res_pixel_values"]}


@pytest.mark.parametrize("size", [(45, 30), (20, 52)], ids=["wide", "tall"])
def test_deepseek_vl_hybrid_parity(tmp_path, size):
    from vlmspec.compiler.compile import load_analysis
    from vlmspec.runtime.inputs.processor import Processor

    hf, ip, tok = deepseek(tmp_path / "hf")
    ours, report, mapping = imported(tmp_path / "hf", tmp_path)
    assert report.ok and all(c.status in ("loaded", "no tensors") for c in report.components.values()), report
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())
    image = noise_image(tmp_path / "img.png", size, colour=True)

    analysis, _ = load_analysis(f"{tmp_path / 'model.vlm'}:{mapping['model']}")
    batch = Processor(analysis, tok).generation_batch([QUESTION], [image])
    ref = hf_inputs(ip, tok, image, QUESTION)
    assert batch["input_ids"].tolist() == ref["input_ids"].tolist()
    px = batch["pixel_values"]
    assert set(px) == {"sam", "siglip"}
    assert float((px["sam"] - ref["high_res_pixel_values"]).abs().max()) < 1e-5
    assert float((px["siglip"] - ref["pixel_values"]).abs().max()) < 1e-5

    ids, high = ref["input_ids"], ref["high_res_pixel_values"]
    assert_sees_image(lambda p: hf(input_ids=ids, pixel_values=ref["pixel_values"], high_res_pixel_values=p).logits,
                      high)
    assert_sees_image(lambda p: hf(input_ids=ids, pixel_values=p, high_res_pixel_values=high).logits,
                      ref["pixel_values"])
    with torch.no_grad():
        want = hf(**ref).logits
        got = ours(batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=px).logits
    diff = float((want - got).abs().max())
    print(f"{size}: max logit diff {diff:.2e}")
    assert diff <= 1e-4
    with torch.no_grad():
        theirs = hf.generate(**ref, max_new_tokens=16, min_new_tokens=16, do_sample=False, eos_token_id=None,
                             pad_token_id=0, suppress_tokens=[IMAGE_TOKEN])[0, ids.shape[1]:]
        mine = ours.generate(batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=px,
                             max_new_tokens=16)[0]
    assert mine.tolist()[: len(theirs)] == theirs.tolist() and len(theirs) == 16


def test_deepseek_vl_hybrid_cli_import_build_generate(tmp_path):
    """`vlm import-hf -> vlm build -> vlm generate` on a non-square image answers as transformers does on its own
    image processor's pixels and the chat template's prompt."""
    from test_import_folder import cli_generate

    hf, ip, tok = deepseek(tmp_path / "hf", seed=1)
    image = noise_image(tmp_path / "img.png", (50, 36), colour=True)
    out, spec = cli_generate(tmp_path / "hf", tmp_path, image, QUESTION, 12)
    assert "hybrid(sam + siglip -> llm)" in spec and "downsample = 4" in spec
    ref = hf_inputs(ip, tok, image, QUESTION)
    with torch.no_grad():
        ids = hf.generate(**ref, max_new_tokens=12, do_sample=False)[0, ref["input_ids"].shape[1]:]
    assert IMAGE_TOKEN not in ids.tolist()
    want = tok.decode(ids, skip_special_tokens=True).strip()
    assert out == want and want


# ------------------------------------------------------------------ SAM's encoder alone


def sam_reference(out: Path, **overrides):
    """A tiny `SamVisionModel`, randomised and saved: (model, its meta-device parameter count)."""
    _quiet(transformers)
    cfg = transformers.SamVisionConfig(**{k: v for k, v in {**SAM, **overrides}.items() if k != "model_type"})
    torch.manual_seed(0)
    m = transformers.SamVisionModel(cfg).eval()
    randomise(m)
    m.save_pretrained(str(out))
    with torch.device("meta"):
        count = sum(p.numel() for p in transformers.SamVisionModel(cfg).parameters())
    return m, count


LM = ("  language llm = llama { width = 64  depth = 2  heads = 4  kv_heads = 2  ffn = 96  vocab = 400  "
      "max_positions = 512 }\n")
SAM_ATTRS = "image_size = 64  patch_size = 8  width = 24  depth = 3  heads = 2  mlp = 40  neck = 8"


def spec_text(enc: str, name: str = "m", lm: str = LM) -> str:
    return (f"model {name} {{\n  vision enc = sam {{ {enc} }}\n  connector proj = mlp(enc -> llm)\n{lm}"
            "  fusion prefix(proj -> llm)\n}\n")


@pytest.mark.parametrize(("hf_cfg", "attrs"), [
    ({}, "window = 24  global_layers = [1]"),  # windows of 3 patches on an 8 x 8 grid: padded at the edge
    (dict(window_size=4, global_attn_indexes=[0, 2]), "window = 32  global_layers = [0, 2]"),
    (dict(use_rel_pos=False, qkv_bias=False, window_size=0, global_attn_indexes=[]),
     "rel_pos = false  attn_bias = false  window = 0  global_layers = []"),
], ids=["padded-windows", "even-windows", "global-no-rel-pos"])
def test_sam_features_match_transformers(tmp_path, hf_cfg, attrs):
    """A spec's `sam` component with `weights = DIR` gives `SamVisionModel`'s neck output, token by token, and
    `vlm summary` counts the class's parameters."""
    from vlmspec.compiler.compile import load_analysis
    from vlmspec.runtime.weights import build_with_weights

    hf, count = sam_reference(tmp_path / "hf", **hf_cfg)
    (tmp_path / "m.vlm").write_text(spec_text(f'{SAM_ATTRS}  {attrs}  weights = "{tmp_path / "hf"}"'))
    analysis = load_analysis(f"{tmp_path / 'm.vlm'}:m")[0]
    model, report = build_with_weights(analysis)
    assert report.ok and report.components["enc"].status == "loaded", str(report)
    assert sum(analysis.shapes.params["enc"].values()) == count
    px = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(pixel_values=px).last_hidden_state
        got = model.components["enc"](px)
        other = hf(pixel_values=torch.randn(2, 3, 64, 64)).last_hidden_state
    assert got.grid == (8, 8)
    assert float((got.x - ref.flatten(2).transpose(1, 2)).abs().max()) <= 1e-5
    assert float((other - ref).abs().max()) > 1e-2  # the reference sees the image


def test_full_size_counts_as_transformers(tmp_path):
    """SAM ViT-B (DeepSeek-VL's tower) and ViT-H, as `SamVisionModel` counts them on the meta device."""
    from vlmspec.compiler.compile import load_analysis

    cases = {"base": (dict(), ""),
             "huge": (dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16,
                           global_attn_indexes=[7, 15, 23, 31]),
                      "width = 1280  depth = 32  heads = 16  global_layers = [7, 15, 23, 31]")}
    for name, (cfg, attrs) in cases.items():
        with torch.device("meta"):
            theirs = sum(p.numel() for p in transformers.SamVisionModel(transformers.SamVisionConfig(**cfg)).parameters())
        path = tmp_path / f"{name}.vlm"
        path.write_text(spec_text(attrs, name, LM.replace("max_positions = 512", "max_positions = 8192")))
        analysis = load_analysis(f"{path}:{name}")[0]
        assert sum(analysis.shapes.params["enc"].values()) == theirs, name


# ------------------------------------------------------------------ bad input

TWO = ("model m {{\n  vision sam = sam {{ image_size = 64  patch_size = 8  width = 24  depth = 2  heads = 2  window = 24  "
       "global_layers = [1]  neck = 8  {sam} }}\n  vision low = {low} {{ image_size = 32  patch_size = 8  width = 32  "
       "depth = 2  heads = 2 }}\n  connector proj = hybrid({sources} -> llm) {{ {con} }}\n"
       + LM.replace("{", "{{").replace("}", "}}") +
       "  fusion prefix(proj -> llm)\n}}\n")


@pytest.mark.parametrize(("sam", "low", "sources", "con", "code", "words"), [
    ("", "siglip", "sam + low", "", "E0265", "grid 8x8 of `sam` cannot be resized to the 4x4 of `low` by `sam` "
     "without `downsample`"),
    ("downsample = 2", "siglip", "sam + low", "", "E0265", "by downsample = 2 (which makes it 2x2)"),
    ("downsample = 4", "vit", "sam + low", "", "E0268", "source `low` gives 17 tokens, not a square grid"),
    ("downsample = 4", "siglip", "sam + low", "merge = sum", "E0268", "`merge` does not apply"),
    ("downsample = 4", "siglip", "sam + low", "out = 63", "E0268", "does not split into 2 equal shares"),
    ("downsample = 4  window = 20", "siglip", "sam + low", "", "E0266", "window = 20 pixels"),
    ("downsample = 4  global_neck = 5", "siglip", "sam + low", "", "E0267", "global_neck = 5 is not one of"),
], ids=["no-downsample", "wrong-downsample", "class-token", "merge", "odd-out", "window", "global-neck"])
def test_bad_hybrid_specs_are_located_errors(tmp_path, sam, low, sources, con, code, words):
    from vlmspec.compiler.compile import check_file

    path = tmp_path / "m.vlm"
    text = TWO.format(sam=sam, low=low, sources=sources, con=con)
    if "window = 20" in sam:
        text = text.replace("window = 24  ", "")
    if low == "vit":  # a class token among the tokens: 4 x 4 + 1
        text = text.replace("heads = 2 }\n  connector", "heads = 2  feature = layer(-1).all }\n  connector")
    path.write_text(text)
    found = [d for d in check_file(str(path)).diagnostics if d.code == code]
    assert found and words in found[0].message and found[0].span is not None, \
        [(d.code, d.message) for d in check_file(str(path)).diagnostics]


def test_two_siglip_grids_name_the_encoder_without_a_downsampler(tmp_path):
    from vlmspec.compiler.compile import check_file

    text = (TWO.format(sam="downsample = 4", low="siglip", sources="big + low", con="")
            .replace("vision sam = sam { image_size = 64  patch_size = 8  width = 24  depth = 2  heads = 2  window = 24"
                     "  global_layers = [1]  neck = 8  downsample = 4 }",
                     "vision big = siglip { image_size = 64  patch_size = 8  width = 32  depth = 2  heads = 2 }"))
    (tmp_path / "m.vlm").write_text(text)
    (d,) = [d for d in check_file(str(tmp_path / "m.vlm")).diagnostics if d.code == "E0265"]
    assert "grid 8x8 of `big` cannot be resized to the 4x4 of `low` by a `siglip` encoder" in d.message


@pytest.mark.parametrize(("change", "words"), [
    (lambda c: c["text_config"].update(model_type="qwen2"), "text model `qwen2` (Llama)"),
    (lambda c: c["high_res_vision_config"].update(image_size=[64, 96]), "the `sam` kind reads squares"),
    (lambda c: c["high_res_vision_config"].update(use_abs_pos=False), "without absolute positions"),
], ids=["text", "non-square", "abs-pos"])
def test_import_refuses_what_a_spec_cannot_hold(tmp_path, change, words):
    from hf_tiny import refusal

    hf, _, _ = deepseek(tmp_path / "hf")
    config = hf.config.to_dict()
    change(config)
    d = refusal(tmp_path / "bad", config)
    assert d.code == "E0585" and words in d.message, d.message


def test_run_time_errors(tmp_path):
    """E0577: a SAM tower fed another size; E0578: a hybrid connector given grids that differ; E0579: encoders
    of two sizes where one lays its images out in tiles."""
    from vlmspec.compiler.ir import Component
    from vlmspec.compiler.schema.sam import Sam
    from vlmspec.compiler.schema.vision import SigLIP
    from vlmspec.diagnostics import UserInputError
    from vlmspec.runtime.blocks import VisualTokens
    from vlmspec.runtime.connectors.hybrid import HybridConnector
    from vlmspec.runtime.inputs.encoder_images import encoders_transform
    from vlmspec.runtime.vision.sam import SamEncoder

    enc = SamEncoder(Sam(image_size=64, patch_size=8, width=24, depth=2, heads=2, window=24, global_layers=[1], neck=8))
    with pytest.raises(UserInputError) as e:
        enc(torch.zeros(1, 3, 48, 64))
    assert e.value.diagnostics[0].code == "E0577"
    con = HybridConnector("proj", [8, 16], 32, "gelu")
    with pytest.raises(UserInputError) as e:
        con([VisualTokens(torch.zeros(1, 64, 8), (8, 8)), VisualTokens(torch.zeros(1, 16, 16), (4, 4))])
    assert e.value.diagnostics[0].code == "E0578" and "8x8 and 4x4" in e.value.diagnostics[0].message
    sam = Component(name="sam", role="vision", kind="sam", config=Sam(image_size=64, patch_size=8))
    tiled = Component(name="low", role="vision", kind="siglip", config=SigLIP(image_size=32, patch_size=8, tiles=4))
    with pytest.raises(UserInputError) as e:
        encoders_transform([sam, tiled])
    assert e.value.diagnostics[0].code == "E0579" and "`low` reads images with tiles" in e.value.diagnostics[0].message


# ------------------------------------------------------------------ export


def test_deepseek_vl_hybrid_round_trips_and_the_export_answers_as_vlm(tmp_path):
    """`import-hf -> build -> export-hf` gives every tensor back bit for bit; transformers loads the export (its
    config, its image processor) and gives the built model's logits."""
    from PIL import Image

    hf, ip, tok = deepseek(tmp_path / "hf", seed=2)
    built, back = export_round_trip(tmp_path / "hf", tmp_path)
    again = transformers.DeepseekVLHybridForConditionalGeneration.from_pretrained(str(back)).eval()
    proc = transformers.DeepseekVLHybridImageProcessorPil.from_pretrained(str(back))
    image = noise_image(tmp_path / "img.png", (30, 44), colour=True)
    ours_px = proc(images=[Image.open(image).convert("RGB")], return_tensors="pt")
    ref_px = ip(images=[Image.open(image).convert("RGB")], return_tensors="pt")
    for k in ("pixel_values", "high_res_pixel_values"):
        assert torch.equal(ours_px[k], ref_px[k]), k
    model, processor = loaded(built)
    batch = processor.generation_batch([QUESTION], [image])
    ref = hf_inputs(proc, tok, image, QUESTION)
    with torch.no_grad():
        want = again(**ref).logits
        got = model(batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"]).logits
    assert float((want - got).abs().max()) <= 1e-4


def test_export_refuses_what_deepseek_vl_cannot_hold(tmp_path):
    """The aligner concatenates the high-resolution tower first: a spec that lists SigLIP first is E0586."""
    from typer.testing import CliRunner

    from vlmspec.cli import app

    deepseek(tmp_path / "hf")
    runner = CliRunner()
    spec = tmp_path / "imported.vlm"
    assert runner.invoke(app, ["import-hf", str(tmp_path / "hf"), "-o", str(spec)]).exit_code == 0
    spec.write_text(spec.read_text().replace("hybrid(sam + siglip -> llm)", "hybrid(siglip + sam -> llm)"))
    r = runner.invoke(app, ["build", str(spec), "-o", str(tmp_path / "built")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["export-hf", str(tmp_path / "built"), "-o", str(tmp_path / "out")])
    assert r.exit_code != 0 and "E0586" in r.output and "reading siglip + sam" in r.output, r.output


def test_serve_answers_as_generate(tmp_path):
    """`vlm serve` feeds the two towers their own pixels too: its greedy answer is the built model's."""
    import base64

    from starlette.testclient import TestClient
    from typer.testing import CliRunner

    import vlmspec
    from vlmspec.cli import app
    from vlmspec.runtime.serve import ServeConfig, create_app

    deepseek(tmp_path / "hf", seed=1)
    runner = CliRunner()
    for args in (["import-hf", str(tmp_path / "hf"), "-o", str(tmp_path / "s.vlm")],
                 ["build", str(tmp_path / "s.vlm"), "-o", str(tmp_path / "built")]):
        assert runner.invoke(app, args).exit_code == 0
    image = noise_image(tmp_path / "img.png", (44, 30), colour=True)
    model, processor = loaded(tmp_path / "built")
    batch = processor.generation_batch([QUESTION], [image])
    with torch.no_grad():
        ids = model.generate(batch["input_ids"], attention_mask=batch["attention_mask"],
                             pixel_values=batch["pixel_values"], max_new_tokens=6)[0]
    want = processor.decode(ids.tolist())
    url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    body = {"model": "m", "max_tokens": 6, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "text", "text": QUESTION}, {"type": "image_url", "image_url": {"url": url}}]}]}
    with TestClient(create_app(vlmspec.load(str(tmp_path / "built")), ServeConfig())) as client:
        r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == want
