"""`dinov2` against transformers' `Dinov2Model` / `Dinov2WithRegistersModel`: a spec component with
`weights = "DIR"` gives the tower's features (as the spec's `feature` selects them) within 1e-5 in fp32, at
the nominal size and on non-square images whose grid resizes the learned positions; `vlm summary` counts
the class's parameters; `vlm build` + `vlm generate` answer from the image; bad specs are located errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from hf_tiny import _quiet, noise_image, randomise  # noqa: E402

transformers = pytest.importorskip("transformers")

TOL = 1e-5
LM = ("  language llm = llama { width = 64  depth = 2  heads = 4  kv_heads = 2  ffn = 96  vocab = 400  "
      "max_positions = 512 }\n")


def reference(out: Path, *, registers: int = 0, swiglu: bool = False):
    """A tiny DINOv2 whose positions were trained at 35 px (a 5 x 5 grid of 7-pixel patches), randomised and
    saved: (the model, its meta-device parameter count)."""
    _quiet(transformers)
    common = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, mlp_ratio=4, image_size=35,
                  patch_size=7, use_swiglu_ffn=swiglu)
    if registers:
        cls, cfg = transformers.Dinov2WithRegistersModel, transformers.Dinov2WithRegistersConfig(
            num_register_tokens=registers, **common)
    else:
        cls, cfg = transformers.Dinov2Model, transformers.Dinov2Config(**common)
    torch.manual_seed(0)
    m = cls(cfg).eval()
    randomise(m)
    m.save_pretrained(str(out))
    with torch.device("meta"):
        count = sum(p.numel() for p in cls(cfg).parameters())
    return m, count


def spec_text(enc: str, name: str = "m") -> str:
    return (f"model {name} {{\n  vision enc = dinov2 {{ {enc} }}\n  connector proj = mlp(enc -> llm)\n{LM}"
            "  fusion prefix(proj -> llm)\n}\n")


def built(tmp: Path, enc: str):
    from vlmspec.compiler.compile import load_analysis
    from vlmspec.runtime.weights import build_with_weights

    (tmp / "m.vlm").write_text(spec_text(enc))
    analysis = load_analysis(f"{tmp / 'm.vlm'}:m")[0]
    model, report = build_with_weights(analysis)
    return analysis, model, report


CASES = {
    # (registers, swiglu, spec attributes, hidden state compared, tokens kept: slice of it)
    "plain": (0, False, "image_size = 35", "last", 1),
    "registers-all": (4, False, "image_size = 28  position_size = 35  registers = 4  feature = layer(-1).all",
                      "last", 0),
    "swiglu-layer-2": (0, True, "image_size = 35  gated_mlp = true  feature = layer(-2).patches", -2, 1),
}
SIZES = [(35, 35), (28, 28), (28, 49), (42, 21)]  # nominal, smaller square, two non-square grids


@pytest.mark.parametrize("case", list(CASES))
def test_dinov2_features_match_transformers(tmp_path, case):
    registers, swiglu, attrs, state, keep = CASES[case]
    hf, count = reference(tmp_path / "hf", registers=registers, swiglu=swiglu)
    enc = f'patch_size = 7  width = 32  depth = 3  heads = 4  {attrs}  weights = "{tmp_path / "hf"}"'
    analysis, model, report = built(tmp_path, enc)
    assert report.ok and report.components["enc"].status == "loaded", str(report)
    assert sum(analysis.shapes.params["enc"].values()) == count  # `vlm summary` = the class's count
    ours = model.components["enc"]
    g = torch.Generator().manual_seed(1)
    for h, w in SIZES:
        px = torch.randn(2, 3, h, w, generator=g)
        with torch.no_grad():
            out = hf(pixel_values=px, output_hidden_states=True)
            ref = out.last_hidden_state if state == "last" else out.hidden_states[state]
            got = ours(px)
        ref = ref[:, keep * (1 + registers):]
        assert got.x.shape == ref.shape, (h, w)
        assert float((got.x - ref).abs().max()) <= TOL, (case, h, w)
        with torch.no_grad():
            other = hf(pixel_values=torch.randn(2, 3, h, w, generator=g)).last_hidden_state
        assert float((other - out.last_hidden_state).abs().max()) > 100 * TOL  # the reference sees the image
        if keep:
            assert got.grid == (h // 7, w // 7)


def test_full_size_dinov2_counts_as_transformers(tmp_path):
    """DINOv2 ViT-L/14 (Cobra's second tower: 224 px, positions trained at 518) and ViT-g/14 with registers
    (SwiGLU), counted on the meta device."""
    from vlmspec.compiler.compile import load_analysis

    cases = {"large": (dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, image_size=518),
                       "width = 1024  depth = 24  heads = 16"),
             "giant_reg": (dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, image_size=518,
                                use_swiglu_ffn=True, num_register_tokens=4),
                           "width = 1536  depth = 40  heads = 24  gated_mlp = true  registers = 4")}
    for name, (cfg, attrs) in cases.items():
        cls = transformers.Dinov2WithRegistersModel if "num_register_tokens" in cfg else transformers.Dinov2Model
        config = (transformers.Dinov2WithRegistersConfig if "num_register_tokens" in cfg else
                  transformers.Dinov2Config)(patch_size=14, **cfg)
        with torch.device("meta"):
            theirs = sum(p.numel() for p in cls(config).parameters())
        (tmp_path / f"{name}.vlm").write_text(spec_text(f"image_size = 224  patch_size = 14  position_size = 518  "
                                                        f"{attrs}", name))
        analysis = load_analysis(f"{tmp_path / name}.vlm:{name}")[0]
        assert sum(analysis.shapes.params["enc"].values()) == theirs, name


def test_build_and_generate_from_the_cli(tmp_path):
    """`vlm build` (the tower from its folder) then `vlm generate` on two images: the answers differ."""
    from PIL import Image
    from typer.testing import CliRunner

    from vlmspec.cli import app
    from vlmspec.runtime.inputs.synth import corpus
    from vlmspec.runtime.inputs.tokenizer import train_tokenizer

    reference(tmp_path / "hf", registers=4)
    tok = tmp_path / "tok"
    train_tokenizer(corpus(), 400, extra_special=["<image>"]).save_pretrained(tok)
    (tmp_path / "m.vlm").write_text(spec_text(f'image_size = 28  patch_size = 7  width = 32  depth = 3  heads = 4  '
                                              f'position_size = 35  registers = 4  weights = "{tmp_path / "hf"}"'))
    runner = CliRunner()
    r = runner.invoke(app, ["summary", f"{tmp_path / 'm.vlm'}:m"])
    assert r.exit_code == 0 and "dinov2" in r.output, r.output
    r = runner.invoke(app, ["build", f"{tmp_path / 'm.vlm'}:m", "-o", str(tmp_path / "built"), "--tokenizer", str(tok)])
    assert r.exit_code == 0, r.output
    red = tmp_path / "red.png"
    Image.new("RGB", (40, 30), (220, 30, 30)).save(red)
    answers = []
    for image in (red, noise_image(tmp_path / "noise.png", (30, 40), colour=True)):
        r = runner.invoke(app, ["generate", str(tmp_path / "built"), "--image", str(image), "--prompt",
                                "What is in the picture?", "--max-new-tokens", "8"])
        assert r.exit_code == 0, r.output
        answers.append(r.output)
    assert answers[0] != answers[1], answers


@pytest.mark.parametrize(("attrs", "code"), [("registers = -1", "E0241"), ("window = 14", "E0242"),
                                             ("tiles = 4", "E0242"), ("position_size = 30", "E0243")])
def test_bad_dinov2_specs_are_located_errors(tmp_path, attrs, code):
    from vlmspec.compiler.compile import check_file

    path = tmp_path / "bad.vlm"
    path.write_text(spec_text(f"image_size = 28  patch_size = 7  width = 32  depth = 2  heads = 4  {attrs}"))
    diags = [d for d in check_file(str(path)).diagnostics if d.severity == "error"]
    assert [d.code for d in diags] == [code], [str(d) for d in diags]
    assert diags[0].span is not None and diags[0].span.line == 2


@pytest.mark.parametrize("attrs", ["", "registers = 4  gated_mlp = true  layer_scale = false"])
def test_paths_lora_and_checkpointing(tmp_path, attrs):
    from encoder_checks import assert_wired

    from vlmspec.compiler.compile import load_analysis

    (tmp_path / "m.vlm").write_text(spec_text(f"image_size = 28  patch_size = 7  width = 32  depth = 2  heads = 4  "
                                              f"{attrs}"))
    assert_wired(load_analysis(f"{tmp_path / 'm.vlm'}:m")[0])


@pytest.mark.parametrize("gated", [False, True])
def test_lora_adds_what_the_compiler_counts(tmp_path, gated):
    """`lora enc(...)` on every target wraps the declared linears, and adds as many parameters as `vlm summary`
    says (the SwiGLU's `mlp.fc1` is its fused `weights_in`, twice `mlp` wide)."""
    from vlmspec.compiler.compile import load_analysis
    from vlmspec.compiler.passes import lora_params
    from vlmspec.runtime.model import build_model
    from vlmspec.runtime.train.lora import inject_lora, lora_parameters

    text = spec_text(f"image_size = 28  patch_size = 7  width = 32  depth = 2  heads = 4  gated_mlp = {str(gated).lower()}")
    targets = "[attn.q, attn.k, attn.v, attn.o, mlp.fc1, mlp.fc2]"
    stage = f"  stage s {{ train proj  lora enc(rank = 4, targets = {targets})  freeze llm }}\n"
    (tmp_path / "m.vlm").write_text(text[:text.rindex("}")] + stage + "}\n")
    analysis = load_analysis(f"{tmp_path / 'm.vlm'}:m")[0]
    model = build_model(analysis)
    inject_lora(model, analysis, analysis.ir.stages[0])
    added = sum(p.numel() for p in lora_parameters(model))
    expected = lora_params(analysis.ir, "enc", ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.fc1", "mlp.fc2"], 4)
    assert added == expected > 0


def test_images_smaller_than_a_patch_are_refused():
    from vlmspec.compiler.schema.dinov2 import DINOv2
    from vlmspec.diagnostics import UserInputError
    from vlmspec.runtime.vision.dinov2 import Dinov2Encoder

    encoder = Dinov2Encoder(DINOv2(image_size=28, patch_size=7, width=32, depth=1, heads=4))
    for bad in (torch.zeros(1, 3, 4, 28), torch.zeros(3, 28, 28), torch.zeros(1, 1, 28, 28)):
        with pytest.raises(UserInputError) as e:
            encoder(bad)
        assert e.value.diagnostics[0].code == "E0588"
